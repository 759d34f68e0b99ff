"""bench.py's report: ``latest.md`` (the machine, then per section the time, bandwidth,
compile, memory, traffic and accuracy tables) and ``latest.png`` (time / floor per shape)."""

from __future__ import annotations

import math
import sys

from .common import BOUNDS_TEXT
from .common import fmt_b
from .common import fmt_t
from .common import fmt_x
from .common import machine_line
from .common import provenance

TORCH_LAYOUTS = {"torch_nchw": False, "torch_cl": True}  # channels_last?; the faster counts
ORDER = ("gnorm", "gnorm_pallas", "gnorm_unfused", "flax", "haiku", "equinox", "torch")
FUSED_TITLES = {"gnorm": "gnorm fused", "gnorm_pallas": "gnorm pallas fused",
                "gnorm_unfused": "gnorm + silu", "flax": "flax + silu", "torch": "torch + silu"}
_DIRECTIONS = (("fwd", "Forward"), ("fwdbwd", "Forward + backward (y and grads for x, gamma,"
                                              " beta)"))


def shown(name: str) -> str:
  """The column a variant is shown in: torch's layouts in one."""
  return "torch" if name in TORCH_LAYOUTS else name


def variants(name: str) -> tuple:
  return tuple(TORCH_LAYOUTS) if name == "torch" else (name,)


def t(case: dict, name: str, d: str, stat: str = "median_s") -> float | None:
  """Seconds per call; ``torch``: the faster of its two layouts."""
  ts = [e[stat] for v in variants(name) if (e := case["times"].get(f"{v}/{d}"))]
  return min(ts) if ts else None


def _tag(case: dict, name: str, d: str) -> str:
  """torch's faster layout; **WRONG** where an output is out of its bound."""
  tag = ""
  if name == "torch" and (a := t(case, "torch_nchw", d)) and (b := t(case, "torch_cl", d)):
    tag = " cl" if b < a else " nchw"
  if any(not case["accuracy"][v]["ok"] for v in variants(name) if v in case["accuracy"]):
    tag += " **WRONG**"
  return tag


def _table(head: list, rows: list, left: int = 1) -> list[str]:
  return ["| " + " | ".join(head) + " |", "|" + "---|" * left + "--:|" * (len(head) - left),
          *("| " + " | ".join(map(str, r)) + " |" for r in rows), ""]


def _header(r: dict, command: str) -> list[str]:
  m, cb = r["machine"], r["machine"]["copy_bandwidth"]
  lines = ["# gnorm benchmark", "", f"`{command}` — {m['date_utc']}, {provenance(m)}", "",
           machine_line(m)]
  if m["jax_backend"] == "cpu" and m.get("torch_device"):
    lines.append(f"torch threads = {m['cores']}, OMP_WAIT_POLICY={m['omp_wait_policy'] or 'unset'}"
                 " (PASSIVE: idle OpenMP threads sleep instead of spinning on XLA's cores).")
  if m.get("torch_device") == "cuda":
    lines.append("Every torch call ends with `torch.cuda.synchronize()`, as every JAX call with"
                 " `block_until_ready()`.")
  return lines + [
    f"Load average (1, 5, 15 min) at start {m['loadavg_start']}, at end {m['loadavg_end']}"
    " (above the core count, other processes shared the machine: trust ratios more than times).",
    f"Copy bandwidth: **{cb['gb_per_s']:.1f} GB/s**, `{cb['function']}` on a"
    f" {cb['buffer_bytes'] / 2**20:.0f} MiB float32 buffer, bytes read + written / the median.",
    "", "Times are medians over interleaved rounds; `×` is time / the floor, XLA's one-pass"
    " `jit(lambda x, g, b: x * g + b)` **forward** on the same tensor (also in the"
    " forward+backward tables); `other/gnorm` > 1: gnorm is faster (in the fused section gnorm"
    " is the fused one). torch: the faster of contiguous NCHW and channels_last (marked);"
    " equinox runs vmapped on NCHW input. Skipped: "
    + (", ".join(f"{n} ({why})" for n, why in r["skipped"].items()) or "none") + ".", ""]


def _section(sec: dict, prefix: str, titles: dict) -> list[str]:
  cases, s = sec["cases"], sec["summary"]
  present = [n for n in ORDER if any(t(c, n, "fwd") for c in cases)]
  others = [n for n in present if n != "gnorm"]
  jax_names = [n for n in present + ["floor"] if n != "torch"]
  lines = []
  for d, title in _DIRECTIONS:
    rows = []
    for c in cases:
      fl = t(c, "floor", "fwd")
      rows.append([c["label"], fmt_t(t(c, "floor", d))]
                  + [f"{fmt_t(x)} ({x / fl:.2f}×){_tag(c, n, d)}" if (x := t(c, n, d)) else "—"
                     for n in present]
                  + [fmt_x(a / g) if (a := t(c, n, d)) and (g := t(c, "gnorm", d)) else "—"
                     for n in others])
    rows.append(["**geomean**", ""] + [fmt_x(s[f"{n}/floor/{d}"]["geomean"]) for n in present]
                + [fmt_x(s.get(f"{n}/gnorm/{d}", {}).get("geomean"), True) for n in others])
    best = ", ".join(f"{n}/gnorm {fmt_x(s[f'{n}/gnorm/{d}']['geomean_of_min'])}" for n in others
                     if f"{n}/gnorm/{d}" in s)
    lines += [f"## {prefix}{title}", "", *_table(
      ["shape", "floor", *(titles.get(n, n) for n in present), *(f"{n}/gnorm" for n in others)],
      rows)] + ([f"From best-of-rounds times instead of medians: {best}.", ""] if best else [])

  def bw(c, n, d):
    es = [e for v in variants(n) if (e := c["bandwidth"].get(f"{v}/{d}"))]
    e = max(es, key=lambda e: e["gb_per_s"]) if es else None
    return f"{e['gb_per_s']:.1f} GB/s ({e['fraction_of_copy']:.0%})" if e else "—"

  names = ["floor", *present]
  lines += [f"## {prefix}Bandwidth", "", "The bytes a pass must move (forward: read x, write y;"
            " forward+backward: also read dy, write dx; in the dtypes each reads and writes) /"
            " the median time, and as a fraction of the copy bandwidth. Forward /"
            " forward+backward.", "", *_table(["shape", *(titles.get(n, n) for n in names)], [
              [c["label"], *(f"{bw(c, n, 'fwd')} / {bw(c, n, 'fwdbwd')}" for n in names)]
              for c in cases] + [["**geomean** (of copy)", *(" / ".join(
                f"{g:.0%}" if (g := s[f"{n}/copy/{d}"]["geomean"]) else "—" for d in ("fwd",
                                                                                     "fwdbwd"))
                for n in names)]])]
  if any(c["compile_s"].get("gnorm") for c in cases):
    lines += [f"## {prefix}Compile time (lower + compile, fresh function, warm process)", "",
              *_table(["shape", *(f"{titles.get(n, n)} fwd / fwd+bwd" for n in jax_names)], [
                [c["label"], *(f"{e['fwd'] * 1e3:.0f} / {e['fwdbwd'] * 1e3:.0f} ms"
                               if (e := c["compile_s"].get(n)) else "—" for n in jax_names)]
                for c in cases])]

  def mem(c, n, key):
    return c["memory"].get(n, {}).get(key)

  lines += [f"## {prefix}Memory", "", "Compiled temp bytes (`memory_analysis()"
            ".temp_size_in_bytes`), forward / forward+backward.", "",
            *_table(["shape", *(titles.get(n, n) for n in jax_names if n != "floor")], [
              [c["label"], *(f"{fmt_b(mem(c, n, 'fwd_temp_bytes'))} /"
                             f" {fmt_b(mem(c, n, 'fwdbwd_temp_bytes'))}"
                             for n in jax_names if n != "floor")] for c in cases]),
            "What the backward keeps: the array leaves of `jax.vjp`'s function (torch: the"
            " tensors autograd saves), in total and besides the input x; ×x = in x's bytes.", ""]
  rows = []
  for c in cases:
    for n in present:
      for v in variants(n):
        if r := mem(c, v, "residuals"):
          xb = r["x_bytes"] or 1
          rows.append([c["label"], titles.get(shown(v), v) + ("" if v == n else f" ({v[6:]})"),
                       f"{fmt_b(r['total_bytes'])} ({r['total_bytes'] / xb:.2f}×x)",
                       f"{fmt_b(r['bytes_excluding_x'])} ({r['bytes_excluding_x'] / xb:.2f}×x)",
                       ", ".join(r["full_size_leaves"]) or "—"])
  lines += _table(["shape", "impl", "kept", "kept besides x", "full-size leaves"], rows, 2)
  if "traffic/flax/gnorm/fwdbwd" in s:
    xs = {c["label"]: math.prod(c["shape"]) * (2 if c["dtype"] == "bfloat16" else 4) for c in cases}
    lines += [f"## {prefix}Memory traffic", "", "Bytes a compiled call reads and writes, XLA's"
              " estimate (`cost_analysis()['bytes accessed']`), in x-sizes, forward /"
              " forward+backward: where bandwidth sets the time, no implementation beats another"
              " by more than their ratio.", "", *_table(
                ["shape", *(titles.get(n, n) for n in jax_names if n != "floor"),
                 "fwd+bwd traffic flax/gnorm", "fwd+bwd speed flax/gnorm"], [
                  [c["label"], *(f"{mem(c, n, 'fwd_bytes_accessed') / xs[c['label']]:.1f} /"
                                 f" {mem(c, n, 'fwdbwd_bytes_accessed') / xs[c['label']]:.1f}"
                                 if mem(c, n, "fwd_bytes_accessed") else "—"
                                 for n in jax_names if n != "floor"),
                   fmt_x(mem(c, "flax", "fwdbwd_bytes_accessed")
                         / mem(c, "gnorm", "fwdbwd_bytes_accessed")),
                   fmt_x(t(c, "flax", "fwdbwd") / t(c, "gnorm", "fwdbwd"))] for c in cases])]
  lines += [f"## {prefix}Accuracy (eps = 1e-5 for all)", "", "max|error|/max|reference| of y"
            f" and of the worst gradient against a float64 NumPy reference ({BOUNDS_TEXT}).", "",
            *_table(["shape", *(titles.get(n, n) for n in present)], [
              [c["label"], *(" / ".join(
                f"{a['y_vs_ref']:.1e}, {a['grad_vs_ref']:.1e}" + ("" if a["ok"] else " **WRONG**")
                for v in variants(n) if (a := c["accuracy"].get(v))) or "—" for n in present)]
              for c in cases])]
  errors = [f"* {c['label']} {n}: {e}" for c in cases for n, e in c["errors"].items()]
  return lines + (["Failed to compile:", "", *errors, ""] if errors else [])


def to_markdown(r: dict, command: str) -> str:
  lines = _header(r, command)
  if r["cases"]:
    lines += _section(r, "", {})
  if r.get("fused", {}).get("cases"):
    lines += ["## Fused GroupNorm + SiLU", "", "`gnorm fused`: `group_norm(p, x, G,"
              ' activation="silu")`, SiLU in the same pass (its backward recomputes the'
              " pre-activation from x); the others apply `jax.nn.silu` (torch `F.silu`) after"
              " their GroupNorm. `other/gnorm` > 1: the fused gnorm is faster.", ""]
    lines += _section(r["fused"], "Fused: ", FUSED_TITLES)
  return "\n".join(lines)


def to_png(r: dict, path) -> bool:
  """The main section's time / floor per shape and implementation; False where none is drawn."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
  except Exception:  # noqa: BLE001
    print("matplotlib not importable: no chart written", file=sys.stderr)
    return False
  cases = r["cases"]
  names = [n for n in ORDER if any(t(c, n, "fwd") for c in cases)]
  if not cases:
    return False
  fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(cases) + 3), 8), sharex=True)
  width, xs = 0.8 / len(names), np.arange(len(cases))
  for ax, (d, title) in zip(axes, (("fwd", "forward"), ("fwdbwd", "forward + backward")),
                            strict=True):
    for i, n in enumerate(names):
      ax.bar(xs + (i - (len(names) - 1) / 2) * width,
             [(t(c, n, d) or np.nan) / t(c, "floor", "fwd") for c in cases], width, label=n)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set(ylabel="time / XLA floor (x*g+b fwd)", title=title, yscale="log")
    ax.grid(axis="y", which="both", alpha=0.3)
  axes[0].legend(ncol=len(names), fontsize=8)
  axes[1].set_xticks(xs, [c["label"].replace(" ", "\n", 1) for c in cases], fontsize=7)
  m = r["machine"]
  where = f"{m['cpu']}, {m['cores']} cores" if m["jax_backend"] == "cpu" else m["device"]
  fig.suptitle(f"gnorm vs others, lower is better — {where}, jax {m['versions']['jax']}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True
