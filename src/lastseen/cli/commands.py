"""What each ``lastseen`` subcommand does, given its settings and its parsed flags."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec

from lastseen.admin import dead_letters
from lastseen.config.settings import Settings
from lastseen.core.model import DeadLetterFilter
from lastseen.devtools.simulate.config import SimulatorConfig


async def serve(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.runtime.service import run

    return await run(settings)


def _filter(args: argparse.Namespace) -> DeadLetterFilter:
    return dead_letters.parse_filter(
        {
            name: value
            for name in dead_letters.FILTER_FIELDS
            if (value := getattr(args, name)) is not None
        }
    )


async def reset_data(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.admin import data_dir

    found = data_dir.sizes(settings.data_dir)
    data_dir.check_unused(settings.data_dir)
    for entry, size in found.items():
        print(f"{size / 2**20:9.1f} MiB  {entry}")
    total = sum(found.values()) / 2**20
    if not found:
        print(f"{settings.data_dir}: nothing to delete", file=sys.stderr)
    elif args.yes:
        data_dir.reset(settings.data_dir)
        print(f"deleted {total:.1f} MiB from {settings.data_dir}", file=sys.stderr)
    else:
        print(f"{total:.1f} MiB in {settings.data_dir}: run again with --yes to delete it",
              file=sys.stderr)  # fmt: skip
    return 0


async def migrate(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.storage.connect import database

    async with database(settings) as db:
        applied = await db.migrate()
    done = ", ".join(map(str, applied)) if applied else "none: the schema is current"
    print(f"migrations applied: {done}", file=sys.stderr)
    return 0


async def list_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.storage.connect import database

    which = _filter(args)
    async with database(settings) as db:
        await db.migrate()
        counts = await db.count_dead_letters()
        matching = await db.count_matching_dead_letters(which)
        listed = await db.list_dead_letters(which, args.limit)
        for letter, created_at in listed:
            print(msgspec.json.encode(dead_letters.as_json(letter, created_at)).decode())
    print(dead_letters.summary(len(listed), matching, counts, which), file=sys.stderr)
    return 0


async def retry_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.storage.connect import database

    async with database(settings) as db:
        await db.migrate()
        answer = await dead_letters.retry(
            db,
            _filter(args),
            ttl=settings.ttl,
            include_stale=args.include_stale,
            limit=args.limit,
            dry_run=args.dry_run,
        )
    if args.dry_run:
        print(f"{answer.would_retry} dead letters would be queued again", file=sys.stderr)
    else:
        created = answer.callbacks_created or []
        print(f"{len(created)} callbacks queued again for the dead letters' ids", file=sys.stderr)
    if answer.skipped_stale:
        print(
            f"{answer.skipped_stale} dead letters skipped: received more than the TTL ago, "
            "their lookups could change nothing (--include-stale queues them anyway)",
            file=sys.stderr,
        )
    return 0


async def discard_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.storage.connect import database

    async with database(settings) as db:
        await db.migrate()
        answer = await dead_letters.discard(
            db, _filter(args), limit=args.limit, dry_run=args.dry_run
        )
    if args.dry_run:
        print(f"{answer.would_discard} dead letters would be discarded", file=sys.stderr)
    else:
        print(f"{answer.discarded} dead letters discarded", file=sys.stderr)
    return 0


async def drain_spool(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.config.instance import named
    from lastseen.intake.drain import drain_batch
    from lastseen.intake.spool import Spool, spool_path
    from lastseen.storage.connect import database

    paths: list[Path] = args.files or [spool_path(named(settings))]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        print(f"lastseen: no spool file at {', '.join(missing)}", file=sys.stderr)
        return 2
    async with database(settings) as db:
        await db.migrate()
        for path in paths:
            spool = Spool(path, max_bytes=0)
            await spool.open()
            moved = 0
            try:
                while drained := await drain_batch(spool, db):
                    moved += drained
            finally:
                await spool.close()
            await db.notify_inbox()
            print(f"{path}: {moved} callbacks moved into the inbox", file=sys.stderr)
    return 0


async def import_files(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.admin.importer import run

    return await run(
        settings,
        args.files,
        fmt=args.format,
        column=args.column,
        ids_per_callback=args.ids_per_callback,
        chunk=args.chunk,
        source=args.source,
        rejects=args.rejects,
        allow_rejects=args.allow_rejects,
    )


async def bench(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.devtools.bench import SCENARIOS, BenchOptions, run

    scenarios = tuple(SCENARIOS) if args.scenario == "all" else tuple(args.scenario.split(","))
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        print(f"lastseen bench: unknown scenario {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    out = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    options = BenchOptions(scenarios=scenarios, out_dir=out, database_url=settings.database_url)
    names = ("seconds", "connections", "rounds", "step_seconds", "ttl", "soak_seconds")
    for name in (*names, "crash_seconds", "nemesis_fault_seconds"):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    if args.rates:
        options.rates = tuple(float(r) for r in args.rates.split(","))
    if args.nemesis_configurations:
        options.nemesis_configurations = tuple(args.nemesis_configurations.split(","))
        unknown = set(options.nemesis_configurations) - {"reference", "production"}
        if unknown:
            print(f"lastseen bench: unknown configuration {', '.join(sorted(unknown))}",
                  file=sys.stderr)  # fmt: skip
            return 2
    options.watch_status = args.watch_status
    options.worker_processes = args.worker_processes
    if args.upstream_processes is not None:
        options.upstream_processes = args.upstream_processes
    if args.smoke:
        options = options.smoke()
    return await run(options)


async def simulate(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.devtools.simulate.run import run

    return await run(SimulatorConfig.from_arguments(args))


async def verify(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.devtools.verify import run

    return await run(
        settings,
        args.truth_dir,
        edge=args.edge,
        online_rule=args.online,
        seed=args.seed,
        max_examples=args.examples,
        expect=tuple(args.expect),
    )


async def demo(settings: Settings, args: argparse.Namespace) -> int:
    from lastseen.devtools.demo import DemoOptions, run

    # The demo runs its own upstream, and the whole pipeline inside its one process (its
    # dashboard reads the pipeline's metrics there): flags that say otherwise cannot apply.
    if args.objects_url is not None or settings.role != "all" or args.worker_processes:
        print(
            "lastseen demo: runs its own upstream, and every role in one process: leave out "
            "--objects-url, --role and --worker-processes",
            file=sys.stderr,
        )
        return 2
    sim = SimulatorConfig.from_arguments(args)
    if args.scenario == "story":
        if args.rate > 0:
            print(
                "lastseen demo: the story sends its own callbacks; --rate goes with "
                "--scenario reference",
                file=sys.stderr,
            )
            return 2
        sim = sim.with_story(settings.ttl)
    options = DemoOptions(
        refresh=args.refresh,
        progress_every=args.progress_every,
        drain_timeout=args.drain_timeout,
        window=args.window,
        edge=args.edge,
        live=False if args.plain else None,
    )
    return await run(settings, sim, options)
