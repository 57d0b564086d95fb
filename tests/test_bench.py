"""A smoke run of every benchmark scenario, so that the benchmark never breaks.

No test here asserts a timing: figures are for `lastseen bench`, on a quiet machine.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lastseen.devtools.bench import SCENARIOS
from lastseen.devtools.launch import LASTSEEN, clean_environment

# Run apart: all at once came to the 120 s a test has. On a loaded machine a group can take
# twice its 45 to 55 s, so these tests have 240 s (the figures are not timed here).
FAILURES = ("crash", "upstream-outage", "hostile-upstream", "database-outage", "overload", "reaper")
APART = ("tls", "nemesis", *FAILURES)


def _smoke(out: Path, scenarios: list[str], *more: str) -> dict[str, Any]:
    command = [*LASTSEEN, "bench", "--scenario", ",".join(scenarios), "--smoke", "--out", str(out)]
    done = subprocess.run(
        [*command, *more],
        capture_output=True,
        text=True,
        timeout=230,
        env=clean_environment(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    assert set(results["scenarios"]) == set(scenarios)
    return results


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_scenario_runs_and_writes_its_report(tmp_path: Path) -> None:
    """`lastseen bench --smoke` of every scenario (but those run apart) exits 0 and writes the
    JSON, the table and the PNG, with every scenario's figures and the machine it ran on."""
    out = tmp_path / "bench"
    results = _smoke(out, [name for name in SCENARIOS if name not in APART])
    assert results["machine"]["cores"] >= 1
    assert results["postgresql"]
    ingest = results["scenarios"]["ingest"]
    assert ingest["acknowledged"] == ingest["stored_rows"] > 0
    assert ingest["noop_per_s_median"] > 0
    for run in results["scenarios"]["pipeline"]["distributions"].values():
        assert run["steps"]
        assert run["steps"][0]["lookups_per_s"] > 0
    expiry = results["scenarios"]["expiry"]
    assert expiry["objects"] == expiry["expected_objects"]
    assert expiry["deleted_before_ttl"] == 0
    assert results["scenarios"]["soak"]["samples"]
    box = results["scenarios"]["box"]
    assert box["every_callback_processed"]
    assert all(r["stored"] == r["acknowledged"] > 0 for r in box["rounds"])
    assert box["rounds"][0]["cpu_us_per_callback"]["total"] > 0
    inflight = results["scenarios"]["inflight"]
    assert inflight["all_looked_up"]
    assert inflight["lookups_in_flight_peak"] > 0
    assert inflight["worker_kib_per_lookup_in_flight"] is not None
    report = (out / "report.txt").read_text()
    assert "durable/do-nothing" in report
    assert "expiry:" in report
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_tls_scenario_measures_both_schemes(tmp_path: Path) -> None:
    """`lastseen bench --scenario tls --smoke`: CPU per lookup over HTTP and over HTTPS, and
    the lookup client's per GET on new and pooled connections (or why it was skipped)."""
    out = tmp_path / "bench"
    tls = _smoke(out, ["tls"])["scenarios"]["tls"]
    if "skipped" in tls:
        pytest.skip(tls["skipped"])
    assert {step["scheme"] for step in tls["steps"]} == {"http", "https"}
    assert all(step["lookups_per_s"] > 0 for step in tls["steps"])
    assert tls["worker_cpu_us_per_lookup_https"] > 0
    assert set(tls["client_cpu_us_per_get"]) == {"http", "https"}
    assert "tls: worker cpu" in (out / "report.txt").read_text()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_failure_scenarios_run(tmp_path: Path) -> None:
    """`lastseen bench --smoke` of the failure scenarios exits 0 with each one's figures."""
    out = tmp_path / "bench"
    results = _smoke(out, list(FAILURES))
    assert all(results["scenarios"][name] for name in FAILURES)


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("configuration", ["reference", "production"])
def test_the_nemesis_runs_every_fault_and_nothing_acknowledged_is_missed(
    tmp_path: Path, configuration: str
) -> None:
    """`lastseen bench --scenario nemesis --smoke`, in the reference configuration and in
    production's (secrets from files, an admin token, signed POSTs, two worker processes):
    each fault runs (or says why it cannot be made here), every POST gets a 202 but where the
    spool's disk is full, where it may get 503 and never a false 202; no acknowledged id is
    missing from `objects`; every /ready probe is answered; with clocks 2 s apart no object
    is deleted before its TTL."""
    out = tmp_path / "bench"
    nemesis = _smoke(out, ["nemesis"], "--nemesis-configurations", configuration)
    faults = nemesis["scenarios"]["nemesis"]["configurations"][configuration]
    assert list(faults) == [
        "refused", "read-only", "partition", "failover", "paused-worker", "spool-disk-full",
        "skew",
    ]  # fmt: skip
    ran = {name: f for name, f in faults.items() if "skipped" not in f}
    assert {"refused", "read-only", "partition", "paused-worker", "skew"} <= set(ran), faults
    for name, f in ran.items():
        allowed = {"202", "503"} if name == "spool-disk-full" else {"202"}
        assert set(f["statuses"]) <= allowed, (name, f)
        assert f["acknowledged"] > 0, (name, f)
        assert f["missed_ids"] == 0, (name, f)
        assert f["ready_probes"] > 0
        assert "0" not in f["ready_statuses"], (name, f)
    # Instances 2 s ahead and 2 s behind: every object deleted, none before its TTL.
    for expiry in ran["skew"]["expiry"].values():
        assert expiry["deleted"] == expiry["ids"] > 0, expiry
        assert expiry["deleted_before_ttl"] == 0, expiry
    if "spool-disk-full" in ran:
        assert "503" in ran["spool-disk-full"]["statuses"], ran["spool-disk-full"]
    assert f"nemesis, {configuration} configuration" in (out / "report.txt").read_text()
