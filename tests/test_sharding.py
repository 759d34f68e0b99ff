"""Sharding and ``axis_name`` on 8 simulated CPU devices (in a subprocess)."""

from __future__ import annotations

import pytest

from tests import multidevice_checks

# One subprocess runs every check: under pytest-xdist the module's tests stay
# on one worker (``--dist loadgroup``), so it runs once.
pytestmark = pytest.mark.xdist_group("multidevice_checks")


@pytest.fixture(scope="module")
def results():
  return multidevice_checks.run_checks("tests.multidevice_checks")


@pytest.mark.parametrize("name", sorted(multidevice_checks.CHECKS))
def test_multidevice(results, name):
  assert results[name] == "ok", results[name]
