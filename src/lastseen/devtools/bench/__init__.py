"""``lastseen bench``: runner.py runs it, scenarios.py measures, report.py shows."""

from lastseen.devtools.bench.runner import BenchOptions, run
from lastseen.devtools.bench.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "BenchOptions", "run"]
