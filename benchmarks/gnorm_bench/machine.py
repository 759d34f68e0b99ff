"""What a run runs on: the JAX backend and device, the host, torch's device, the copy bandwidth."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import time

import jax
import jax.numpy as jnp

from .timing import calibrate
from .timing import sample
from .timing import stats

# The copy bandwidth's buffer, per backend: far beyond every cache (an H100's
# L2 is 50 MiB). On the CPU 64 MiB keeps it to a fraction of a second; there
# glibc maps every allocation over 32 MiB afresh, and the 4 KiB page faults
# of each new output, not memory, set the copy's time. On the 2-core AMD EPYC
# of docs/performance.md's figures: 3.5-6.3 GB/s (steady within a run, not
# across runs), against
# 26-29 GB/s for the same jitted copy with glibc told to reuse memory
# (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) and 22-27 GB/s for NumPy's
# copyto. The yardstick is meant for GPUs and TPUs.
COPY_MIB = {"cpu": 64}
# The source tree whose commit a run records (benchmarks/gnorm_bench/ is two below).
ROOT = pathlib.Path(__file__).resolve().parents[2]
COPY_MIB_ACCELERATOR = 256
_DISTS = (
  "jax",
  "jaxlib",
  "jax-cuda12-plugin",
  "jax-cuda13-plugin",
  "libtpu",
  "flax",
  "dm-haiku",
  "equinox",
  "torch",
  "numpy",
)


def optional(name: str):
  """The module ``name``, or None where it does not import."""
  try:
    return importlib.import_module(name)
  except Exception:  # noqa: BLE001 - any import failure means "not available"
    return None


def backend() -> str:
  """JAX's default backend: "cpu", "gpu" (CUDA or ROCm) or "tpu"."""
  return jax.default_backend()


def threads() -> int:
  """The cores this process may run on (XLA's CPU thread pool uses them all)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def git_revision(root: pathlib.Path) -> str:
  """The source tree's commit, and whether tracked files differ from it.

  A copy of the tree without ``.git`` (a GPU machine's) says so, or gives
  ``GNORM_GIT_REVISION`` where whoever copied it set that.
  """
  try:
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True,
                           timeout=10, check=True).stdout.strip()
  except Exception as e:  # noqa: BLE001 - a copy of the tree without .git, or no git
    given = os.environ.get("GNORM_GIT_REVISION")
    return f"{given} (GNORM_GIT_REVISION)" if given else f"unknown ({type(e).__name__})"
  return head + (" with uncommitted changes" if dirty else "")


def dist_versions(dists) -> dict[str, str | None]:
  """Each installed distribution's version, ``None`` where it is not installed."""
  out: dict[str, str | None] = {}
  for dist in dists:
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = None
  return out


def json_default(o):
  """``json.dump``'s ``default``: NumPy (and JAX) scalars as Python numbers."""
  if hasattr(o, "item"):
    return o.item()
  raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_json(path: pathlib.Path, obj, indent: int | None = 1) -> None:
  """Writes ``obj`` to ``path`` whole or not at all (a temporary file, then a
  rename): a run stopped by a time limit while writing leaves the previous file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=indent, default=json_default) + "\n")
  os.replace(tmp, path)


def gnorm_version() -> str:
  """The installed gnorm's version, or "source tree" where it runs from ``PYTHONPATH``."""
  try:
    return importlib.metadata.version("gnorm")
  except importlib.metadata.PackageNotFoundError:
    return "source tree"


def provenance(m: dict) -> str:
  """Which gnorm a run measured, for a report's header: its version and commit."""
  return f"gnorm {m['versions'].get('gnorm')} at commit {m.get('git', 'not recorded')}"


def loadavg() -> list[float] | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def torch_device(jax_backend: str) -> tuple[str | None, str]:
  """Where torch runs to be compared with JAX on ``jax_backend``.

  Returns:
    ``(device, "")``, device "cpu" or "cuda"; or ``(None, why)`` where torch
    is not compared: not importable, or no device of the same kind as JAX's.
  """
  torch = optional("torch")
  if torch is None:
    return None, "not importable"
  if jax_backend == "cpu":
    return "cpu", ""
  if jax_backend == "gpu":
    if torch.cuda.is_available():
      return "cuda", ""
    return None, "torch sees no CUDA device (a CPU-only build?)"
  return None, f"no torch device to compare with JAX's {jax_backend}"


def configure_torch(device: str | None, n_threads: int) -> None:
  """On the CPU, torch gets the cores XLA uses; on a GPU its host threads do not matter."""
  if device == "cpu":
    import torch

    torch.set_num_threads(n_threads)


def _cpu_model() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return cpu


def machine_info(n_threads: int, torch_dev: str | None = None) -> dict:
  """Host, backend, device, versions and environment, recorded with the results."""
  versions = dist_versions(_DISTS)
  versions["gnorm"] = gnorm_version()
  info = {
    "cpu": _cpu_model(),
    "cores": n_threads,
    "os_cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax_backend": jax.default_backend(),
    "jax_devices": [str(d) for d in jax.devices()],
    "device": jax.devices()[0].device_kind,
    "torch_device": torch_dev,
    "torch_device_name": None,
    "versions": versions,
    # The version alone does not say which code ran: it changes only at a release.
    "git": git_revision(ROOT),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    "loadavg_start": loadavg(),
    "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  }
  if torch_dev == "cuda":
    import torch

    info["torch_device_name"] = torch.cuda.get_device_name()
    info["torch_cuda"] = torch.version.cuda
  return info


def copy_bandwidth(jax_backend: str, n_samples: int, sample_s: float) -> dict:
  """The device's copy bandwidth: ``jax.jit(lambda x: x + 0)`` (nothing donated,
  so a new buffer is written) on a float32 buffer far larger than the caches,
  counting the bytes read plus the bytes written. The yardstick of the
  bandwidth table: no pass that reads x and writes y can beat it by much."""
  mib = COPY_MIB.get(jax_backend, COPY_MIB_ACCELERATOR)
  # Random data: nothing a memory system could compress.
  x = jax.random.uniform(jax.random.key(0), (mib * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda x: x + 0)

  def call():
    return f(x).block_until_ready()

  k = calibrate(call, sample_s)
  st = stats([sample(call, k) for _ in range(n_samples)], k)
  moved = 2 * int(x.nbytes)
  return {
    "function": "jax.jit(lambda x: x + 0)",
    "dtype": "float32",
    "buffer_bytes": moved // 2,
    "bytes_moved": moved,
    "gb_per_s": moved / st["median_s"] / 1e9,
    **st,
  }
