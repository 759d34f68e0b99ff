"""A pytest plugin for ``gpu_check.sh``: tests that would start after a deadline are skipped.

The GPU check's test step must end in time however slowly the machine compiles: past
``GNORM_TEST_DEADLINE_S`` seconds from the session's start, every remaining test is
skipped with the reason "GPU check: past its N s test deadline" (listed by ``-ra``, and
counted in the last line), instead of the whole step being killed without a result. The
files are given in order of importance, so what is cut is the least important.

Use: ``python -m pytest -p gnorm_bench.device_pytest_deadline ...`` with ``benchmarks/`` on
``PYTHONPATH``; without the variable it does nothing.
"""

from __future__ import annotations

import os
import time

import pytest

_START = {"t": time.monotonic()}


def pytest_sessionstart(session) -> None:
  del session
  _START["t"] = time.monotonic()


def pytest_runtest_setup(item) -> None:
  del item
  limit = os.environ.get("GNORM_TEST_DEADLINE_S")
  if limit and time.monotonic() - _START["t"] > float(limit):
    pytest.skip(f"GPU check: past its {float(limit):.0f} s test deadline")
