"""The Pallas tile sweep's plan and its decisions (``pallas_sweep.py``): no JAX arrays here.

* **Cases**: one representative shape per size class of ``gnorm/_src/backends/tuning.py``,
  taken from ``gpu_bench``'s GPU case set (G = 32), bfloat16 and float32, channels last
  (channels first only when asked). Most important first: the classes where the Pallas
  kernels and XLA were closest on the H200 (GPU_NOTES.md: 1M-8M and 8M-32M, within 4-15%)
  and the shapes of Stable Diffusion's UNet; >= 32M next (within 1-4%); < 1M last (under
  one wave of blocks, launch-bound: the least telling).
* **Candidates**: a handful of blocks per layout, the heuristic's first (``tiling``'s
  tiles, warps 0 = ``compiler_params``' choice), each clamped to the shape as ``tiling``
  clamps it and deduplicated.
* **Order**: breadth first. Round 0 measures every case's baselines (the loop's own cost
  and XLA, both directions) and its heuristic block; round ``r`` the ``r``-th other
  candidate of every case. A budget that runs out then leaves every class with a
  decision (the heuristic against XLA) and the fewest classes without tile exploration.
* **Decision** (``decide``): per class, the forward block is the fastest correct forward;
  the backward block the fastest correct forward+backward (the sweep forces one block on
  all kernels: ``forced_block``); the class runs Pallas only if that forward+backward
  beats XLA's by ``MIN_SPEEDUP`` (5%) or by the spread measured on XLA's own re-timing,
  whichever is more, and its forward is no slower than XLA's beyond the same margin.
"""

from __future__ import annotations

import dataclasses
import math

from gnorm._src.backends import pallas_triton
from gnorm._src.backends import tuning
from gnorm._src.backends.pallas_triton import Block

from .device_cases import DTYPES
from .device_cases import GROUPS
from .device_cases import QUICK_SHAPES
from .device_cases import DeviceCase

# Pallas only where it beats XLA by this much: median device times of the loop form move
# by a few percent between runs of the same program (clocks, L2 state, 5 samples), so a
# smaller gain could be noise; and a switch of implementation that gains less is not worth
# what a wrong choice would cost. Raised to the measured spread where that is larger.
MIN_SPEEDUP = 1.05
# One shape per size class, from gpu_bench's GPU case set.
SHAPE_OF_CLASS = {
  "1M-8M": (2, 64, 64, 320),  # 2.6M: SD UNet, 64x64 latents
  "8M-32M": (16, 64, 64, 320),  # 21M: the same at batch 16
  ">=32M": (1, 512, 512, 128),  # 33.5M: SD VAE decoder, last stage
  "<1M": (2, 16, 16, 1280),  # 655K: SD UNet, innermost
}
CLASS_ORDER = ("1M-8M", "8M-32M", ">=32M", "<1M")

# The candidates after the heuristic's block (``heuristic``), most likely to matter first.
# Channels last: bc in {64, 128, 256} (C is contiguous: 128 bf16 = 256 B a row), 4K-16K
# elements per block, 4 or 8 warps.
CANDIDATES_LAST = (
  Block(128, 64, 8),  # C = 320, 640, 1280 are whole multiples of 64 (bc 128 masks 17% at 320)
  Block(32, 256, 8),  # longer contiguous rows, half the row blocks
  Block(64, 128, 4),  # the heuristic's tiles, 4 warps
  Block(128, 128, 8),  # 16K elements: fewer, larger programs
  Block(32, 128, 4),  # 4K elements: twice the programs (small tensors)
)
# Channels first (S contiguous): bs in {256, 512, 1024}, the same sizes and warps.
CANDIDATES_FIRST = (
  Block(256, 32, 8),
  Block(1024, 8, 8),
  Block(512, 16, 4),
  Block(512, 32, 8),
  Block(256, 16, 4),
)
QUICK_CANDIDATES = (Block(32, 32, 4),)

# Seconds each kind of work is expected to take on an H200 before one like it has run
# (then: the last one's time). A program compiles in ~1 s there (a JAX function 0.5-2 s;
# the Pallas ones compile 2-4 Triton kernels per call, 3 calls per loop program); timing
# one takes ~0.15 s (Settings.gpu(): 5 samples of ~20 ms after 2 runs), the check ~0.1 s.
EST_S = {"setup": 1.0, "overhead": 0.4, "xla": 1.3, "pallas_fwd": 1.3, "pallas_fwdbwd": 1.6}
RETIME_S = 0.3  # re-timing an XLA program already compiled


@dataclasses.dataclass(frozen=True)
class SweepCase:
  """One class's representative: a DeviceCase (its shape NHWC) in one layout."""

  case: DeviceCase
  channels_last: bool

  @property
  def view(self) -> tuple[int, int, int]:
    """``(n, s, c)``."""
    n, *spatial, c = self.case.shape
    return n, math.prod(spatial), c

  @property
  def key(self) -> tuple:
    n, s, c = self.view
    return tuning.key(self.case.dtype, self.channels_last, n, s, c, self.case.groups)

  @property
  def label(self) -> str:
    return f"{self.case.label} {'NHWC' if self.channels_last else 'NCHW'}"

  @property
  def slug(self) -> str:
    """The label as a program name."""
    return "".join(ch if ch.isalnum() else "_" for ch in self.label)


def cases(quick: bool, dtypes=DTYPES, layouts=("last",)) -> list[SweepCase]:
  """The representatives, most important first (size class, then dtype, then layout)."""
  if quick:
    return [SweepCase(DeviceCase(QUICK_SHAPES[0], "bfloat16", None, GROUPS), True)]
  return [SweepCase(DeviceCase(SHAPE_OF_CLASS[k], d, None, GROUPS), layout == "last")
          for k in CLASS_ORDER for layout in layouts for d in dtypes]


def _tiling(sc: SweepCase, b: Block | None) -> pallas_triton.Tiling:
  n, s, c = sc.view
  return pallas_triton.tiling(n, s, c, sc.channels_last, b)


def heuristic(sc: SweepCase) -> Block:
  """The kernels' own block on this case (``tiling`` without a choice; warps 0)."""
  t = _tiling(sc, None)
  return Block(t.bs, t.bc, t.warps)


def effective(b: Block, sc: SweepCase) -> Block:
  """The block ``tiling`` makes of ``b`` on this case (never larger than the array)."""
  t = _tiling(sc, b)
  return Block(t.bs, t.bc, t.warps)


def candidates(sc: SweepCase, quick: bool) -> list[Block]:
  """The case's blocks, the heuristic's first, as ``tiling`` applies them, without repeats."""
  base = QUICK_CANDIDATES if quick else CANDIDATES_LAST if sc.channels_last else CANDIDATES_FIRST
  return list(dict.fromkeys([heuristic(sc), *(effective(b, sc) for b in base)]))


def grid(b: Block, sc: SweepCase) -> tuple[int, int, int]:
  """The block-tiled kernels' grid for block ``b``: ``(n, cdiv(s, bs), cdiv(c, bc))``."""
  return tuple(int(d) for d in _tiling(sc, b).grid)


@dataclasses.dataclass(frozen=True)
class Item:
  """A unit of work: a case's baselines (``block`` None) or one candidate block."""

  index: int  # into the case list
  block: Block | None
  round: int


def work(case_list: list[SweepCase], quick: bool) -> list[Item]:
  """Every item, breadth first (see the module docstring)."""
  per_case = [candidates(sc, quick) for sc in case_list]
  items = []
  for r in range(max((len(c) for c in per_case), default=0)):
    for i, blocks in enumerate(per_case):
      if r == 0:
        items.append(Item(i, None, 0))
      if r < len(blocks):
        items.append(Item(i, blocks[r], r))
  return items


def estimate_s(item: Item) -> float:
  """An item's expected seconds before anything like it ran."""
  if item.block is None:
    return EST_S["setup"] + 2 * EST_S["overhead"] + 2 * EST_S["xla"]
  return EST_S["pallas_fwd"] + EST_S["pallas_fwdbwd"]


def block_dict(b: Block | None) -> dict | None:
  return None if b is None else {"bs": b.bs, "bc": b.bc, "warps": b.warps}


def _us(s: float | None) -> float | None:
  """Seconds as microseconds to the nanosecond: what the table stores and decides on
  (None where nothing measurable is left: a net time within the loop's own cost)."""
  us = None if s is None else round(s * 1e6, 3)
  return us if us else None


def _net(d: dict | None) -> float | None:
  """A timing's net microseconds where its outputs were right, else None."""
  return _us(d["net_s"]) if d and d.get("ok") else None


def _right(cand: dict) -> bool:
  """Both directions ran and matched the reference."""
  return all((cand.get(d) or {}).get("ok", False) for d in ("fwd", "fwdbwd"))


def usable(cand: dict) -> bool:
  """A candidate may win unless its forced block demonstrably did not apply."""
  return not cand.get("grid", "").startswith("contradicted")


def decide(result: dict, min_speedup: float = MIN_SPEEDUP) -> dict:
  """A class's table entry (``tuning_table.json`` schema) from its measured results.

  ``result``: the sweep's record of one case (``sweep_run``): ``xla`` and each
  candidate's ``fwd`` / ``fwdbwd`` timings (``net_s``, ``ok``), the loop's
  ``overhead`` and the XLA re-timing's ``spread``.
  """
  # A block wrong in either direction is out: its forward kernels ran in both programs.
  cands = [c for c in result["candidates"] if usable(c) and _right(c)]
  fwd = min((c for c in cands if _net(c.get("fwd"))), key=lambda c: _net(c["fwd"]),
            default=None)
  bwd = min((c for c in cands if _net(c.get("fwdbwd"))), key=lambda c: _net(c["fwdbwd"]),
            default=None)
  xf, xb = _net(result["xla"].get("fwd")), _net(result["xla"].get("fwdbwd"))
  one_pass = result["forward_plan"] == "one_pass"
  spread = result.get("spread")
  need = max(min_speedup, 1 + (spread or 0.0))
  pf = _net(fwd["fwd"]) if fwd else None
  pb = _net(bwd["fwdbwd"]) if bwd else None
  implementation = "xla"
  if pb is None:
    reason = "no Pallas block was measured correct in both directions"
  elif xb is None or xf is None:
    reason = "XLA's times are missing, wrong or within the loop's cost: nothing to compare with"
  elif xb < need * pb:
    reason = f"forward+backward {xb / pb:.3f}x XLA's, under the {need:.3f}x required"
  elif pf is None or xf * need < pf:
    forward = "not measured" if pf is None else f"{xf / pf:.3f}x XLA's"
    reason = (f"forward+backward {xb / pb:.3f}x XLA's, but the forward {forward}"
              f" (under 1/{need:.3f})")
  else:
    implementation = "pallas"
    reason = (f"forward+backward {xb / pb:.3f}x XLA's (>= {need:.3f}x), forward"
              f" {xf / pf:.3f}x")
  overhead = result["overhead"]
  entry = {
    "dtype": result["dtype"],
    "channels_last": result["channels_last"],
    "size_class": result["size_class"],
    "forward_plan": result["forward_plan"],
    "implementation": implementation,
    "forward": None if one_pass or fwd is None else fwd["block"],
    "backward": bwd["block"] if bwd else None,
    "case": {"shape": result["shape"], "groups": result["groups"]},
    "us": {
      "pallas_fwd": pf, "pallas_fwdbwd": pb, "xla_fwd": xf, "xla_fwdbwd": xb,
      "loop_fwd": _us(overhead.get("fwd")), "loop_fwdbwd": _us(overhead.get("fwdbwd")),
    },
    "reason": reason,
    "candidates": [{"block": c["block"], "fwd_us": _net(c.get("fwd")),
                    "fwdbwd_us": _net(c.get("fwdbwd")),
                    "ok": _right(c) and usable(c)}
                   for c in result["candidates"]],
  }
  if spread is not None:
    entry["spread"] = round(spread, 4)
  return entry


def measurement(results: dict) -> dict:
  """The sweep's results as one measurement of the table (schema: ``tuning.validate``)."""
  entries = [decide(r, results["min_speedup"]) for r in results["cases"]
             if r["xla"] and r["candidates"]]
  m = results["machine"]
  return {
    "device_kind": m["device"], "platform": m["jax_backend"], "dry_run": results["quick"],
    "versions": m["table_versions"], "date_utc": m["date_utc"], "gnorm_commit": m["git"],
    "command": results["command"], "method": results["method"],
    "min_speedup": results["min_speedup"], "budget_s": results["budget_s"],
    "wall_s": results.get("wall_s", 0.0),
    "not_swept": [f"{n['case']} {n['what']}: {n['reason']}" for n in results["not_swept"]],
    "entries": entries,
  }


def candidate_table(results: dict) -> dict:
  """A whole table holding this sweep's measurement (what ``--install`` takes)."""
  m = measurement(results)
  on_gpu = m["platform"] == "gpu" and not m["dry_run"]
  note = ("A candidate table written by benchmarks/pallas_sweep.py"
          + ("" if on_gpu else "; a dry run off a GPU: its times mean nothing, and --install"
             " refuses it") + ".")
  return {
    "schema_version": tuning.SCHEMA_VERSION,
    "provenance": {"measured_on_gpu": on_gpu, "note": note, "written": m["date_utc"][:10],
                   "by": results["command"]},
    "measurements": [m],
  }
