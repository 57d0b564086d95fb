"""Configuration, read once into one typed object.

Every setting has a command-line flag and a ``LASTSEEN_*`` environment variable; the flag wins.
Nothing else in the package reads ``os.environ``: components get a ``Settings`` and nothing more.
Every interval and limit is here so that tests can run the whole system with compressed time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import platformdirs

from lastseen.config.options import (
    header_line,
    label,
    options_of,
    positive_int,
    postgresql_url,
    seconds,
    secret_text,
    setting,
)
from lastseen.core.errors import ConfigError
from lastseen.core.parsers import boolean, choice, host_port, http_url, non_negative, positive


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything configurable, with the defaults used in production."""

    # Where things are.
    database_url: str | None = setting(
        postgresql_url,
        None,
        "PostgreSQL URL; without it lastseen starts its own embedded PostgreSQL in the data dir",
        "service",
    )
    listen: tuple[str, int] = setting(
        host_port, "127.0.0.1:9090", "host:port the HTTP server listens on", "service"
    )
    objects_url: str = setting(
        http_url, "http://127.0.0.1:9010", "base URL of the upstream", "service"
    )
    upstream_ca_file: Path | None = setting(
        Path,
        None,
        "PEM file of the CA(s) that sign the upstream's HTTPS certificate (default: the system's)",
        "lookups",
    )
    upstream_header: str | None = setting(
        header_line,
        None,
        "a header sent with every lookup, e.g. 'Authorization: Bearer ...' (never logged)",
        "lookups",
        secret=True,
    )
    upstream_header_file: Path | None = setting(
        Path, None, "a file holding LASTSEEN_UPSTREAM_HEADER", "lookups"
    )
    upstream_client_cert: Path | None = setting(
        Path,
        None,
        "PEM file of a client certificate (and its key, unless LASTSEEN_UPSTREAM_CLIENT_KEY) for "
        "an upstream that asks for one",
        "lookups",
    )
    upstream_client_key: Path | None = setting(
        Path, None, "PEM file of the client certificate's key", "lookups"
    )
    ttl: float = setting(seconds, "30", "seconds an object stays after it was last seen", "service")
    data_dir: Path = setting(
        Path,
        platformdirs.user_data_dir("lastseen"),
        "directory for the embedded PostgreSQL's data and the spool",
        "service",
    )
    role: str = setting(
        choice("all", "ingest", "worker"),
        "all",
        "what this instance runs: all, ingest (HTTP only) or worker (pipeline only)",
        "service",
    )
    # The front door.
    max_body_bytes: int = setting(
        positive_int, "1048576", "largest accepted request body (bytes)", "ingest"
    )
    max_ids: int = setting(positive_int, "10000", "most ids in one callback", "ingest")
    commit_max_batch: int = setting(
        positive_int, "2000", "most callbacks committed in one transaction", "ingest"
    )
    commit_concurrency: int = setting(
        positive_int, "2", "group commits in flight at once", "ingest"
    )
    commit_timeout: float = setting(
        seconds, "0.8", "seconds a request waits for its commit before it gets 503", "ingest"
    )
    client_rate: float = setting(
        non_negative(float),
        "0",
        "callbacks per second one client may send (a client: its bearer token, else its "
        "address); beyond, 429 with Retry-After (0: no limit)",
        "ingest",
    )
    client_burst: float = setting(
        non_negative(float),
        "0",
        "callbacks one client may send at once above its rate (0: one second's worth)",
        "ingest",
    )
    webhook_secret: str | None = setting(
        secret_text,
        None,
        "Standard Webhooks secret (whsec_...): POST /callback must be signed with it",
        "auth",
        secret=True,
    )
    webhook_secret_file: Path | None = setting(
        Path, None, "a file holding LASTSEEN_WEBHOOK_SECRET", "auth"
    )
    intake_token: str | None = setting(
        secret_text,
        None,
        "bearer token that lets POST /callback in (with a webhook secret too: either will do)",
        "auth",
        secret=True,
    )
    intake_token_file: Path | None = setting(
        Path, None, "a file holding LASTSEEN_INTAKE_TOKEN", "auth"
    )
    admin_token: str | None = setting(
        secret_text,
        None,
        "bearer token for /objects, /callbacks, /metrics and the dead-letter routes",
        "auth",
        secret=True,
    )
    admin_token_file: Path | None = setting(
        Path, None, "a file holding LASTSEEN_ADMIN_TOKEN", "auth"
    )
    spool_max_bytes: int = setting(
        non_negative(int),
        str(1 << 30),
        "bytes of callbacks the local spool holds while PostgreSQL is unreachable; beyond, 503 "
        "(0: no spool)",
        "ingest",
    )
    spool_path: Path | None = setting(
        Path,
        None,
        "the spool's SQLite file (default: spool/<instance name>.sqlite3 in the data dir); one "
        "per instance",
        "ingest",
    )
    pool_size: int = setting(positive_int, "10", "PostgreSQL connections per process", "service")
    database_tcp_timeout: float = setting(
        non_negative(float),
        "10",
        "seconds after which a TCP connection to PostgreSQL that stopped answering (its packets "
        "dropped) is abandoned: TCP keepalive and TCP_USER_TIMEOUT on every socket (0: the "
        "system's defaults, minutes)",
        "service",
    )
    worker_processes: int = setting(
        non_negative(int),
        "1",
        "pipeline processes beside the HTTP process (0: all in one process)",
        "service",
    )
    otlp_endpoint: str | None = setting(
        http_url,
        None,
        "OpenTelemetry traces over OTLP/HTTP to this URL, e.g. http://collector:4318/v1/traces "
        "(needs lastseen[tracing]); no tracing when unset",
        "service",
    )
    instance_id: str | None = setting(
        label,
        None,
        "this instance's name on its leases; a restart under the same name takes back at once "
        "what its predecessor held (default: host name and listen port)",
        "service",
    )
    parent_pid: int | None = setting(
        positive(int),
        None,
        "set by lastseen serve for its worker processes: exit when that process does",
        "service",
    )
    exit_with: int | None = setting(
        positive(int),
        None,
        "set by the tools that launch lastseen (tests, bench): stop when that process is gone",
        "service",
    )
    port_share: int = setting(
        positive(int),
        "1",
        "set by lastseen serve for its worker processes: how many of them share this host's "
        "ephemeral ports for connections to the upstream",
        "service",
    )
    # Claiming work from the inbox.
    lease: float = setting(
        seconds,
        "5",
        "seconds a claimed callback stays leased to a worker that stops renewing it",
        "worker",
    )
    poll_interval: float = setting(
        seconds, "1", "seconds between inbox polls when no notification arrives", "worker"
    )
    claim_batch: int = setting(positive_int, "200", "most callbacks claimed at once", "worker")
    max_active_ids: int = setting(
        positive_int,
        "400000",
        "most distinct ids of claimed, unfinished callbacks held by one process",
        "worker",
    )
    max_claims: int = setting(
        positive_int,
        "10",
        "claims of one callback without finishing it before it is set aside as poison",
        "worker",
    )
    max_lookups: int = setting(
        positive_int,
        "32768",
        "most upstream lookups in flight at once, per pipeline process (each holds a connection "
        "while it waits; lowered to what the open-file limit and the ephemeral ports allow)",
        "lookups",
    )
    lookup_rps: float = setting(
        non_negative(float), "0", "upstream requests per second at most (0: no limit)", "lookups"
    )
    lookup_timeout: float = setting(
        seconds, "10", "seconds one upstream request may take", "lookups"
    )
    retry_base: float = setting(
        seconds, "0.5", "first retry delay; it doubles on each attempt", "lookups"
    )
    retry_max: float = setting(seconds, "5", "longest retry delay", "lookups")
    # Writing results.
    results_batch: int = setting(
        positive_int, "2000", "most results written in one transaction", "results"
    )
    # 25 ms, not 5: larger batches cost the worker 9 to 24% less CPU per lookup and PostgreSQL
    # 15 to 45% less (more where ids repeat: the newest result per id is written once), for up
    # to 20 ms more median lag (docs/explanation/design-decisions.md).
    results_interval: float = setting(
        seconds, "0.025", "seconds results wait to join a batch", "results"
    )
    # Housekeeping.
    reap_interval: float = setting(seconds, "0.2", "seconds between reaper runs", "housekeeping")
    audit_retention: float = setting(
        seconds, "3600", "seconds done callbacks are kept", "housekeeping"
    )
    dead_letter_retention: float = setting(
        seconds, "604800", "seconds dead letters are kept", "housekeeping"
    )
    idempotency_retention: float = setting(
        seconds, "86400", "seconds an Idempotency-Key is remembered", "housekeeping"
    )
    prune_interval: float = setting(
        seconds, "10", "seconds between prunes of done callbacks", "housekeeping"
    )
    shutdown_delay: float = setting(
        non_negative(float),
        "0",
        "seconds between SIGTERM and closing the listener, with /ready answering 503 and "
        "/callback still accepting (for load balancers)",
        "housekeeping",
    )
    shutdown_grace: float = setting(
        non_negative(float),
        "10",
        "seconds shutdown waits for work in flight before it cancels",
        "housekeeping",
    )
    ui: str = setting(
        choice("off", "read", "full"),
        "full",
        "the status page at /ui/: off, read (no retry or discard buttons), or full",
        "service",
    )
    gc_threshold: int = setting(
        non_negative(int),
        "100000",
        "allocations between young garbage collections in pipeline processes (0: Python's default)",
        "service",
    )
    event_loop: str = setting(
        choice("uvloop", "asyncio"),
        "uvloop",
        "event loop of every process: uvloop (libuv), or asyncio's own",
        "service",
    )
    noop_route: bool = setting(
        boolean,
        "false",
        "also serve POST /noop, which reads the body and answers 202 doing nothing (for bench)",
        "bench",
    )
    log_format: str = setting(
        choice("auto", "json", "console"),
        "auto",
        "log format: json, console, or auto (console on a terminal)",
        "logging",
    )
    log_level: str = setting(
        choice("debug", "info", "warning", "error"), "info", "least severe level logged", "logging"
    )

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
            if name not in BY_FIELD:
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
            parse = header_line if secret == "upstream_header" else secret_text
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


OPTIONS = options_of(Settings)
BY_FIELD = {option.field: option for option in OPTIONS}


def _encode_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(type(value))


def _decode_value(kind: type, value: Any) -> Any:
    if kind is Path:
        return Path(value)
    raise NotImplementedError(kind)
