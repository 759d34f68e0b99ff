"""Sharding and ``axis_name`` on 8 simulated CPU devices (in a subprocess)."""

from __future__ import annotations

import pytest

from tests import multidevice_checks


@pytest.fixture(scope="module")
def results():
  return multidevice_checks.run_checks("tests.multidevice_checks")


@pytest.mark.parametrize("name", sorted(multidevice_checks.CHECKS))
def test_multidevice(results, name):
  assert results[name] == "ok", results[name]
