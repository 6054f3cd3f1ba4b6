"""Answers from the site's own content: `chatbot index` builds a search index, the service grounds answers in it.

- `passages`: documents and their split into passages along headings (pure).
- `index`: the index file (SQLite FTS5, BM25): writing it atomically, querying it safely.
- `sources`: what reading a source gives (documents found, things skipped and why); `folder`: files with front
  matter; `crawl`: the pages of sitemaps and feeds, fetched politely.
- `indexer`: `chatbot index`: every source → documents → one index file, with a report.
- `retriever`: the service's side: the best passages for a question within a budget, a changed file reloaded.
"""
