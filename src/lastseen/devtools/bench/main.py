"""``lastseen bench``: runs the chosen scenarios and writes the results, the table and the plot."""

from __future__ import annotations

import dataclasses
import json
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from lastseen.devtools.bench.report import plot, render
from lastseen.devtools.bench.runner import Bench, BenchOptions
from lastseen.devtools.bench.scenarios import SCENARIOS
from lastseen.runtime.limits import ephemeral_ports, raise_open_file_limit


def machine() -> dict[str, Any]:
    """The machine, with the two limits that cap the lookups in flight (limits.py)."""
    ports = ephemeral_ports()
    return {
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "open_file_limit": raise_open_file_limit(),
        "ephemeral_ports": None if ports is None else f"{ports[0]}-{ports[1]}",
    }


async def run(options: BenchOptions) -> int:
    options.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(options).items()
        },
        "scenarios": {},
    }
    async with Bench(options) as bench:
        results["postgresql"] = await bench.postgres_version()
        for name in options.scenarios:
            bench.progress(f"scenario {name}")
            results["scenarios"][name] = await SCENARIOS[name](bench)
            (options.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    report = render(results)
    (options.out_dir / "report.txt").write_text(report)
    print(report)
    if plot(results, options.out_dir / "bench.png"):
        print(f"wrote {options.out_dir / 'results.json'}, report.txt and bench.png")
    else:
        print(
            f"wrote {options.out_dir / 'results.json'} and report.txt (no plot: pip install "
            "'lastseen[plot]' for matplotlib)"
        )
    return 0
