"""Drop-in model benchmark (issue #14): one training step of a diffusion-style model with
flax's GroupNorm, with gnorm's linen drop-in, and with gnorm's fused GroupNorm + SiLU.

Usage::

  python benchmarks/drop_in.py [--quick] [--rounds N] [--out DIR] [--no-progress]
                               [--batch B] [--size S] [--width C] [--blocks N]
                               [--dtype float32|bfloat16] [--sample-ms MS] [--check-steps N]

The model (``gnorm_bench/model.py``) is a stack of the ResNet blocks of a Stable
Diffusion VAE decoder at small width, ``(norm -> silu -> conv3x3) x 2 + x``, in three
variants: ``flax`` (``flax.linen.GroupNorm(32)`` then ``nn.silu``), ``drop_in``
(``gnorm.compat.linen.GroupNorm(32)`` then ``nn.silu``: one import changed) and
``gnorm_fused`` (``gnorm.GroupNorm(32, epsilon=1e-6, activation="silu")``). All three
start from the same weights (flax's initialisation; the norms' scale ones, bias zeros)
and train with optax's adam on the mean squared error to a fixed random target.

Measured, in one process:

* agreement: the losses of ``--check-steps`` steps from the same start, each variant's
  max absolute and relative difference from flax's, and the max absolute difference
  of the model's output at the starting weights;
* times: the jitted train step (``value_and_grad`` + adam update; each call advances
  the variant's own state) and the jitted forward (the loss), medians over rounds in
  which every variant is timed back to back in a rotating order
  (``gnorm_bench.timing.time_interleaved``);
* memory: ``compiled.memory_analysis().temp_size_in_bytes`` of the compiled train step
  and forward, and the residuals the backward keeps (the leaves of ``jax.vjp``'s
  function, less the parameters and inputs themselves).

Writes ``latest.md`` and ``latest.json`` to ``--out`` (default
``benchmarks/results/drop_in``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
import types

import jax
import jax.numpy as jnp
import optax
from gnorm_bench import machine
from gnorm_bench.model import VARIANTS
from gnorm_bench.model import ResnetStack
from gnorm_bench.model import loss_fn
from gnorm_bench.model import params_for
from gnorm_bench.model import residuals
from gnorm_bench.model import train_step
from gnorm_bench.report_util import fmt_b
from gnorm_bench.report_util import fmt_t
from gnorm_bench.timing import progress_bar
from gnorm_bench.timing import time_interleaved

_OUT = pathlib.Path(__file__).resolve().parent / "results" / "drop_in"
# Full run: the SD VAE decoder's highest-resolution width (128) at 32x32; ~40 s on 2 cores.
FULL = {"batch": 4, "size": 32, "width": 128, "blocks": 3, "rounds": 30, "sample_ms": 100.0}
QUICK = {"batch": 2, "size": 8, "width": 32, "blocks": 1, "rounds": 2, "sample_ms": 2.0}
LEARNING_RATE = 1e-3
# Max relative difference of the losses from flax's that still counts as agreeing.
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 3e-2}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: a smoke test")
  p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 30; 2 quick)")
  p.add_argument("--out", default=str(_OUT), help="output directory (default: %(default)s)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--batch", type=int, default=None, help="batch size (default 4; 2 quick)")
  p.add_argument("--size", type=int, default=None, help="height = width (default 32; 8 quick)")
  p.add_argument("--width", type=int, default=None, help="channels (default 128; 32 quick)")
  p.add_argument("--blocks", type=int, default=None, help="ResNet blocks (default 3; 1 quick)")
  p.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="activation and convolution dtype; parameters stay float32",
  )
  p.add_argument(
    "--sample-ms",
    type=float,
    default=None,
    help="target duration of one timing sample (default 100; 2 quick)",
  )
  p.add_argument(
    "--check-steps", type=int, default=3, help="train steps whose losses are compared (default 3)"
  )
  return p


def _memory(compiled) -> int | None:
  m = compiled.memory_analysis()
  return None if m is None else int(m.temp_size_in_bytes)


def _dtype(cfg: dict):
  """The model's compute dtype: None (the inputs', float32) or bfloat16."""
  return None if cfg["dtype"] == "float32" else jnp.dtype(cfg["dtype"])


def _prepare(variant: str, cfg: dict, flax_params: dict, x, y) -> dict:
  """``variant``'s model, parameters, compiled step and forward, and its losses."""
  model = ResnetStack(variant, cfg["blocks"], _dtype(cfg))
  params = params_for(variant, flax_params, model, x)
  tx = optax.adam(LEARNING_RATE)
  opt_state = tx.init(params)
  t0 = time.perf_counter()
  step = jax.jit(train_step(model, tx)).lower(params, opt_state, x, y).compile()
  compile_s = time.perf_counter() - t0
  fwd = jax.jit(loss_fn(model)).lower(params, x, y).compile()

  # The model's output at the shared starting weights: a finer check than the losses.
  output = jax.jit(model.apply)({"params": params}, x).astype(jnp.float32)
  losses, state = [], (params, opt_state)
  for _ in range(cfg["check_steps"]):
    p, o, loss = step(*state, x, y)
    state = (p, o)
    losses.append(float(loss))

  timed = [params, opt_state]  # advanced by every timed call: a training loop

  def call_step():
    timed[0], timed[1], loss = step(timed[0], timed[1], x, y)
    return loss.block_until_ready()

  def call_fwd():
    return fwd(params, x, y).block_until_ready()

  return {
    "timed": types.SimpleNamespace(fwd=call_fwd, fwdbwd=call_step),
    "losses": losses,
    "output": output,
    "compile_s": compile_s,
    "temp_bytes_step": _memory(step),
    "temp_bytes_fwd": _memory(fwd),
    "residuals": residuals(model, params, x, y),
  }


def _ratio(a, b):
  return None if a is None or not b else a / b


def run(cfg: dict, progress: bool) -> dict:
  shape = (cfg["batch"], cfg["size"], cfg["size"], cfg["width"])
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape, jnp.float32)
  y = jax.random.normal(ky, shape, jnp.float32)
  flax_model = ResnetStack("flax", cfg["blocks"], _dtype(cfg))
  flax_params = dict(flax_model.init(kp, x)["params"])

  prepared = {v: _prepare(v, cfg, flax_params, x, y) for v in VARIANTS}
  bar = progress_bar(cfg["rounds"], "drop-in model", progress)
  times = time_interleaved(
    {v: p["timed"] for v, p in prepared.items()}, cfg["rounds"], cfg["sample_ms"] / 1e3, bar
  )
  if bar:
    bar.close()

  ref = prepared["flax"]
  rtol = LOSS_RTOL[cfg["dtype"]]
  out = {}
  for v, p in prepared.items():
    diffs = [abs(a - b) for a, b in zip(p["losses"], ref["losses"], strict=True)]
    rels = [d / max(abs(b), 1e-30) for d, b in zip(diffs, ref["losses"], strict=True)]
    step_t, fwd_t = times[f"{v}/fwdbwd"], times[f"{v}/fwd"]
    out[v] = {
      "losses": p["losses"],
      "loss_max_abs_diff_vs_flax": max(diffs),
      "loss_max_rel_diff_vs_flax": max(rels),
      "loss_agrees": max(rels) <= rtol,
      "output_max_abs_diff_vs_flax": float(jnp.max(jnp.abs(p["output"] - ref["output"]))),
      "step": step_t,
      "fwd": fwd_t,
      "step_ratio_vs_flax": _ratio(step_t["median_s"], times["flax/fwdbwd"]["median_s"]),
      "fwd_ratio_vs_flax": _ratio(fwd_t["median_s"], times["flax/fwd"]["median_s"]),
      "compile_s": p["compile_s"],
      "temp_bytes_step": p["temp_bytes_step"],
      "temp_bytes_fwd": p["temp_bytes_fwd"],
      "temp_step_ratio_vs_flax": _ratio(p["temp_bytes_step"], ref["temp_bytes_step"]),
      "temp_fwd_ratio_vs_flax": _ratio(p["temp_bytes_fwd"], ref["temp_bytes_fwd"]),
      "residuals": p["residuals"],
      "residual_ratio_vs_flax": _ratio(
        p["residuals"]["total_bytes"], ref["residuals"]["total_bytes"]
      ),
    }
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(flax_params))
  return {
    "model": {"shape": list(shape), "parameters": int(n_params), "loss_rtol": rtol, **cfg},
    "variants": out,
  }


def _machine_lines(m: dict) -> list[str]:
  """The machine, as ``bench.py``'s ``latest.md`` writes it."""
  device = f", device `{m['device']}`" if m.get("device") else ""
  return [
    f"Machine: {m['cpu']}, {m['cores']} cores ({m['platform']}), JAX backend "
    f"`{m['jax_backend']}`{device}; Python {m['python']}; "
    + ", ".join(f"{k} {val}" for k, val in m["versions"].items() if val and k != "gnorm")
    + ".",
    f"Load average (1, 5, 15 min) at start {m.get('loadavg_start')}, at end"
    f" {m.get('loadavg_end')} (above the core count, other processes shared the machine:"
    " trust ratios more than times).",
  ]


def _fmt_ratio(r: float | None) -> str:
  return "—" if r is None else f"{r:.2f}×"


def to_markdown(results: dict, command: str) -> str:
  m, v = results["model"], results["variants"]
  lines = [
    "# gnorm drop-in model benchmark",
    "",
    f"`{command}` — {results['machine']['date_utc']}, {machine.provenance(results['machine'])}",
    "",
    *_machine_lines(results["machine"]),
    "",
    f"Model: {m['blocks']} SD-VAE-decoder ResNet blocks ((GroupNorm(32) -> SiLU ->"
    f" conv3x3) × 2 + x) at width {m['width']}, input {tuple(m['shape'])}, {m['dtype']}"
    f" activations, {m['parameters']:,} parameters; one step = value_and_grad of the MSE"
    f" to a random target + optax adam ({LEARNING_RATE}), jitted. Times: medians over"
    f" {m['rounds']} interleaved rounds. Ratios are variant / flax (< 1: smaller or"
    " faster than flax). Temp memory: `memory_analysis().temp_size_in_bytes` of the"
    " compiled step; residuals: the arrays the backward keeps, parameters and inputs"
    " excluded.",
    "",
    "| variant | train step | vs flax | forward | vs flax | step temp memory | vs flax"
    " | residuals | vs flax | loss max rel diff vs flax |",
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for name, r in v.items():
    agree = "" if r["loss_agrees"] else " **(disagrees)**"
    lines.append(
      f"| {name} | {fmt_t(r['step']['median_s'])} | {_fmt_ratio(r['step_ratio_vs_flax'])}"
      f" | {fmt_t(r['fwd']['median_s'])} | {_fmt_ratio(r['fwd_ratio_vs_flax'])}"
      f" | {fmt_b(r['temp_bytes_step'])} | {_fmt_ratio(r['temp_step_ratio_vs_flax'])}"
      f" | {fmt_b(r['residuals']['total_bytes'])} | {_fmt_ratio(r['residual_ratio_vs_flax'])}"
      f" | {r['loss_max_rel_diff_vs_flax']:.1e}{agree} |"
    )
  best = [
    f"{name} {_fmt_ratio(_ratio(r[d]['min_s'], v['flax'][d]['min_s']))} ({label})"
    for name, r in v.items()
    if name != "flax"
    for d, label in (("step", "step"), ("fwd", "forward"))
  ]
  lines += [
    "",
    "From best-of-rounds times instead of medians, vs flax: " + ", ".join(best) + ".",
    "",
    f"Losses over the first {m['check_steps']} steps from the same weights (agreement:"
    f" max relative difference from flax's <= {m['loss_rtol']:g}):",
    "",
  ]
  for name, r in v.items():
    losses = ", ".join(f"{loss:.6f}" for loss in r["losses"])
    lines.append(
      f"* {name}: {losses} (max abs diff {r['loss_max_abs_diff_vs_flax']:.1e}); output"
      f" at the starting weights, max abs diff {r['output_max_abs_diff_vs_flax']:.1e};"
      f" step compile {r['compile_s']:.1f} s"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  base = QUICK if args.quick else FULL
  cfg = {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in base}
  cfg.update(dtype=args.dtype, check_steps=max(1, args.check_steps), quick=args.quick)
  t0 = time.perf_counter()
  info = machine.machine_info(machine.threads())
  info["versions"]["optax"] = optax.__version__
  results = run(cfg, progress=not args.no_progress)
  info["loadavg_end"] = machine.loadavg()
  results = {"machine": info, **results, "wall_s": time.perf_counter() - t0}
  argv_shown = argv if argv is not None else sys.argv[1:]
  command = ("python benchmarks/drop_in.py " + " ".join(argv_shown)).strip()
  os.makedirs(args.out, exist_ok=True)
  md = to_markdown(results, command)
  with open(os.path.join(args.out, "latest.md"), "w") as fh:
    fh.write(md)
  with open(os.path.join(args.out, "latest.json"), "w") as fh:
    json.dump(results, fh, indent=1)
  print(md)
  print(f"wrote {args.out}/latest.{{md,json}} in {results['wall_s']:.0f} s", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
