"""Sharding in types (Explicit mesh axes, ``shard_map`` without ``axis_name``)
on 8 simulated CPU devices, in a subprocess: ``multidevice_types.py``."""

from __future__ import annotations

import pytest

from tests import multidevice_checks
from tests import multidevice_types


@pytest.fixture(scope="module")
def results():
  return multidevice_checks.run_checks("tests.multidevice_types")


@pytest.mark.parametrize("name", sorted(multidevice_types.CHECKS))
def test_array_types(results, name):
  assert results[name] == "ok", results[name]
