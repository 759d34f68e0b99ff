"""The schema of ``tuning_table.json`` (version 1), and its validation.

The table (``tuning.py`` reads it; ``benchmarks/pallas_sweep.py`` writes it)::

  {"schema_version": 1,
   "provenance": {"measured_on_gpu", "note", "written", "by"},   # the file's
   "measurements": [                                             # one per GPU
     {"device_kind": "NVIDIA H200", "platform": "gpu", "dry_run": false,
      "versions": {"jax", "jaxlib", ...}, "date_utc", "gnorm_commit", "command",
      "method", "min_speedup", ["budget_s", "wall_s", "not_swept", "notes"],
      "entries": [                                               # one per shape class
        {"dtype", "channels_last", "size_class", "forward_plan",  # the class
         "implementation": "pallas" | "xla",
         "forward": {"bs", "bc", "warps"} | null, "backward": ... | null,
         "case": {"shape", "groups"},                            # the one measured
         "us": {"pallas_fwd", "pallas_fwdbwd", "xla_fwd", "xla_fwdbwd",
                "loop_fwd", "loop_fwdbwd"},                      # net us per call
         ["reason", "candidates", "spread"]}]}]}

``validate`` checks all of it and names the file and the field in every error;
``check_installable`` also refuses what the package's table must not hold (a
dry run, a measurement made off a GPU).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

SCHEMA_VERSION = 1

_M = 2**20
# (name, least elements, elements from which the next class starts); why the edges
# are where they are: tuning.py's docstring.
SIZE_CLASSES: tuple[tuple[str, int, int | None], ...] = (
    ("<1M", 0, _M),
    ("1M-8M", _M, 8 * _M),
    ("8M-32M", 8 * _M, 32 * _M),
    (">=32M", 32 * _M, None),
)
FORWARD_PLANS = ("tiled", "one_pass")
DTYPES = ("bfloat16", "float16", "float32", "float64")
IMPLEMENTATIONS = ("pallas", "xla")
WARPS = (0, 1, 2, 4, 8, 16, 32)  # 0: compiler_params' heuristic
TIMES = ("pallas_fwd", "pallas_fwdbwd", "xla_fwd", "xla_fwdbwd", "loop_fwd", "loop_fwdbwd")


class TableError(ValueError):
  """The tuning table is malformed; the message names the file and the field."""


class Key(NamedTuple):
  """A shape class: what an entry of a measurement is looked up by."""

  dtype: str
  channels_last: bool
  size_class: str
  forward_plan: str

  def describe(self) -> str:
    layout = "channels-last" if self.channels_last else "channels-first"
    return f"{self.dtype} {layout} {self.size_class} {self.forward_plan}"


def size_class(elements: int) -> str:
  """The name of the size class of a tensor of ``elements`` elements."""
  for name, lo, hi in SIZE_CLASSES:
    if elements >= lo and (hi is None or elements < hi):
      return name
  raise ValueError(f"elements must be >= 0, got {elements}")


# Validation: every error names the file and the field.


def _fail(source: str, where: str, what: str) -> TableError:
  return TableError(f"{source}: {where}: {what}")


def _expect(ok: bool, source: str, where: str, what: str) -> None:
  if not ok:
    raise _fail(source, where, what)


def _fields(obj: Any, source: str, where: str, required: Mapping[str, Any],
            optional: Mapping[str, Any] | None = None) -> None:
  """``obj`` is an object with every key of ``required``, no key outside
  ``required`` and ``optional``, each of the type named there."""
  optional = optional or {}
  _expect(isinstance(obj, dict), source, where, f"must be an object, got {type(obj).__name__}")
  missing = [k for k in required if k not in obj]
  _expect(not missing, source, where, f"lacks {missing}")
  unknown = sorted(set(obj) - set(required) - set(optional))
  _expect(not unknown, source, where,
          f"has unknown fields {unknown} (schema version {SCHEMA_VERSION} knows "
          f"{sorted({**required, **optional})})")
  for k, types in {**required, **optional}.items():
    if k in obj:
      v = obj[k]
      # bool is an int in Python: a number field must not take true/false.
      ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in _tuple(types))
      _expect(ok, source, f"{where}.{k}",
              f"must be {_type_names(types)}, got {json.dumps(v)[:60]}")


def _tuple(types: Any) -> tuple:
  return types if isinstance(types, tuple) else (types,)


def _type_names(types: Any) -> str:
  names = {dict: "an object", list: "a list", str: "a string", bool: "true or false",
           int: "an integer", float: "a number", type(None): "null"}
  return " or ".join(dict.fromkeys(names[t] for t in _tuple(types)))


_NUMBER = (int, float)


def _block(obj: Any, source: str, where: str) -> None:
  _fields(obj, source, where, {"bs": int, "bc": int, "warps": int})
  for k in ("bs", "bc"):
    v = obj[k]
    _expect(v >= 1 and v & (v - 1) == 0, source, f"{where}.{k}",
            f"{v} is not a power of two (Triton's blocks are)")
  _expect(obj["warps"] in WARPS, source, f"{where}.warps", f"{obj['warps']} not in {WARPS}")


def _entry(e: Any, source: str, where: str, min_speedup: float) -> Key:
  _fields(e, source, where, {
      "dtype": str, "channels_last": bool, "size_class": str, "forward_plan": str,
      "implementation": str, "forward": (dict, type(None)), "backward": (dict, type(None)),
      "case": dict, "us": dict,
  }, {"reason": str, "candidates": list, "spread": _NUMBER})
  for k, allowed in (("dtype", DTYPES), ("size_class", [c[0] for c in SIZE_CLASSES]),
                     ("forward_plan", FORWARD_PLANS), ("implementation", IMPLEMENTATIONS)):
    _expect(e[k] in allowed, source, f"{where}.{k}", f"{e[k]!r} not in {list(allowed)}")
  for k in ("forward", "backward"):
    if e[k] is not None:
      _block(e[k], source, f"{where}.{k}")
  case = e["case"]
  _fields(case, source, f"{where}.case", {"shape": list, "groups": int})
  shape = case["shape"]
  _expect(len(shape) >= 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                  for d in shape), source, f"{where}.case.shape",
          f"must be positive integers, got {shape}")
  _expect(size_class(math.prod(shape)) == e["size_class"], source, f"{where}.case.shape",
          f"{shape} has {math.prod(shape):,} elements: class {size_class(math.prod(shape))!r},"
          f" not {e['size_class']!r}")
  us = e["us"]
  _fields(us, source, f"{where}.us", {k: (*_NUMBER, type(None)) for k in TIMES})
  for k, v in us.items():
    _expect(v is None or (math.isfinite(v) and v > 0), source, f"{where}.us.{k}",
            f"must be a positive number of microseconds or null, got {v}")
  if e["implementation"] == "pallas":
    # The table's own numbers must justify the kernels: a hand edit cannot
    # switch a class to Pallas without a measurement that shows it faster.
    _expect(e["backward"] is not None and (e["forward"] is not None
                                           or e["forward_plan"] == "one_pass"),
            source, where, "implementation 'pallas' needs its forward and backward blocks")
    p, x = us["pallas_fwdbwd"], us["xla_fwdbwd"]
    _expect(p is not None and x is not None and x >= min_speedup * p, source, f"{where}.us",
            f"implementation 'pallas' needs xla_fwdbwd >= {min_speedup} x pallas_fwdbwd"
            f" (the measurement's min_speedup), got {x} and {p}")
  return Key(e["dtype"], e["channels_last"], e["size_class"], e["forward_plan"])


def _measurement(m: Any, source: str, where: str) -> None:
  _fields(m, source, where, {
      "device_kind": str, "platform": str, "dry_run": bool, "versions": dict, "date_utc": str,
      "gnorm_commit": str, "command": str, "method": str, "min_speedup": _NUMBER,
      "entries": list,
  }, {"budget_s": _NUMBER, "wall_s": _NUMBER, "not_swept": list, "notes": list})
  _expect(bool(m["device_kind"].strip()), source, f"{where}.device_kind", "is empty")
  versions = m["versions"]
  _fields(versions, source, f"{where}.versions", {"jax": str, "jaxlib": str},
          {k: (str, type(None)) for k in ("python", "triton", "jax-cuda12-plugin",
                                          "jax-cuda13-plugin", "numpy")})
  _expect(m["min_speedup"] >= 1, source, f"{where}.min_speedup",
          f"must be >= 1, got {m['min_speedup']}")
  seen: dict[Key, int] = {}
  for i, e in enumerate(m["entries"]):
    k = _entry(e, source, f"{where}.entries[{i}]", m["min_speedup"])
    _expect(k not in seen, source, f"{where}.entries[{i}]",
            f"repeats the class of entries[{seen.get(k)}] ({k.describe()})")
    seen[k] = i


def validate(data: Any, source: str = "tuning table") -> None:
  """Raises ``TableError`` unless ``data`` is a table of this schema version.

  Args:
    data: the parsed JSON.
    source: the file (or other origin) named in the errors.

  Raises:
    TableError: naming ``source``, the field and what is wrong with it.
  """
  _fields(data, source, "table", {"schema_version": int, "provenance": dict,
                                  "measurements": list})
  _expect(data["schema_version"] == SCHEMA_VERSION, source, "table.schema_version",
          f"{data['schema_version']} is not {SCHEMA_VERSION}, the version this gnorm reads")
  _fields(data["provenance"], source, "table.provenance",
          {"measured_on_gpu": bool, "note": str, "written": str, "by": str})
  kinds: dict[str, int] = {}
  for i, m in enumerate(data["measurements"]):
    _measurement(m, source, f"table.measurements[{i}]")
    _expect(m["device_kind"] not in kinds, source, f"table.measurements[{i}].device_kind",
            f"{m['device_kind']!r} was measured in measurements[{kinds.get(m['device_kind'])}]"
            " already (one measurement per device)")
    kinds[m["device_kind"]] = i
  on_gpu = any(m["platform"] == "gpu" and not m["dry_run"] for m in data["measurements"])
  _expect(data["provenance"]["measured_on_gpu"] == on_gpu, source,
          "table.provenance.measured_on_gpu",
          f"says {data['provenance']['measured_on_gpu']}, the measurements say {on_gpu}")


def check_installable(data: dict, source: str = "tuning table") -> None:
  """Raises ``TableError`` unless every measurement of a valid table was made on a GPU,
  not in a dry run: what the package's table may hold."""
  validate(data, source)
  for i, m in enumerate(data["measurements"]):
    _expect(m["platform"] == "gpu" and not m["dry_run"], source, f"table.measurements[{i}]",
            f"was {'a dry run' if m['dry_run'] else 'made'} on {m['platform']!r}"
            f" ({m['device_kind']}): its times mean nothing for a GPU")
