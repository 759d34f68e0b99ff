"""Number formats and the bandwidth table, shared by both sections' markdown."""

from __future__ import annotations

from .summary import bandwidth


def fmt_t(s: float | None) -> str:
  if s is None:
    return "—"
  if s < 1e-3:
    return f"{s * 1e6:.0f} µs"
  return f"{s * 1e3:.2f} ms"


def fmt_b(b: int | None) -> str:
  if b is None:
    return "—"
  return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def fmt_met(met: bool | None) -> str:
  """A target check's ``met``: None where the target does not apply."""
  return "n/a" if met is None else "yes" if met else "**no**"


def fmt_frac(f: float | None) -> str:
  if f is None:
    return "—"
  return f"{f:.0%}" if f >= 0.1 else f"{f:.1%}"


def fmt_gbs(gb_s: float) -> str:
  return f"{gb_s:.0f} GB/s" if gb_s >= 100 else f"{gb_s:.1f} GB/s"


def bandwidth_cell(e: dict | None) -> str:
  if e is None:
    return "—"
  return f"{fmt_gbs(e['gb_per_s'])} ({fmt_frac(e['fraction_of_copy'])})"


BANDWIDTH_TEXT = (
  "Achieved bandwidth: the bytes a pass must move (forward: read x, write y;"
  " forward+backward: read x, write y, read dy, write dx; each in the dtype the"
  " implementation reads or writes it, gamma and beta ignored) / the median time,"
  " in GB/s and, in parentheses, as a fraction of the copy bandwidth measured in"
  " the same run ({copy})."
)


def bandwidth_rows(results: dict, section: dict, names: list, titles: dict | None = None):
  """The bandwidth table of ``section``: one row per case, cells fwd / fwd+bwd."""
  cb = results["machine"].get("copy_bandwidth")
  s, titles = section["summary"], titles or {}
  on_cpu = results["machine"]["jax_backend"] == "cpu"
  lines = [
    BANDWIDTH_TEXT.format(copy=fmt_gbs(cb["gb_per_s"]) if cb else "not measured"),
    # Why the CPU's fractions pass 100% (see machine.COPY_MIB).
    "On the CPU the copy's 64 MiB output is mapped afresh on every call, so page"
    " faults set its time, while the shapes' tensors (a few MiB) mostly reuse"
    " memory and can stay in the caches: fractions above 100% are normal there;"
    " the yardstick is meant for GPUs and TPUs."
    if on_cpu
    else None,
    "Cells: forward / forward+backward.",
    "",
    "| shape | " + " | ".join(titles.get(n, n) for n in names) + " |",
    "|---|" + "|".join(["--:"] * len(names)) + "|",
  ]
  for c in section["cases"]:
    cells = [
      " / ".join(bandwidth_cell(bandwidth(c, n, d)) for d in ("fwd", "fwdbwd")) for n in names
    ]
    lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
  gm = [
    " / ".join(
      fmt_frac(e["geomean"]) if (e := s.get(f"{n}/copy/{d}")) else "—" for d in ("fwd", "fwdbwd")
    )
    for n in names
  ]
  lines += ["| **geomean** (of copy) | " + " | ".join(gm) + " |", ""]
  return [line for line in lines if line is not None]


