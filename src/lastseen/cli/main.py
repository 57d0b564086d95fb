"""The ``lastseen`` command: parses flags into settings and calls one function per subcommand."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from lastseen import __version__
from lastseen.cli import commands as do
from lastseen.config.arguments import add_arguments, from_arguments
from lastseen.config.settings import Settings
from lastseen.core.errors import LastseenError
from lastseen.core.parsers import PAGE_LIMIT
from lastseen.devtools.simulate.config import add_arguments as add_simulator_arguments
from lastseen.runtime.lifetime import stop_deadline, watch_launcher
from lastseen.runtime.limits import raise_open_file_limit
from lastseen.runtime.processes import WORKER_COMMAND
from lastseen.telemetry import logs

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lastseen",
        description="Durable callback service: keeps the online objects and when they were "
        "last seen. Every setting is a flag here and a LASTSEEN_* environment variable.",
    )
    parser.add_argument("--version", action="version", version=f"lastseen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service (HTTP ingest and the pipeline)")
    add_arguments(serve)
    serve.set_defaults(run=do.serve)
    # Started by lastseen serve, with its settings on standard input; not listed in --help.
    commands.add_parser(WORKER_COMMAND).set_defaults(run=do.serve)

    dead = commands.add_parser("dead-letters", help="list the ids that could not be looked up")
    _dead_letter_arguments(dead, limit=PAGE_LIMIT)
    dead.set_defaults(run=do.list_dead_letters)

    retry = commands.add_parser(
        "retry-dead-letters", help="queue the dead letters' ids for lookup again"
    )
    _dead_letter_arguments(retry, limit=100_000, ttl=True)
    retry.add_argument(
        "--include-stale",
        action="store_true",
        help="also queue dead letters received more than the TTL ago",
    )
    retry.add_argument("--dry-run", action="store_true", help="only say how many would go")
    retry.set_defaults(run=do.retry_dead_letters)

    discard = commands.add_parser("discard-dead-letters", help="give up on dead letters")
    _dead_letter_arguments(discard, limit=100_000)
    discard.add_argument("--dry-run", action="store_true", help="only say how many would go")
    discard.set_defaults(run=do.discard_dead_letters)

    reset = commands.add_parser(
        "reset-data",
        help="delete what lastseen keeps in its data directory (back to a clean slate)",
        description="Lists what the data directory holds (the embedded PostgreSQL's data, "
        "spools, the demo's ground truth and logs) and, with --yes, deletes it. Refuses while "
        "a lastseen process or its embedded PostgreSQL uses it, and while a spool holds "
        "callbacks not delivered yet.",
    )
    add_arguments(reset, fields=("data_dir", "log_format", "log_level"))
    reset.add_argument("--yes", action="store_true", help="delete; without it, only list")
    reset.set_defaults(run=do.reset_data)

    migrate = commands.add_parser(
        "migrate",
        help="apply the database migrations this lastseen has and the database lacks",
        description="Applies the migrations the database lacks, then exits: for an owner role "
        "that migrates before a less privileged serving role starts (every command also "
        "migrates first, as far as its role may).",
    )
    add_arguments(migrate, fields=DATABASE_FIELDS)
    migrate.set_defaults(run=do.migrate)

    drain = commands.add_parser(
        "drain-spool",
        help="move a spool's callbacks into the database (a spool whose instance is gone)",
        description="Moves the callbacks of each spool FILE (default: this instance's spool) "
        "into the inbox, in the order they were spooled, with their receive times; a callback "
        "already moved is not stored twice. A running instance drains its own spool by itself.",
    )
    add_arguments(drain, fields=(*DATABASE_FIELDS, "spool_path", "instance_id", "listen"))
    drain.add_argument("files", nargs="*", type=Path, metavar="FILE", help="a spool file")
    drain.set_defaults(run=do.drain_spool)

    imports = commands.add_parser(
        "import",
        help="store callbacks from files (CSV, JSON lines, gzip) through the durable inbox",
        description="Reads each FILE (- for standard input) and stores its callbacks in the "
        "inbox in chunks, validated like POST /callback; bad records are skipped and "
        "reported. Importing the same file again, or resuming a killed import, stores nothing "
        "twice. Exits 1 if any record was rejected, unless --allow-rejects.",
    )
    add_arguments(imports, fields=(*DATABASE_FIELDS, "max_ids"))
    imports.add_argument("files", nargs="+", metavar="FILE", help="a file, or - for stdin")
    imports.add_argument(
        "--format", choices=("auto", "csv", "jsonl"), default="auto", help="[by extension]"
    )
    imports.add_argument(
        "--column", help="CSV: the column holding one id per row [object_ids: a list per row]"
    )
    imports.add_argument(
        "--ids-per-callback",
        type=int,
        default=200,
        help="with --column: ids grouped into one callback [200]",
    )
    imports.add_argument(
        "--chunk", type=int, default=1000, help="callbacks stored per transaction [1000]"
    )
    imports.add_argument(
        "--source", help="the name of the source in its records' keys [file name and digest]"
    )
    imports.add_argument("--rejects", type=Path, help="write each rejected record here")
    imports.add_argument(
        "--allow-rejects", action="store_true", help="exit 0 even if records were rejected"
    )
    imports.set_defaults(run=do.import_files)

    bench = commands.add_parser(
        "bench", help="measure the whole system on this machine (see docs/benchmarks.md)"
    )
    bench.add_argument(
        "--scenario",
        default="all",
        help="all, or a comma-separated list of: ingest, pipeline, tls, expiry, soak, crash, "
        "upstream-outage, hostile-upstream, database-outage, nemesis, overload, reaper, scale, "
        "inflight, box",
    )
    bench.add_argument("--out", type=Path, help="output directory [bench-results/TIMESTAMP]")
    bench.add_argument("--database-url", help="PostgreSQL server to use [a fresh embedded one]")
    bench.add_argument("--seconds", type=float, help="ingest: seconds per round [5]")
    bench.add_argument("--connections", type=int, help="ingest and box: connections [64]")
    bench.add_argument("--rounds", type=int, help="ingest: rounds per handler [3]")
    bench.add_argument("--rates", help="pipeline: callback rates per second to step through")
    bench.add_argument("--step-seconds", type=float, help="pipeline: seconds per step [20]")
    bench.add_argument("--ttl", type=float, help="expiry: the TTL in seconds [5]")
    bench.add_argument("--soak-seconds", type=float, help="soak: duration in seconds [600]")
    bench.add_argument("--crash-seconds", type=float, help="crash: duration in seconds [60]")
    bench.add_argument(
        "--nemesis-fault-seconds", type=float, help="nemesis: seconds each fault lasts [12]"
    )
    bench.add_argument(
        "--nemesis-configurations",
        help="nemesis: reference (no credentials, one worker process), production (secrets "
        "from files, an admin token, signed POSTs, two worker processes), or both "
        "[reference,production]",
    )
    bench.add_argument(
        "--worker-processes",
        type=int,
        help="worker processes of each lastseen serve with the default role [serve's default]",
    )
    bench.add_argument(
        "--upstream-processes",
        type=int,
        help="pipeline: processes of the simulated upstream, on one port [1] (each process may "
        "hold only so many connections, one per lookup in flight)",
    )
    bench.add_argument(
        "--watch-status",
        action="store_true",
        help="ingest: read GET /status every 2 s throughout, as an open status page does",
    )
    bench.add_argument("--smoke", action="store_true", help="tiny, seconds-long run (for tests)")
    bench.add_argument("--log-format", default="auto", choices=("auto", "json", "console"))
    bench.add_argument("--log-level", default="warning")
    bench.set_defaults(run=do.bench)

    simulate = commands.add_parser(
        "simulate",
        help="run the simulated producer and upstream (--mode both, upstream or producer)",
        description="The reference producer and upstream, in one process or either alone. "
        "Defaults behave like the reference program; --truth-dir records a run for "
        "lastseen verify.",
    )
    add_arguments(simulate, ["logging"])
    add_simulator_arguments(simulate)
    simulate.set_defaults(run=do.simulate)

    check = commands.add_parser(
        "verify",
        help="check a simulated run's ground truth against the database",
        description="Exits 0 if every acknowledged callback was processed and objects holds "
        "exactly the online ids seen within the TTL; 1, with examples, otherwise. Run it while "
        "the service runs (its reaper keeps deleting what expires), with the service's --ttl.",
    )
    add_arguments(check, fields=(*DATABASE_FIELDS, "ttl", "reap_interval", "audit_retention"))
    check.add_argument(
        "--truth-dir", type=Path, required=True, help="the --truth-dir of lastseen simulate"
    )
    check.add_argument(
        "--edge",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="ids last seen between TTL-EDGE and TTL+REAP_INTERVAL+EDGE ago are accepted with "
        "or without a row [0.25]",
    )
    check.add_argument(
        "--online",
        metavar="RULE",
        help="even or random:P: which ids are online, when the run recorded no upstream answers",
    )
    check.add_argument("--seed", type=int, default=0, help="the simulator's --seed, for random:P")
    check.add_argument("--examples", type=int, default=5, help="examples listed per discrepancy")
    check.add_argument(
        "--expect",
        choices=("expired", "offline"),
        action="append",
        default=[],
        help="fail unless the run deleted objects this way (by the TTL, or for going "
        "offline); may be repeated [expect neither]",
    )
    check.set_defaults(run=do.verify)

    demo = commands.add_parser(
        "demo",
        help="run the service, the simulator and a live dashboard in one process, then verify",
        description="Starts the embedded PostgreSQL (in DATA_DIR/demo, emptied each run), the "
        "service, the simulated upstream and producer; shows a dashboard (and, in the default "
        "story, names each deletion and dead letter as it happens) until Ctrl-C or "
        "--duration; then lets the pipeline finish, verifies the run and prints a summary. "
        "Exits 1 if the verification fails. See docs/guides/demo.md.",
    )
    add_arguments(
        demo, ["service", "ingest", "worker", "lookups", "results", "housekeeping", "logging"]
    )
    add_simulator_arguments(demo, standalone=False)
    shown = demo.add_argument_group("dashboard")
    shown.add_argument(
        "--scenario",
        choices=("story", "reference"),
        default="story",
        help="story: a scripted run that shows expiry, offline, coalescing and a dead letter "
        "retried, 2 x TTL long unless --duration says otherwise; reference: the reference "
        "producer's random ids (with --rate, --id-universe ...), until Ctrl-C [story]",
    )
    shown.add_argument(
        "--refresh", type=float, default=0.5, metavar="SECONDS", help="live view refresh [0.5]"
    )
    shown.add_argument(
        "--progress-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="without a terminal: seconds between progress lines [5]",
    )
    shown.add_argument(
        "--plain", action="store_true", help="progress lines even on a terminal, no live view"
    )
    shown.add_argument(
        "--window",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="recent window of the latency quantiles and rates [30]",
    )
    shown.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after the producer stops, most seconds to wait for pending callbacks [30]",
    )
    shown.add_argument(
        "--edge",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="verification tolerance at the TTL edge (see lastseen verify --help) [0.25]",
    )
    demo.set_defaults(run=do.demo)
    return parser


# What the commands that only talk to the database use of the settings.
DATABASE_FIELDS = ("database_url", "data_dir", "log_format", "log_level")


def _dead_letter_arguments(
    parser: argparse.ArgumentParser, *, limit: int, ttl: bool = False
) -> None:
    add_arguments(parser, fields=(*DATABASE_FIELDS, "ttl") if ttl else DATABASE_FIELDS)
    which = parser.add_argument_group("which dead letters")
    which.add_argument("--reason", help="only this reason (e.g. http_4xx, poison)")
    which.add_argument("--callback", dest="callback_id", help="only this callback's")
    which.add_argument(
        "--received-before", metavar="TIME", help="only received before (ISO 8601 or epoch s)"
    )
    which.add_argument(
        "--received-after", metavar="TIME", help="only received at or after (ISO 8601 or epoch s)"
    )
    which.add_argument("--limit", type=int, default=limit, help=f"at most this many [{limit}]")


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop" and sys.platform != "win32":
        import uvloop

        return uvloop.new_event_loop
    return None


def _command_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The command's own usage, not the top level's: it lists the flags that exist.
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == WORKER_COMMAND:
            settings = Settings.decode(sys.stdin.buffer.read())
        else:
            settings = from_arguments(args)
    except LastseenError as exc:
        parser.error(str(exc))
    logs.tolerate_lost_stderr()
    logs.configure(settings.log_format, settings.log_level)
    if settings.exit_with is not None:
        watch_launcher(settings.exit_with, stop_deadline(settings))
    raise_open_file_limit()
    command: Command = args.run
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            status = runner.run(command(settings, args))
    except LastseenError as exc:
        print(f"lastseen: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
