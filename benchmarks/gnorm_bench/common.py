"""What the benchmarks share: the cases, their data and float64 reference, the accuracy
bounds, the machine a run ran on, timing of blocked calls in interleaved rounds, formats."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository
EPS = 1e-5
DIRECTIONS = ("fwd", "fwdbwd")


@dataclasses.dataclass(frozen=True)
class Case:
  shape: tuple[int, ...]  # NHWC
  groups: int = 32
  dtype: str = "float32"

  @property
  def label(self) -> str:
    s = "x".join(map(str, self.shape))
    return f"{s} G={self.groups}" + ("" if self.dtype == "float32" else f" {self.dtype}")


# The GroupNorms of a Stable Diffusion UNet (and a ResNet-style one).
SD_UNET = ((2, 64, 64, 320), (2, 32, 32, 640), (2, 16, 16, 1280), (8, 56, 56, 256))
# gpu_bench.py's and xla_gpu_plan.py's shapes: those, and three beyond a GPU's L2 in float32.
GPU_SHAPES = SD_UNET + ((16, 64, 64, 320), (32, 32, 32, 640), (1, 512, 512, 128))
QUICK_SHAPES = ((2, 8, 8, 64),)
_FULL = (((128, 26, 26, 16), 4), ((8, 56, 56, 256), 32), ((8, 14, 14, 1024), 32),
         ((2, 64, 64, 320), 32), ((2, 32, 32, 640), 32), ((2, 16, 16, 1280), 32),
         ((2, 8, 8, 1280), 32), ((32, 28, 28, 64), 32))
_QUICK = (Case(QUICK_SHAPES[0], 32, "bfloat16"),)
_SD = tuple(Case(s, 32, d) for s in SD_UNET for d in ("float32", "bfloat16"))
# bench.py's --cases: name -> (main section, fused GroupNorm + SiLU section).
CASE_SETS = {
  "full": (tuple(Case(s, g) for s, g in _FULL) + (Case((2, 64, 64, 320), 32, "bfloat16"),),
           tuple(Case(s, 32, d) for s in SD_UNET[:2] for d in ("float32", "bfloat16"))),
  "sd-unet": (_SD, _SD),
  "quick": (_QUICK, _QUICK),
}

# Accuracy bounds. gnorm's own output (any implementation, SiLU fused or not) is held to
# docs/accuracy.md's bounds on this N(0.5, 1) data: float32 within 1e-5 of the float64
# reference, bfloat16 within one output rounding (2^-8 |ref| + 1e-5), per element. Everyone
# else's y (and gnorm followed by a separate SiLU, which rounds twice) and every gradient get
# a sanity bound that catches a wrong kernel: max|error| / max|ref| <= SANITY.
Y_ABS = 1e-5
Y_REL = {"float32": 0.0, "bfloat16": 2.0**-8}
SANITY = {"float32": 1e-4, "bfloat16": 3e-2}
BOUNDS_TEXT = ("gnorm's y: docs/accuracy.md's bounds (float32 |error| <= 1e-5; bfloat16 <= 2^-8"
               " |ref| + 1e-5, per element); everyone else's y and all gradients:"
               " max|error|/max|ref| <= 1e-4 (float32), 3e-2 (bfloat16)")


def documented(name: str) -> bool:
  """Whether implementation ``name`` is gnorm's own output, held to the documented bounds."""
  return name.startswith("gnorm") and name != "gnorm_unfused"


def to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
  """``a`` rounded to ``dtype`` and back to float32 (on the host)."""
  return a if dtype == "float32" else a.astype(getattr(ml_dtypes, dtype)).astype(np.float32)


def make_data(case: Case, seed: int = 0) -> dict:
  """x ~ N(0.5, 1) and a cotangent ct (NHWC float32, already rounded to the case's dtype, so
  that the reference sees what the kernels see), gamma and beta (float32)."""
  rng = np.random.default_rng(seed)
  c = case.shape[-1]
  x = rng.standard_normal(case.shape, dtype=np.float32) + np.float32(0.5)
  ct = rng.standard_normal(case.shape, dtype=np.float32)
  return {"x": to_dtype(x, case.dtype), "ct": to_dtype(ct, case.dtype),
          "gamma": (1.0 + 0.1 * rng.standard_normal(c)).astype(np.float32),
          "beta": (0.1 * rng.standard_normal(c)).astype(np.float32)}


def reference(case: Case, data: dict, activation: str | None = None) -> tuple:
  """Float64 y, dx, dgamma, dbeta (NHWC) of ``group_norm`` (then SiLU, where asked)."""
  n, c, g = case.shape[0], case.shape[-1], case.groups
  x, ct = (data[k].astype(np.float64).reshape(n, -1, g, c // g) for k in ("x", "ct"))
  gamma, beta = (data[k].astype(np.float64).reshape(1, 1, g, c // g) for k in ("gamma", "beta"))
  xc = x - x.mean(axis=(1, 3), keepdims=True)
  rstd = 1.0 / np.sqrt((xc * xc).mean(axis=(1, 3), keepdims=True) + EPS)
  xhat = xc * rstd
  y = xhat * gamma + beta
  if activation == "silu":
    sig = 1.0 / (1.0 + np.exp(-y))
    ct = ct * sig * (1.0 + y * (1.0 - sig))  # silu'(z) = s (1 + z (1 - s))
    y = y * sig
  elif activation is not None:
    raise ValueError(activation)
  dxhat = ct * gamma
  dx = rstd * (dxhat - dxhat.mean(axis=(1, 3), keepdims=True)
               - xhat * (dxhat * xhat).mean(axis=(1, 3), keepdims=True))
  return (y.reshape(case.shape), dx.reshape(case.shape), (ct * xhat).sum(axis=(0, 1)).reshape(c),
          ct.sum(axis=(0, 1)).reshape(c))


def rel_err(a, ref) -> float:
  """max |a - ref| / max |ref|: one scale-free number per output."""
  return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check(name: str, outputs: tuple, ref: tuple, dtype: str) -> dict:
  """``outputs`` (y, or y and the three gradients; float64 NHWC) against ``ref``."""
  y = outputs[0]
  e = {"y_vs_ref": rel_err(y, ref[0]), "y_max_abs": float(np.max(np.abs(y - ref[0])))}
  ok = True
  if len(outputs) > 1:
    e["grad_vs_ref"] = max(rel_err(a, r) for a, r in zip(outputs[1:], ref[1:], strict=True))
    ok = e["grad_vs_ref"] <= SANITY[dtype]
  if documented(name):
    ok = ok and bool(np.all(np.abs(y - ref[0]) <= Y_ABS + Y_REL[dtype] * np.abs(ref[0])))
  else:
    ok = ok and e["y_vs_ref"] <= SANITY[dtype]
  return {**e, "ok": bool(ok), "bound": "docs/accuracy.md" if documented(name) else "sanity"}


# The machine.


def optional(name: str):
  """The module ``name``, or None where it does not import."""
  try:
    return importlib.import_module(name)
  except Exception:  # noqa: BLE001 - any failure means "not available"
    return None


def threads() -> int:
  """The cores this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def git_revision() -> str:
  """The source tree's commit (and whether tracked files differ from it); a copy without
  ``.git`` gives ``GNORM_GIT_REVISION`` where whoever copied it set that."""
  try:
    def git(*args):
      return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "-uno")
  except Exception as e:  # noqa: BLE001 - no git, or no .git
    given = os.environ.get("GNORM_GIT_REVISION")
    return f"{given} (GNORM_GIT_REVISION)" if given else f"unknown ({type(e).__name__})"
  return head + (" with uncommitted changes" if dirty else "")


_DISTS = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu", "flax", "dm-haiku",
          "equinox", "optax", "torch", "triton", "numpy")


def versions() -> dict:
  out = {}
  for dist in (*_DISTS, "gnorm"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      out[dist] = "source tree" if dist == "gnorm" else None
  return out


def loadavg() -> list | None:
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def machine_info(torch_device: str | None = None) -> dict:
  """Host, backend, device, versions and environment, recorded with the results."""
  import jax

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as fh:
      cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
  except OSError:
    pass
  info = {"cpu": cpu, "cores": threads(), "platform": platform.platform(),
          "python": platform.python_version(), "jax_backend": jax.default_backend(),
          "device": jax.devices()[0].device_kind, "torch_device": torch_device,
          "versions": versions(), "git": git_revision(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "loadavg_start": loadavg(),
          "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  if torch_device == "cuda":
    import torch

    info["torch_device_name"] = torch.cuda.get_device_name()
  return info


def provenance(m: dict) -> str:
  """Which gnorm a run measured: version and commit (the header of every report)."""
  return f"gnorm {m['versions']['gnorm']} at commit {m['git']}"


def machine_line(m: dict) -> str:
  vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v and k != "gnorm")
  return (f"Machine: {m['cpu']}, {m['cores']} cores ({m['platform']}), JAX backend"
          f" `{m['jax_backend']}`, device `{m['device']}`; Python {m['python']}; {vers}.")


def write_json(path: pathlib.Path, obj) -> None:
  """Whole or not at all (a temporary file, then a rename): a run killed mid-write leaves the
  previous file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=lambda o: o.item()) + "\n")
  os.replace(tmp, path)


# Timing of blocked calls: samples of k calls, medians over interleaved rounds.


def calibrate(fn, sample_s: float) -> int:
  """Calls per sample so that one sample lasts about ``sample_s`` (after two warm calls)."""
  fn()
  fn()
  best = math.inf
  for _ in range(2):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return max(1, min(10_000, round(sample_s / max(best, 1e-7))))


def sample(fn, k: int) -> float:
  t0 = time.perf_counter()
  for _ in range(k):
    fn()
  return (time.perf_counter() - t0) / k


def time_interleaved(variants: dict, rounds: int, sample_s: float, bar=None) -> dict:
  """``variants``: name -> {direction: blocking call}. Each round times every variant back to
  back, starting at a different one, so that a shared machine's noise hits them alike.
  Returns ``{"name/direction": {"median_s", "min_s", "samples_s", "calls_per_sample"}}``."""
  keys = [(n, d) for d in DIRECTIONS for n in variants if d in variants[n]]
  ks = {key: calibrate(variants[key[0]][key[1]], sample_s) for key in keys}
  samples = {key: [] for key in keys}
  for r in range(rounds):
    gc.collect()
    gc.disable()
    try:
      for d in DIRECTIONS:
        order = [key for key in keys if key[1] == d]
        shift = r % max(1, len(order))
        for key in order[shift:] + order[:shift]:
          samples[key].append(sample(variants[key[0]][d], ks[key]))
    finally:
      gc.enable()
    if bar:
      bar.update(1)
  return {f"{n}/{d}": {"median_s": statistics.median(v), "min_s": min(v), "samples_s": v,
                       "calls_per_sample": ks[(n, d)]} for (n, d), v in samples.items()}


def progress_bar(total: int, desc: str, on: bool):
  """A tqdm bar on stderr, or None (off, or no tqdm)."""
  tqdm = optional("tqdm") if on else None
  return tqdm.tqdm(total=total, desc=desc, file=sys.stderr) if tqdm else None


def geomean(xs) -> float | None:
  xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
  return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def fmt_t(s: float | None) -> str:
  if s is None:
    return "—"
  return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def fmt_b(b: int | None) -> str:
  if b is None:
    return "—"
  return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def fmt_x(r: float | None, bold: bool = False) -> str:
  return "—" if r is None else (f"**{r:.2f}×**" if bold else f"{r:.2f}×")
