"""``latest.png``: time / the floor per shape and implementation, forward and forward+backward."""

from __future__ import annotations

import sys

import numpy as np

from .summary import t


def to_png(results: dict, path: str) -> bool:
  """Draws the main section's chart; False where there is none (no matplotlib, no main section)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except Exception:  # noqa: BLE001
    print("matplotlib not importable: no chart written", file=sys.stderr)
    return False
  cases = results["cases"]
  if not cases:  # --sections fused: the chart is of the main section
    return False
  names = [
    n
    for n in ("gnorm", "gnorm_pallas", "flax", "haiku", "equinox", "torch")
    if any(t(c, n, "fwd") for c in cases)
  ]
  fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(cases) + 3), 8), sharex=True)
  width = 0.8 / max(1, len(names))
  xs = np.arange(len(cases))
  panels = (("fwd", "forward"), ("fwdbwd", "forward + backward"))
  for ax, (d, title) in zip(axes, panels, strict=True):
    for i, n in enumerate(names):
      vals = [(t(c, n, d) or np.nan) / t(c, "floor", "fwd") for c in cases]
      ax.bar(xs + (i - (len(names) - 1) / 2) * width, vals, width, label=n)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("time / XLA floor (x*g+b fwd)")
    ax.set_title(title)
    ax.set_yscale("log")
    ax.grid(axis="y", which="both", alpha=0.3)
  axes[0].legend(ncol=len(names), fontsize=8)
  axes[1].set_xticks(xs, [c["label"].replace(" ", "\n", 1) for c in cases], fontsize=7)
  m = results["machine"]
  if m["jax_backend"] == "cpu":
    where = f"{m['cpu']}, {m['cores']} cores"
  else:  # the host's CPU says nothing about an accelerator's times
    where = f"{m.get('device')} ({m['jax_backend']})"
  fig.suptitle(
    f"gnorm vs others, lower is better — {where}, jax {m['versions']['jax']}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
