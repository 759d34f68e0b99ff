"""Sharding and ``axis_name`` on 8 simulated CPU devices (in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import multidevice_checks

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
      [sys.executable, "-m", "tests.multidevice_checks"], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(multidevice_checks.CHECKS))
def test_multidevice(results, name):
  assert results[name] == "ok", results[name]
