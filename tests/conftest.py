"""Strict test configuration shared by the whole suite."""

import os

# Keep the suite single-device and quiet; tests that need several simulated
# devices start a subprocess with their own XLA_FLAGS.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

# CI must be reproducible: there, hypothesis draws the same examples every run
# (locally it keeps exploring new ones and remembers failures in .hypothesis/).
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
  hypothesis.settings.load_profile("ci")

# In CI no test may skip: a skip there hides a missing dependency or platform.
# (benchmarks/gpu_check.sh sets CI for the reproducible examples and
# GNORM_ALLOW_SKIPS: some tests skip on a GPU.)
_CI = bool(os.environ.get("CI")) and not os.environ.get("GNORM_ALLOW_SKIPS")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Under ``CI``, a skipped test is reported as failed, with its reason."""
  report = (yield).get_result()
  if _CI and report.skipped and not hasattr(report, "wasxfail"):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{item.nodeid} skipped in CI, where no test may skip: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  """Under ``CI``, a module skipped while collected (``importorskip`` at its
  top, ``allow_module_level``) fails collection, with its reason."""
  report = (yield).get_result()
  if _CI and report.skipped:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"{collector.nodeid} skipped in CI, where no test may skip: {reason}"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
  """``-n auto`` (pytest-xdist): one worker per core, at most 8.

  Each worker imports JAX and compiles its own programs; beyond 8 the start-up
  and memory of more workers buy little for a suite of this size.
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(8, cores or 1))


# Implicit rank promotion hides shape bugs; make it an error everywhere.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
  """Enables float64 for one test and restores the previous setting."""
  prev = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", prev)
