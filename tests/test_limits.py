"""The lookups cap fitted to what the host allows one process."""

from __future__ import annotations

import logging
from pathlib import Path

import structlog
import structlog.testing

from lastseen.config.settings import Settings
from lastseen.runtime.limits import FD_MARGIN, fit_lookups, raise_open_file_limit
from lastseen.runtime.processes import child_settings

SET = 15_000  # LASTSEEN_MAX_LOOKUPS in these tests


def _range(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    return path


def _files() -> int:
    """What this machine's open-file limit leaves for lookups (the other bound)."""
    return raise_open_file_limit() - FD_MARGIN


def test_the_cap_stays_below_the_costly_half_of_the_ephemeral_ports(tmp_path: Path) -> None:
    """With Linux's default range (32768-60999), a worker keeps at most 95% of half the range
    in flight: past that, every connect to the one upstream address scans the ports in use."""
    settings = Settings.load({"LASTSEEN_MAX_LOOKUPS": str(SET)})
    fitted = fit_lookups(settings, _range(tmp_path, "32768\t60999\n"))
    assert fitted.max_lookups == min(int(28232 // 2 * 0.95), _files())


def test_a_wide_range_or_an_unknown_one_leaves_the_cap_as_set(tmp_path: Path) -> None:
    """A range widened with the sysctl gives room for the cap as set; so does a host whose
    range cannot be read (not Linux)."""
    settings = Settings.load({"LASTSEEN_MAX_LOOKUPS": str(SET)})
    expected = min(SET, _files())
    assert fit_lookups(settings, _range(tmp_path, "1024 65535")).max_lookups == expected
    assert fit_lookups(settings, tmp_path / "missing").max_lookups == expected


def test_worker_processes_of_one_instance_split_the_ports(tmp_path: Path) -> None:
    """The ports are the host's: each of two worker processes keeps half of the cheap ones."""
    settings = Settings.load({"LASTSEEN_MAX_LOOKUPS": str(SET), "LASTSEEN_PORT_SHARE": "2"})
    fitted = fit_lookups(settings, _range(tmp_path, "32768 60999"))
    assert fitted.max_lookups == min(int(28232 // 2 * 0.95) // 2, _files())


def test_serve_tells_its_worker_processes_how_many_share_the_ports() -> None:
    """A worker process's settings, as ``lastseen serve`` hands them down, say how many worker
    processes the instance runs."""
    parent = Settings.load({"LASTSEEN_WORKER_PROCESSES": "3"})
    handed = child_settings(parent, "postgresql://h/db", 1234, "host:1/worker-0", "token")
    child = Settings.decode(handed.encode())
    assert (child.role, child.port_share) == ("worker", 3)


def test_only_a_value_the_operator_set_is_warned_about(tmp_path: Path) -> None:
    """The default lowered to what the host allows is said once, as information with the
    value in force; a value the operator set and does not get is one warning naming it."""
    narrow = _range(tmp_path, "32768 33767")  # 500 cheap ports at the most
    before = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    try:
        with structlog.testing.capture_logs() as lines:
            fit_lookups(Settings.load({}), narrow)
            fit_lookups(Settings.load({"LASTSEEN_MAX_LOOKUPS": str(SET)}), narrow)
    finally:
        structlog.configure(**before)
    assert [(line["log_level"], line.get("max_lookups"), line["using"]) for line in lines] == [
        ("info", None, 475),
        ("warning", SET, 475),
    ]
