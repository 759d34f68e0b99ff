"""What a compiled XLA program does, read off its optimized HLO: kernels and bytes.

``kernels(compiled)`` lists the top-level operations of the entry computation
that launch work on the device (fusions, custom calls, copies, ...), each with
the bytes it reads and writes, counted from the shapes:

* an operand that a fusion only slices counts as the slice it reads;
* one buffer passed to a fusion as several parameters counts once (a kernel
  that loads the same address twice gets the second load from cache);
* outputs count in full.

It is a model, not a measurement: a kernel that re-reads a buffer its
predecessor just wrote may find it in L2, and a reduction with too few blocks
is slow however few bytes it moves. It is what ``xla_gpu_plan.py`` reports,
and it is exact about what the compiler chose to write to memory.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_TYPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_INSTR = re.compile(r"(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*?)\)(?:, |$)")
_HEAD = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
# Entry operations that run on the device (everything else is bookkeeping:
# parameters, tuples, bitcasts, constants).
_LAUNCHES = {"fusion", "custom-call", "copy", "reduce", "convolution", "dot", "transpose",
             "all-reduce", "all-gather", "sort", "scatter", "gather", "while", "conditional"}


class Kernel(NamedTuple):
  name: str
  kind: str  # kLoop, kInput (a reduction), kCustom, or the HLO opcode
  result: str  # the result type(s), as HLO prints them
  read: int  # bytes
  written: int  # bytes


def type_bytes(text: str) -> int:
  """Bytes of every array type in ``text`` (a shape or a tuple of shapes)."""
  return sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
             for dt, dims in _TYPE.findall(text))


def _computations(text: str) -> dict[str, list[tuple]]:
  comps: dict[str, list[tuple]] = {}
  current = None
  for line in text.splitlines():
    head = _HEAD.match(line)
    if head:
      current = comps.setdefault(head.group(1), [])
    elif line.startswith("}"):
      current = None
    elif current is not None:
      m = _INSTR.match(line.strip())
      if m:
        args = [a.strip().lstrip("%") for a in m.group(4).split(",") if a.strip()]
        current.append((m.group(1), m.group(2), m.group(3), args, line))
  return comps


def _parameter_reads(body: list[tuple]) -> dict[int, int]:
  """Bytes a fused computation reads of each parameter (slices: their part)."""
  users: dict[str, list[tuple]] = {}
  for name, typ, op, args, _ in body:
    for a in args:
      users.setdefault(a, []).append((name, typ, op))

  def read(name: str, full: int) -> int:
    total = 0
    for uname, utyp, uop in users.get(name, []):
      if uop in ("slice", "dynamic-slice"):
        total += type_bytes(utyp)
      elif uop == "bitcast":
        total += read(uname, full)
      else:
        return full
    return min(total, full)

  return {int(re.search(r"parameter\((\d+)\)", line).group(1)): read(name, type_bytes(typ))
          for name, typ, op, _, line in body if op == "parameter"}


def kernels(hlo_text: str) -> list[Kernel]:
  """The device work of an optimized HLO module's entry computation."""
  text = re.sub(r", metadata=\{[^}]*\}", "", hlo_text)
  comps = _computations(text)
  entry = next(name for name in reversed(list(comps)) if re.search(
      r"^ENTRY %?" + re.escape(name) + " ", text, re.M))
  sizes: dict[str, int] = {}
  alias: dict[str, str] = {}  # bitcasts and tuple elements -> the buffer they view
  tuples: dict[str, list[str]] = {}
  found = []
  for name, typ, op, args, line in comps[entry]:
    sizes[name] = type_bytes(typ)
    base = [alias.get(a, a) for a in args]
    if op == "bitcast" and base:
      alias[name] = base[0]
    elif op == "get-tuple-element" and base:
      index = int(re.search(r"index=(\d+)", line).group(1))
      alias[name] = tuples.get(base[0], [])[index] if base[0] in tuples else base[0]
    elif op == "tuple":
      tuples[name] = base
    if op not in _LAUNCHES:
      continue
    called = re.search(r"calls=%?([\w.\-]+)", line)
    per_param = _parameter_reads(comps.get(called.group(1), [])) if called else {}
    reads: dict[str, int] = {}
    for i, (a, b) in enumerate(zip(args, base, strict=True)):
      reads[b] = max(reads.get(b, 0), per_param.get(i, sizes.get(a, 0)))
    kind = re.search(r"kind=(\w+)", line)
    found.append(Kernel(name, kind.group(1) if kind else op, typ, sum(reads.values()),
                        sizes[name]))
  return found


def summary(compiled, x_bytes: int) -> dict:
  """Kernel count and modelled traffic (in units of ``x_bytes``) of a ``Compiled``."""
  ks = kernels(compiled.as_text())
  moved = sum(k.read + k.written for k in ks)
  return {
      "kernels": len(ks),
      "traffic_x": moved / x_bytes,
      # Arrays of at least x's size that the program writes (other than the
      # outputs it must write): what a lean plan avoids.
      "full_size_writes": [k.result for k in ks if k.written >= x_bytes],
      "detail": [k._asdict() for k in ks],
  }
