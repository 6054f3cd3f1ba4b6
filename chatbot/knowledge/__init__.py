"""Answers from the site's own content: `chatbot index` builds a search index, the service grounds answers in it.

- `passages`: documents and their split into passages along headings (pure).
- `index`: the index file (SQLite FTS5, BM25): writing it atomically, querying it safely.
- `collect`: documents from folders (Markdown, HTML, text) and from sitemaps and feeds fetched politely.
- `indexer`: `chatbot index`: every source → documents → one index file, with a report.
- `retriever`: the service's side: the best passages for a question within a budget, a changed file reloaded.
"""
