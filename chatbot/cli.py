"""The `chatbot` command."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web
from pythonjsonlogger.json import JsonFormatter

from .settings import Settings, SettingsError

log = logging.getLogger("chatbot")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatbot", description="Resumable streaming chat service.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP server (settings from CHATBOT_* variables)")
    serve.add_argument("--host", help="overrides CHATBOT_HOST")
    serve.add_argument("--port", type=int, help="overrides CHATBOT_PORT")
    args = parser.parse_args(argv)

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
    log.info("listening on http://%s:%d (provider %s)", settings.host, settings.port, settings.provider)
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None, shutdown_timeout=10)
    if faults := app[FAULTS]:
        log.critical("stopped because shared tasks ended unexpectedly: %s", ", ".join(faults))
        return 3
    return 0


def _configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        # Fields passed with extra= (session_id, outcome, ...) become keys of the JSON object.
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per upstream request otherwise
