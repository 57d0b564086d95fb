"""Configuration, read once into one typed object.

Every setting has a command-line flag and a ``LASTSEEN_*`` environment variable; the flag wins.
Nothing else in the package reads ``os.environ``: components get a ``Settings`` and nothing more.
Every interval and limit is here so that tests can run the whole system with compressed time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import platformdirs

from lastseen.core.errors import ConfigError
from lastseen.core.parsers import boolean, choice, host_port, http_url, non_negative, positive


def _database_url(value: str) -> str:
    if urlsplit(value).scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its field name, how to parse it from text, its default, and its help."""

    field: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    group: str

    @property
    def env(self) -> str:
        return "LASTSEEN_" + self.field.upper()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def _name(value: str) -> str:
    if not value.strip() or len(value) > 200:
        raise ValueError(f"expected a name of 1 to 200 characters, got {value!r}")
    return value.strip()


def _secret(value: str) -> str:
    # The error must not echo the value: it may be printed.
    if not value.strip():
        raise ValueError("expected a secret, got an empty value")
    return value.strip()


def _header(value: str) -> str:
    # The error must not echo the value: it may carry a secret.
    name, colon, rest = value.partition(":")
    if not colon or not name.strip() or not rest.strip() or any(c in value for c in "\r\n"):
        raise ValueError("expected one header as 'Name: value'")
    if not name.strip().replace("-", "").isalnum():
        raise ValueError("the header's name must be letters, digits and '-'")
    return f"{name.strip()}: {rest.strip()}"


_seconds = positive(float)
_positive_int = positive(int)

OPTIONS: tuple[Option, ...] = (
    # Where things are.
    Option(
        "database_url",
        _database_url,
        None,
        "PostgreSQL URL; without it lastseen starts its own embedded PostgreSQL in the data dir",
        "service",
    ),
    Option(
        "listen", host_port, "127.0.0.1:9090", "host:port the HTTP server listens on", "service"
    ),
    Option("objects_url", http_url, "http://127.0.0.1:9010", "base URL of the upstream", "service"),
    Option(
        "upstream_ca_file",
        Path,
        None,
        "PEM file of the CA(s) that sign the upstream's HTTPS certificate (default: the system's)",
        "lookups",
    ),
    Option(
        "upstream_header",
        _header,
        None,
        "a header sent with every lookup, e.g. 'Authorization: Bearer ...' (never logged)",
        "lookups",
    ),
    Option(
        "upstream_header_file", Path, None, "a file holding LASTSEEN_UPSTREAM_HEADER", "lookups"
    ),
    Option(
        "upstream_client_cert",
        Path,
        None,
        "PEM file of a client certificate (and its key, unless LASTSEEN_UPSTREAM_CLIENT_KEY) for "
        "an upstream that asks for one",
        "lookups",
    ),
    Option(
        "upstream_client_key", Path, None, "PEM file of the client certificate's key", "lookups"
    ),
    Option("ttl", _seconds, "30", "seconds an object stays after it was last seen", "service"),
    Option(
        "data_dir",
        Path,
        platformdirs.user_data_dir("lastseen"),
        "directory for the embedded PostgreSQL's data and the spool",
        "service",
    ),
    Option(
        "role",
        choice("all", "ingest", "worker"),
        "all",
        "what this instance runs: all, ingest (HTTP only) or worker (pipeline only)",
        "service",
    ),
    # The front door.
    Option(
        "max_body_bytes",
        _positive_int,
        "1048576",
        "largest accepted request body (bytes)",
        "ingest",
    ),
    Option("max_ids", _positive_int, "10000", "most ids in one callback", "ingest"),
    Option(
        "commit_max_batch",
        _positive_int,
        "2000",
        "most callbacks committed in one transaction",
        "ingest",
    ),
    Option("commit_concurrency", _positive_int, "2", "group commits in flight at once", "ingest"),
    Option(
        "commit_timeout",
        _seconds,
        "0.8",
        "seconds a request waits for its commit before it gets 503",
        "ingest",
    ),
    Option(
        "client_rate",
        non_negative(float),
        "0",
        "callbacks per second one client may send (a client: its bearer token, else its "
        "address); beyond, 429 with Retry-After (0: no limit)",
        "ingest",
    ),
    Option(
        "client_burst",
        non_negative(float),
        "0",
        "callbacks one client may send at once above its rate (0: one second's worth)",
        "ingest",
    ),
    Option(
        "webhook_secret",
        _secret,
        None,
        "Standard Webhooks secret (whsec_...): POST /callback must be signed with it",
        "auth",
    ),
    Option("webhook_secret_file", Path, None, "a file holding LASTSEEN_WEBHOOK_SECRET", "auth"),
    Option(
        "intake_token",
        _secret,
        None,
        "bearer token that lets POST /callback in (with a webhook secret too: either will do)",
        "auth",
    ),
    Option("intake_token_file", Path, None, "a file holding LASTSEEN_INTAKE_TOKEN", "auth"),
    Option(
        "admin_token",
        _secret,
        None,
        "bearer token for /objects, /callbacks, /metrics and the dead-letter routes",
        "auth",
    ),
    Option("admin_token_file", Path, None, "a file holding LASTSEEN_ADMIN_TOKEN", "auth"),
    Option(
        "spool_max_bytes",
        non_negative(int),
        str(1 << 30),
        "bytes of callbacks the local spool holds while PostgreSQL is unreachable; beyond, 503 "
        "(0: no spool)",
        "ingest",
    ),
    Option(
        "spool_path",
        Path,
        None,
        "the spool's SQLite file (default: spool/<instance name>.sqlite3 in the data dir); one "
        "per instance",
        "ingest",
    ),
    Option("pool_size", _positive_int, "10", "PostgreSQL connections per process", "service"),
    Option(
        "worker_processes",
        non_negative(int),
        "1",
        "pipeline processes beside the HTTP process (0: all in one process)",
        "service",
    ),
    Option(
        "otlp_endpoint",
        http_url,
        None,
        "OpenTelemetry traces over OTLP/HTTP to this URL, e.g. http://collector:4318/v1/traces "
        "(needs lastseen[tracing]); no tracing when unset",
        "service",
    ),
    Option(
        "instance_id",
        _name,
        None,
        "this instance's name on its leases; a restart under the same name takes back at once "
        "what its predecessor held (default: host name and listen port)",
        "service",
    ),
    Option(
        "parent_pid",
        positive(int),
        None,
        "set by lastseen serve for its worker processes: exit when that process does",
        "service",
    ),
    Option(
        "port_share",
        positive(int),
        "1",
        "set by lastseen serve for its worker processes: how many of them share this host's "
        "ephemeral ports for connections to the upstream",
        "service",
    ),
    # Claiming work from the inbox.
    Option(
        "lease",
        _seconds,
        "5",
        "seconds a claimed callback stays leased to a worker that stops renewing it",
        "worker",
    ),
    Option(
        "poll_interval",
        _seconds,
        "1",
        "seconds between inbox polls when no notification arrives",
        "worker",
    ),
    Option("claim_batch", _positive_int, "200", "most callbacks claimed at once", "worker"),
    Option(
        "max_active_ids",
        _positive_int,
        "400000",
        "most distinct ids of claimed, unfinished callbacks held by one process",
        "worker",
    ),
    Option(
        "max_claims",
        _positive_int,
        "10",
        "claims of one callback without finishing it before it is set aside as poison",
        "worker",
    ),
    Option(
        "max_lookups",
        _positive_int,
        "32768",
        "most upstream lookups in flight at once, per pipeline process (each holds a connection "
        "while it waits; lowered to what the open-file limit and the ephemeral ports allow)",
        "lookups",
    ),
    Option(
        "lookup_rps",
        non_negative(float),
        "0",
        "upstream requests per second at most (0: no limit)",
        "lookups",
    ),
    Option("lookup_timeout", _seconds, "10", "seconds one upstream request may take", "lookups"),
    Option(
        "retry_base", _seconds, "0.5", "first retry delay; it doubles on each attempt", "lookups"
    ),
    Option("retry_max", _seconds, "5", "longest retry delay", "lookups"),
    # Writing results.
    Option(
        "results_batch", _positive_int, "2000", "most results written in one transaction", "results"
    ),
    # 25 ms, not 5: larger batches cost the worker 9 to 24% less CPU per lookup and PostgreSQL
    # 15 to 45% less (more where ids repeat: the newest result per id is written once), for up
    # to 20 ms more median lag (docs/benchmarks.md).
    Option(
        "results_interval", _seconds, "0.025", "seconds results wait to join a batch", "results"
    ),
    # Housekeeping.
    Option("reap_interval", _seconds, "0.2", "seconds between reaper runs", "housekeeping"),
    Option("audit_retention", _seconds, "3600", "seconds done callbacks are kept", "housekeeping"),
    Option(
        "dead_letter_retention",
        _seconds,
        "604800",
        "seconds dead letters are kept",
        "housekeeping",
    ),
    Option(
        "idempotency_retention",
        _seconds,
        "86400",
        "seconds an Idempotency-Key is remembered",
        "housekeeping",
    ),
    Option(
        "prune_interval", _seconds, "10", "seconds between prunes of done callbacks", "housekeeping"
    ),
    Option(
        "shutdown_delay",
        non_negative(float),
        "0",
        "seconds between SIGTERM and closing the listener, with /ready answering 503 and "
        "/callback still accepting (for load balancers)",
        "housekeeping",
    ),
    Option(
        "shutdown_grace",
        non_negative(float),
        "10",
        "seconds shutdown waits for work in flight before it cancels",
        "housekeeping",
    ),
    Option(
        "ui",
        choice("off", "read", "full"),
        "full",
        "the status page at /ui/: off, read (no retry or discard buttons), or full",
        "service",
    ),
    Option(
        "gc_threshold",
        non_negative(int),
        "100000",
        "allocations between young garbage collections in pipeline processes (0: Python's default)",
        "service",
    ),
    Option(
        "event_loop",
        choice("uvloop", "asyncio"),
        "uvloop",
        "event loop of every process: uvloop (libuv), or asyncio's own",
        "service",
    ),
    Option(
        "noop_route",
        boolean,
        "false",
        "also serve POST /noop, which reads the body and answers 202 doing nothing (for bench)",
        "bench",
    ),
    Option(
        "log_format",
        choice("auto", "json", "console"),
        "auto",
        "log format: json, console, or auto (console on a terminal)",
        "logging",
    ),
    Option(
        "log_level",
        choice("debug", "info", "warning", "error"),
        "info",
        "least severe level logged",
        "logging",
    ),
)

_BY_FIELD = {option.field: option for option in OPTIONS}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything configurable, with the defaults used in production."""

    database_url: str | None
    listen: tuple[str, int]
    objects_url: str
    upstream_ca_file: Path | None
    upstream_header: str | None = dataclasses.field(repr=False)
    upstream_header_file: Path | None
    upstream_client_cert: Path | None
    upstream_client_key: Path | None
    ttl: float
    data_dir: Path
    role: str
    max_body_bytes: int
    max_ids: int
    commit_max_batch: int
    commit_concurrency: int
    commit_timeout: float
    client_rate: float
    client_burst: float
    webhook_secret: str | None = dataclasses.field(repr=False)
    webhook_secret_file: Path | None
    intake_token: str | None = dataclasses.field(repr=False)
    intake_token_file: Path | None
    admin_token: str | None = dataclasses.field(repr=False)
    admin_token_file: Path | None
    spool_max_bytes: int
    spool_path: Path | None
    pool_size: int
    worker_processes: int
    otlp_endpoint: str | None
    instance_id: str | None
    parent_pid: int | None
    port_share: int
    lease: float
    poll_interval: float
    claim_batch: int
    max_active_ids: int
    max_claims: int
    max_lookups: int
    lookup_rps: float
    lookup_timeout: float
    retry_base: float
    retry_max: float
    results_batch: int
    results_interval: float
    reap_interval: float
    audit_retention: float
    dead_letter_retention: float
    idempotency_retention: float
    prune_interval: float
    shutdown_delay: float
    shutdown_grace: float
    ui: str
    gc_threshold: int
    event_loop: str
    noop_route: bool
    log_format: str
    log_level: str

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        """Builds settings from defaults, then ``LASTSEEN_*`` variables, then ``overrides``.

        ``overrides`` holds already-parsed values (from flags, or from a test) by field name;
        ``None`` values are ignored so that absent flags fall through to the environment.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for option in OPTIONS:
            raw = env.get(option.env, option.default)
            try:
                values[option.field] = None if raw in (None, "") else option.parse(raw)
            except (ValueError, TypeError) as exc:
                raise ConfigError(option.env, str(exc)) from exc
        for name, value in (overrides or {}).items():
            if name not in _BY_FIELD:
                raise ConfigError(name, "unknown setting")
            if value is not None:
                values[name] = value
        for secret in ("webhook_secret", "intake_token", "admin_token", "upstream_header"):
            path = values.get(f"{secret}_file")
            if path is None:
                continue
            env_name = f"LASTSEEN_{secret.upper()}_FILE"
            if values.get(secret) is not None:
                raise ConfigError(env_name, f"give LASTSEEN_{secret.upper()} or this, not both")
            parse = _header if secret == "upstream_header" else _secret
            try:
                values[secret] = parse(Path(path).read_text().strip())
            except (OSError, ValueError) as exc:
                raise ConfigError(env_name, f"cannot read a secret from {path}: {exc}") from exc
        settings = cls(**values)
        settings.check()
        return settings

    @property
    def takes_callbacks(self) -> bool:
        """Whether this instance serves POST /callback."""
        return self.role in ("all", "ingest")

    @property
    def runs_pipeline(self) -> bool:
        """Whether this instance's own process runs the pipeline (lastseen serve with worker
        processes gives its role "all" to them and keeps "ingest")."""
        return self.role in ("all", "worker")

    def check(self) -> None:
        """Rejects combinations that cannot work, with the setting to fix."""
        if self.lease <= self.poll_interval:
            raise ConfigError("LASTSEEN_LEASE", "must be longer than LASTSEEN_POLL_INTERVAL")
        if self.retry_max < self.retry_base:
            raise ConfigError("LASTSEEN_RETRY_MAX", "must be at least LASTSEEN_RETRY_BASE")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def encode(self) -> bytes:
        """These settings whole, resolved (secrets read from their files included), for
        ``decode`` in a child process: what the parent resolved is what the child runs."""
        return msgspec.json.encode(self, enc_hook=_encode_value)

    @classmethod
    def decode(cls, data: bytes) -> Settings:
        """Settings made by ``encode``; ``ConfigError`` if ``data`` is not that."""
        try:
            settings = msgspec.json.decode(data, type=cls, dec_hook=_decode_value)
        except msgspec.DecodeError as exc:
            raise ConfigError("settings", f"not the settings of a lastseen process: {exc}") from exc
        settings.check()
        return settings


def _encode_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(type(value))


def _decode_value(kind: type, value: Any) -> Any:
    if kind is Path:
        return Path(value)
    raise NotImplementedError(kind)


# Set by lastseen itself, or for its benchmark: accepted, not offered in --help.
INTERNAL = frozenset({"parent_pid", "port_share", "noop_route"})


def add_arguments(
    parser: argparse.ArgumentParser,
    groups: Sequence[str] | None = None,
    *,
    fields: Sequence[str] | None = None,
) -> None:
    """Adds one flag per setting, or per setting of ``groups``, or per one of ``fields``
    (the settings a command uses, so that its --help lists only those) to ``parser``."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for option in OPTIONS:
        if groups is not None and option.group not in groups:
            continue
        if fields is not None and option.field not in fields:
            continue
        section = sections.get(option.group)
        if section is None:
            section = sections[option.group] = parser.add_argument_group(f"{option.group} settings")
        default = "none" if option.default is None else option.default
        section.add_argument(
            option.flag,
            dest=option.field,
            type=option.parse,
            default=None,
            metavar=option.field.split("_")[-1].upper(),
            help=argparse.SUPPRESS
            if option.field in INTERNAL
            else f"{option.help} [env {option.env}, default {default}]",
        )


def from_arguments(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from parsed flags (as added by ``add_arguments``) over the environment."""
    overrides = {field: getattr(args, field) for field in _BY_FIELD if hasattr(args, field)}
    return Settings.load(env, overrides)
