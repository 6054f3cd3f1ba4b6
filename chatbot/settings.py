"""All configuration, read once from the environment into one frozen object."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

PROVIDERS = ("demo", "openai", "anthropic")
CLUSTER_MODES = ("auto", "on", "off")


class SettingsError(ValueError):
    """A setting has a value the service cannot run with; the message names the variable."""


def _parse(env: Mapping[str, str], name: str, default: T, convert: Callable[[str], T], rule: str) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {rule}, got {raw!r}") from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(raw)
        return value

    return convert


def _float_in(low: float, high: float) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        value = float(raw)
        if not low <= value <= high:  # NaN fails too
            raise ValueError(raw)
        return value

    return convert


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not 0 < value < float("inf"):
        raise ValueError(raw)
    return value


def _redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(raw)
    return raw


def _cluster_mode(raw: str) -> str:
    if raw not in CLUSTER_MODES:
        raise ValueError(raw)
    return raw


def _provider(raw: str) -> str:
    if raw not in PROVIDERS:
        raise ValueError(raw)
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(raw)
    return origins


def _model(env: Mapping[str, str], provider: str) -> str:
    model = env.get("CHATBOT_MODEL", "").strip()
    if provider != "demo" and not model:
        raise SettingsError(f"CHATBOT_MODEL must name the model when CHATBOT_PROVIDER={provider}")
    return model


def _system_prompt(env: Mapping[str, str]) -> str:
    """CHATBOT_SYSTEM_PROMPT, or the UTF-8 text of the file CHATBOT_SYSTEM_PROMPT_FILE names."""
    prompt = env.get("CHATBOT_SYSTEM_PROMPT", "")
    path = env.get("CHATBOT_SYSTEM_PROMPT_FILE", "").strip()
    if not path:
        return prompt.strip()
    if prompt.strip():
        raise SettingsError("set CHATBOT_SYSTEM_PROMPT or CHATBOT_SYSTEM_PROMPT_FILE, not both")
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise SettingsError(f"CHATBOT_SYSTEM_PROMPT_FILE {path!r} cannot be read as UTF-8 text: {reason}") from None


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


def _reasoning(raw: str) -> str:
    if raw not in ("show", "hide"):
        raise ValueError(raw)
    return raw


def _log_format(raw: str) -> str:
    if raw not in ("plain", "json"):
        raise ValueError(raw)
    return raw


def _event_loop(raw: str) -> str:
    if raw not in ("auto", "uvloop", "asyncio"):
        raise ValueError(raw)
    return raw


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every knob of the service; build it with `Settings.from_env()`."""

    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    redis_pool_size: int = 3
    redis_cluster: str = "auto"
    provider: str = "demo"
    demo_tokens_per_second: float = 20.0
    demo_answer_tokens: int = 120
    session_ttl_seconds: int = 3600
    max_message_chars: int = 4000
    max_body_bytes: int = 32 * 1024
    max_answer_events: int = 20_000
    heartbeat_seconds: float = 15.0
    sse_retry_ms: int = 1000
    lease_ttl_seconds: float = 5.0
    # The least time between two batches of appends; the first output of an answer never waits for it.
    write_batch_interval_ms: float = 2.0
    # Answers this process starts at the same time; later ones wait their turn, in arrival order.
    starts_at_once: int = 8
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    model: str = ""
    max_output_tokens: int | None = None
    upstream_idle_timeout_seconds: float = 120.0
    upstream_max_retries: int = 2
    answer_deadline_seconds: float = 600.0
    reasoning: str = "show"
    system_prompt: str = ""
    history_ttl_seconds: int = 7 * 86400
    history_max_turns: int = 20
    history_max_chars: int = 100_000
    shutdown_grace_seconds: float = 30.0
    rate_limit: int = 30
    rate_window_seconds: int = 60
    max_streams_per_address: int = 100
    max_streams: int = 20_000
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default_factory=tuple)
    log_format: str = "plain"
    event_loop: str = "auto"  # `chatbot serve`'s loop: uvloop where it is installed (auto), or either by name
    knowledge: str = ""  # the index file `chatbot index` wrote; empty: answers are not grounded in the site
    knowledge_max_chars: int = 6000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read CHATBOT_* variables; a bad value raises SettingsError naming the variable."""
        env = os.environ if env is None else env
        d = cls()
        provider = _parse(env, "CHATBOT_PROVIDER", d.provider, _provider, f"one of {', '.join(PROVIDERS)}")
        return cls(
            host=env.get("CHATBOT_HOST", "").strip() or d.host,
            port=_parse(env, "CHATBOT_PORT", d.port, _int_in(0, 65535), "an integer 0-65535"),
            redis_url=_parse(env, "CHATBOT_REDIS_URL", d.redis_url, _redis_url, "a redis:// URL or empty"),
            redis_pool_size=_parse(
                env, "CHATBOT_REDIS_POOL_SIZE", d.redis_pool_size, _int_in(2, 1000), "an integer 2-1000"
            ),
            redis_cluster=_parse(env, "CHATBOT_REDIS_CLUSTER", d.redis_cluster, _cluster_mode, "auto, on or off"),
            provider=provider,
            demo_tokens_per_second=_parse(
                env, "CHATBOT_DEMO_TOKENS_PER_SECOND", d.demo_tokens_per_second, _positive_float, "a number > 0"
            ),
            demo_answer_tokens=_parse(
                env, "CHATBOT_DEMO_ANSWER_TOKENS", d.demo_answer_tokens, _int_in(1, 100_000), "an integer 1-100000"
            ),
            session_ttl_seconds=_parse(
                env, "CHATBOT_SESSION_TTL_SECONDS", d.session_ttl_seconds, _int_in(1, 30 * 86400), "seconds, 1-2592000"
            ),
            max_message_chars=_parse(
                env, "CHATBOT_MAX_MESSAGE_CHARS", d.max_message_chars, _int_in(1, 1_000_000), "an integer 1-1000000"
            ),
            max_body_bytes=_parse(
                env, "CHATBOT_MAX_BODY_BYTES", d.max_body_bytes, _int_in(256, 16 * 1024 * 1024), "bytes, 256-16777216"
            ),
            max_answer_events=_parse(
                env, "CHATBOT_MAX_ANSWER_EVENTS", d.max_answer_events, _int_in(10, 10_000_000), "an integer >= 10"
            ),
            heartbeat_seconds=_parse(
                env, "CHATBOT_HEARTBEAT_SECONDS", d.heartbeat_seconds, _positive_float, "seconds > 0"
            ),
            sse_retry_ms=_parse(env, "CHATBOT_SSE_RETRY_MS", d.sse_retry_ms, _int_in(0, 600_000), "milliseconds"),
            lease_ttl_seconds=_parse(
                env, "CHATBOT_LEASE_TTL_SECONDS", d.lease_ttl_seconds, _positive_float, "seconds > 0"
            ),
            write_batch_interval_ms=_parse(
                env,
                "CHATBOT_WRITE_BATCH_INTERVAL_MS",
                d.write_batch_interval_ms,
                _float_in(0.0, 1000.0),
                "milliseconds, 0-1000",
            ),
            starts_at_once=_parse(
                env, "CHATBOT_STARTS_AT_ONCE", d.starts_at_once, _int_in(1, 10_000), "an integer 1-10000"
            ),
            cors_origins=_parse(env, "CHATBOT_CORS_ORIGINS", d.cors_origins, _origins, "comma-separated origins"),
            model=_model(env, provider),
            max_output_tokens=_parse(
                env, "CHATBOT_MAX_OUTPUT_TOKENS", d.max_output_tokens, _int_in(1, 10_000_000), "an integer >= 1"
            ),
            upstream_idle_timeout_seconds=_parse(
                env,
                "CHATBOT_UPSTREAM_IDLE_TIMEOUT_SECONDS",
                d.upstream_idle_timeout_seconds,
                _positive_float,
                "seconds > 0",
            ),
            upstream_max_retries=_parse(
                env, "CHATBOT_UPSTREAM_MAX_RETRIES", d.upstream_max_retries, _int_in(0, 20), "an integer 0-20"
            ),
            answer_deadline_seconds=_parse(
                env, "CHATBOT_ANSWER_DEADLINE_SECONDS", d.answer_deadline_seconds, _positive_float, "seconds > 0"
            ),
            reasoning=_parse(env, "CHATBOT_REASONING", d.reasoning, _reasoning, "show or hide"),
            system_prompt=_system_prompt(env),
            history_ttl_seconds=_parse(
                env,
                "CHATBOT_HISTORY_TTL_SECONDS",
                d.history_ttl_seconds,
                _int_in(1, 365 * 86400),
                "seconds, 1-31536000",
            ),
            history_max_turns=_parse(
                env, "CHATBOT_HISTORY_MAX_TURNS", d.history_max_turns, _int_in(0, 10_000), "an integer 0-10000"
            ),
            history_max_chars=_parse(
                env, "CHATBOT_HISTORY_MAX_CHARS", d.history_max_chars, _int_in(0, 100_000_000), "an integer >= 0"
            ),
            shutdown_grace_seconds=_parse(
                env, "CHATBOT_SHUTDOWN_GRACE_SECONDS", d.shutdown_grace_seconds, _positive_float, "seconds > 0"
            ),
            rate_limit=_parse(env, "CHATBOT_RATE_LIMIT", d.rate_limit, _int_in(0, 1_000_000), "an integer >= 0"),
            rate_window_seconds=_parse(
                env, "CHATBOT_RATE_WINDOW_SECONDS", d.rate_window_seconds, _int_in(1, 86400), "seconds, 1-86400"
            ),
            max_streams_per_address=_parse(
                env, "CHATBOT_MAX_STREAMS_PER_ADDRESS", d.max_streams_per_address, _int_in(1, 10**6), "an integer >= 1"
            ),
            max_streams=_parse(env, "CHATBOT_MAX_STREAMS", d.max_streams, _int_in(1, 10**7), "an integer >= 1"),
            trusted_proxies=_parse(
                env, "CHATBOT_TRUSTED_PROXIES", d.trusted_proxies, _networks, "comma-separated IP addresses or CIDRs"
            ),
            log_format=_parse(env, "CHATBOT_LOG_FORMAT", d.log_format, _log_format, "plain or json"),
            event_loop=_parse(env, "CHATBOT_EVENT_LOOP", d.event_loop, _event_loop, "auto, uvloop or asyncio"),
            knowledge=env.get("CHATBOT_KNOWLEDGE", "").strip(),
            knowledge_max_chars=_parse(
                env, "CHATBOT_KNOWLEDGE_MAX_CHARS", d.knowledge_max_chars, _int_in(100, 10**6), "an integer 100-1000000"
            ),
        )

    @property
    def embedded_store(self) -> bool:
        return self.redis_url is None
