"""The `chatbot` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from pythonjsonlogger.json import JsonFormatter

from .settings import Settings, SettingsError

log = logging.getLogger("chatbot")
T = TypeVar("T", int, float)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatbot", description="Resumable streaming chat service.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server (settings from CHATBOT_* variables)")
    serve.add_argument("--host", help="overrides CHATBOT_HOST")
    serve.add_argument("--port", type=int, help="overrides CHATBOT_PORT")
    index = commands.add_parser(
        "index",
        help="build the search index of the site's content that CHATBOT_KNOWLEDGE names",
        description="Read folders (Markdown, HTML, text) and http(s) sitemaps or RSS/Atom feeds; write one index "
        "file, replacing the old one atomically; print what was indexed and what was skipped and why.",
    )
    index.add_argument("sources", nargs="+", metavar="SOURCE", help="a folder, or the URL of a sitemap or a feed")
    index.add_argument("--out", type=Path, default=Path("knowledge.sqlite3"), help="the index file (knowledge.sqlite3)")
    index.add_argument("--base-url", help="the site's URL, for files whose front matter gives no url/permalink")
    index.add_argument("--timeout", type=_positive(float), default=10.0, help="seconds per web request (10)")
    index.add_argument("--concurrency", type=_positive(int), default=4, help="web requests at once (4)")
    index.add_argument(
        "--max-pages", type=_positive(int), default=10_000, help="pages read per sitemap or feed (10000)"
    )
    args = parser.parse_args(argv)
    if args.command == "index":
        return _index(args)

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"chatbot: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_format)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = dataclasses.replace(settings, **overrides)

    from .app import create_app
    from .appkeys import FAULTS

    def stop() -> None:
        # run_app turns SIGTERM into its graceful shutdown: readers are sent elsewhere, then we exit non-zero.
        signal.raise_signal(signal.SIGTERM)

    try:
        app = create_app(settings, on_fatal=stop)  # builds the provider, whose SDK may find its variables missing
    except SettingsError as exc:
        print(f"chatbot: {exc}", file=sys.stderr)
        return 2
    try:
        loop = _new_event_loop(settings.event_loop)
    except SettingsError as exc:
        print(f"chatbot: {exc}", file=sys.stderr)
        return 2
    log.info(
        "listening on http://%s:%d (provider %s, event loop %s)",
        settings.host, settings.port, settings.provider, type(loop).__module__.partition(".")[0],
    )  # fmt: skip
    # Everything imported and built so far lives as long as the process: out of the collector's way, so
    # that its full collections (pauses of tens of ms under load, bench/RESULTS.md) walk only what streams make.
    gc.freeze()
    web.run_app(
        app, host=settings.host, port=settings.port, print=None, access_log=None, shutdown_timeout=10, loop=loop
    )
    if faults := app[FAULTS]:
        log.critical("stopped because shared tasks ended unexpectedly: %s", ", ".join(faults))
        return 3
    return 0


def _new_event_loop(choice: str) -> asyncio.AbstractEventLoop:
    """The loop `serve` runs on (CHATBOT_EVENT_LOOP). uvloop runs the loop's own work (callbacks, timers,
    socket reads and writes) in C: at 100 answers × 25 tokens/s, ~18% more tokens per CPU-second and, at
    400 × 25, a p99 of 4-7 ms instead of 31-35 ms (bench/RESULTS.md). Raises SettingsError if `uvloop` is
    asked for by name and cannot be imported (it does not exist for Windows)."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if choice == "uvloop":
                raise SettingsError("CHATBOT_EVENT_LOOP=uvloop, but uvloop cannot be imported here") from exc
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = kind(raw)
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {raw}")
        return value

    return parse


def _index(args: argparse.Namespace) -> int:
    import asyncio
    import sqlite3

    from .knowledge import indexer

    if args.base_url is not None and not args.base_url.startswith(("http://", "https://")):
        print(f"chatbot index: --base-url must be an http(s) URL, got {args.base_url!r}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("usp").setLevel(logging.CRITICAL)  # it logs every document that is not a sitemap
    logging.getLogger("trafilatura").setLevel(logging.ERROR)
    options = indexer.Options(
        out=args.out,
        base_url=args.base_url,
        concurrency=args.concurrency,
        timeout=args.timeout,
        max_pages=args.max_pages,
    )
    try:
        report = asyncio.run(indexer.run(args.sources, options))
    except (OSError, sqlite3.Error) as exc:  # the index file could not be written
        print(f"chatbot index: cannot write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(indexer.summary(report, args.out))
    return 0 if report.documents else 1


def _configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        # Fields passed with extra= (session_id, outcome, ...) become keys of the JSON object.
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per upstream request otherwise
