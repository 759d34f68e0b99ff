"""A real multi-process run: 2 JAX processes x 2 CPU devices on 127.0.0.1.

``multiprocess_worker.py`` runs in each process (``jax.distributed``, gloo
collectives); this test starts both, waits for them within a time limit, and
stops whatever is left of them whatever happens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import multiprocess_worker

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300
CHECKS = ("check_explicit_mesh_batch_and_spatial_split",
          "check_mnist_example_trains_over_both_processes",
          "check_shard_map_axis_name_across_processes",
          "check_shard_map_batch_split_without_axis_name")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(i), port],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(multiprocess_worker.PROCESSES)]
  try:
    outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{err[-4000:]}"
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def test_every_check_is_listed(results):
  for r in results:
    assert sorted(r) == sorted(CHECKS)


@pytest.mark.parametrize("name", CHECKS)
def test_multiprocess(results, name):
  for i, r in enumerate(results):
    assert r[name] == "ok", f"process {i}: {r[name]}"
