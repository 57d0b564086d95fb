"""The unit layer: the pipeline's stages built alone on a ``ManualClock``, on an event loop whose
time is that clock's (virtual.py), with fakes for the upstream and for what outcomes go to. No
database, no real sleep: each test takes milliseconds."""

from __future__ import annotations

import os
import random

import pytest

from lastseen.core.clock import ManualClock
from lastseen.telemetry.metrics import Metrics


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture(autouse=True)
def jitter() -> None:
    """The backoff's jitter drawn the same way every run: a case that passes passes again."""
    random.seed(int(os.environ.get("LASTSEEN_TEST_SEED", "0")))
