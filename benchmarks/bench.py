"""Command line of gnorm's benchmark; what it measures is in ``gnorm_bench/__init__.py``.

Usage::

  python benchmarks/bench.py [--quick] [--cases full|sd-unet|quick] [--rounds N]
                             [--out DIR] [--only gnorm,gnorm_pallas,flax,haiku,equinox,torch]
                             [--sections main,fused] [--sample-ms MS]
                             [--compile-reps N] [--no-progress]

Writes ``latest.md``, ``latest.json`` and ``latest.png`` to ``--out``
(default ``benchmarks/results``). The floor is always run: the ratios need it.
``--sections fused`` runs only the fused section (no chart: it plots the main
one); the fused section needs gnorm in ``--only``. The same command runs on
JAX's CPU, GPU or TPU backend.

Two runtimes in one process, on the CPU: torch's OpenMP threads spin after
each parallel region by default, and on a machine with few cores they then
compete with XLA's thread pool for the cores the next implementation runs on
(and XLA's with torch's): compare ``results/latest.md`` with
``results/omp_active/latest.md``, the same run with ``OMP_WAIT_POLICY=ACTIVE``.
With ``OMP_WAIT_POLICY=PASSIVE`` (set here before torch is imported, unless
the environment already sets it) idle OpenMP threads sleep instead, and both
sides run close to their undisturbed times. The setting is recorded with the
results. On a GPU both runtimes' work is on the device, so it is left alone.
"""

import os

import jax

# Before torch (and its OpenMP runtime) can be imported, on the CPU only: see
# the docstring. jax, flax and gnorm load no OpenMP runtime themselves.
if jax.default_backend() == "cpu":
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gnorm_bench.cli import main  # noqa: E402

if __name__ == "__main__":
  main()
