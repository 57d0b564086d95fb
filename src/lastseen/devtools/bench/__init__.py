"""``lastseen bench``: main.py runs it, scenarios.py measures, report.py shows."""

from lastseen.devtools.bench.main import run
from lastseen.devtools.bench.runner import BenchOptions
from lastseen.devtools.bench.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "BenchOptions", "run"]
