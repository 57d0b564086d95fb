"""The ``lastseen`` command: parses flags into settings and calls one function per subcommand."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import msgspec

from lastseen import __version__, logs
from lastseen.errors import LastseenError
from lastseen.settings import Settings, add_arguments, from_arguments

Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.app import run

    return await run(settings)


async def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.app import close_database, open_database

    db, embedded = await open_database(settings)
    try:
        await db.migrate()
        counts = await db.count_dead_letters()
        for letter in await db.list_dead_letters(args.limit):
            print(msgspec.json.encode(letter).decode())
        total = sum(counts.values())
        by_reason = ", ".join(f"{reason}: {n}" for reason, n in counts.items()) or "none"
        print(f"{total} dead letters ({by_reason})", file=sys.stderr)
    finally:
        await close_database(db, embedded)
    return 0


async def _retry_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.app import close_database, open_database

    db, embedded = await open_database(settings)
    try:
        await db.migrate()
        created = await db.retry_dead_letters(args.limit)
        print(f"{len(created)} callbacks queued again for the dead letters' ids", file=sys.stderr)
    finally:
        await close_database(db, embedded)
    return 0


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
    serve.set_defaults(run=_serve)

    dead = commands.add_parser("dead-letters", help="list the ids that could not be looked up")
    add_arguments(dead, ["service", "logging"])
    dead.add_argument("--limit", type=int, default=1000, help="most dead letters listed")
    dead.set_defaults(run=_dead_letters)

    retry = commands.add_parser(
        "retry-dead-letters", help="queue the dead letters' ids for lookup again"
    )
    add_arguments(retry, ["service", "logging"])
    retry.add_argument("--limit", type=int, default=100_000, help="most dead letters retried")
    retry.set_defaults(run=_retry_dead_letters)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = from_arguments(args)
    except LastseenError as exc:
        parser.error(str(exc))
    logs.configure(settings.log_format, settings.log_level)
    command: Command = args.run
    try:
        status = asyncio.run(command(settings, args))
    except LastseenError as exc:
        print(f"lastseen: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
