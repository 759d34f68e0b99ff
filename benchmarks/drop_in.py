"""Drop-in model benchmark: one training step of a stack of Stable Diffusion VAE-decoder ResNet
blocks with flax's GroupNorm, with gnorm's linen drop-in, and with gnorm's fused GroupNorm + SiLU.

  python benchmarks/drop_in.py [--quick] [--rounds N] [--out DIR] [--no-progress]
                               [--batch B] [--size S] [--width C] [--blocks N]
                               [--dtype float32|bfloat16] [--sample-ms MS] [--check-steps N]

A block is ``(norm -> silu -> conv3x3) x 2 + x`` at the input's width; ``norm -> silu`` is
``flax.linen.GroupNorm(32)`` then ``nn.silu`` (flax), ``gnorm.compat.linen.GroupNorm(32)`` then
``nn.silu`` (drop_in: one import changed), or ``gnorm.GroupNorm(32, epsilon=1e-6,
activation="silu")`` (gnorm_fused, flax's epsilon). All start from the same weights (flax's
initialisation, the norms' scale ones and bias zeros); a step is ``value_and_grad`` of the MSE
to a random target and optax's adam, jitted. Measured in one process: the losses of the first
steps and the output at the starting weights against flax's; the step's and the forward's
median times over interleaved rounds; the compiled step's and forward's temp bytes; the arrays
the backward keeps. Writes latest.md and latest.json to --out.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from gnorm_bench import common

import gnorm
from gnorm.compat import linen as compat

VARIANTS = ("flax", "drop_in", "gnorm_fused")
GROUPS, EPSILON, LEARNING_RATE = 32, 1e-6, 1e-3
FULL = {"batch": 4, "size": 32, "width": 128, "blocks": 3, "rounds": 30, "sample_ms": 100.0}
QUICK = {"batch": 2, "size": 8, "width": 32, "blocks": 1, "rounds": 2, "sample_ms": 2.0}
LOSS_RTOL = {"float32": 1e-4, "bfloat16": 3e-2}  # losses agree with flax's within this


class NormAct(nn.Module):
  variant: str
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    if self.variant == "gnorm_fused":  # output in x's dtype, SiLU fused
      return gnorm.GroupNorm(GROUPS, epsilon=EPSILON, activation="silu", name="norm")(x)
    cls = {"flax": nn.GroupNorm, "drop_in": compat.GroupNorm}[self.variant]
    return nn.silu(cls(GROUPS, epsilon=EPSILON, dtype=self.dtype, name="norm")(x))


class ResnetStack(nn.Module):
  """``blocks`` SD VAE-decoder ResNet blocks (no time embedding, no dropout, in = out)."""

  variant: str
  blocks: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = x if self.dtype is None else x.astype(self.dtype)
    for i in range(self.blocks):
      h = x
      for j in (1, 2):
        h = NormAct(self.variant, self.dtype, name=f"block{i}_act{j}")(h)
        h = nn.Conv(x.shape[-1], (3, 3), padding="SAME", dtype=self.dtype,
                    name=f"block{i}_conv{j}")(h)
      x = x + h
    return x


def params_for(variant: str, flax_params: dict, model: ResnetStack, x) -> dict:
  """flax's convolution weights; every norm's scale ones and bias zeros, named as ``variant``
  names them (checked against its own init)."""
  def convert(tree):
    if set(tree) == {"norm"}:
      s, b = jnp.ones_like(tree["norm"]["scale"]), jnp.zeros_like(tree["norm"]["bias"])
      return {"norm": {"gamma": s, "beta": b} if variant == "gnorm_fused" else
              {"scale": s, "bias": b}}
    return {k: convert(v) if isinstance(v, dict) else v for k, v in tree.items()}

  params = convert(flax_params)
  want = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(dict(want)):
    raise ValueError(f"{variant}: parameter trees differ")
  return params


def loss_fn(model):
  return lambda p, x, y: jnp.mean(jnp.square(model.apply({"params": p}, x).astype(jnp.float32)
                                             - y))


def residuals(model, params, x, y) -> dict:
  """What the loss's backward keeps: the leaves of ``jax.vjp``'s function (listed by tracing),
  less the parameters and inputs themselves."""
  loss = loss_fn(model)
  jaxpr = jax.make_jaxpr(lambda p, x: jax.tree_util.tree_leaves(
    jax.vjp(lambda p, x: loss(p, x, y), p, x)[1]))(params, x).jaxpr
  inputs = set(map(id, jaxpr.invars))
  kept = [v.aval for v in jaxpr.outvars if hasattr(v.aval, "shape") and id(v) not in inputs]
  return {"total_bytes": sum(a.size * a.dtype.itemsize for a in kept), "arrays": len(kept)}


def prepare(variant: str, cfg: dict, flax_params: dict, x, y) -> dict:
  dtype = None if cfg["dtype"] == "float32" else jnp.dtype(cfg["dtype"])
  model = ResnetStack(variant, cfg["blocks"], dtype)
  params = params_for(variant, flax_params, model, x)
  tx = optax.adam(LEARNING_RATE)
  opt_state = tx.init(params)
  loss = loss_fn(model)

  def step(p, o, x, y):
    value, grads = jax.value_and_grad(loss)(p, x, y)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  t0 = time.perf_counter()
  step_c = jax.jit(step).lower(params, opt_state, x, y).compile()
  compile_s = time.perf_counter() - t0
  fwd_c = jax.jit(loss).lower(params, x, y).compile()
  losses, state = [], (params, opt_state)
  for _ in range(cfg["check_steps"]):
    *state, value = step_c(*state, x, y)
    losses.append(float(value))
  timed = [params, opt_state]  # advanced by every timed step, as in a training loop

  def call_step():
    timed[0], timed[1], value = step_c(timed[0], timed[1], x, y)
    return value.block_until_ready()

  return {"timed": {"fwd": lambda: fwd_c(params, x, y).block_until_ready(), "fwdbwd": call_step},
          "losses": losses, "compile_s": compile_s,
          "output": jax.jit(model.apply)({"params": params}, x).astype(jnp.float32),
          "temp_bytes_step": step_c.memory_analysis().temp_size_in_bytes,
          "temp_bytes_fwd": fwd_c.memory_analysis().temp_size_in_bytes,
          "residuals": residuals(model, params, x, y)}


def run(cfg: dict, progress: bool) -> dict:
  shape = (cfg["batch"], cfg["size"], cfg["size"], cfg["width"])
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x, y = jax.random.normal(kx, shape), jax.random.normal(ky, shape)
  flax_params = dict(ResnetStack("flax", cfg["blocks"]).init(kp, x)["params"])
  prepared = {v: prepare(v, cfg, flax_params, x, y) for v in VARIANTS}
  bar = common.progress_bar(cfg["rounds"], "drop-in model", progress)
  times = common.time_interleaved({v: p["timed"] for v, p in prepared.items()}, cfg["rounds"],
                                  cfg["sample_ms"] / 1e3, bar)
  if bar:
    bar.close()
  ref = prepared["flax"]
  out = {}
  for v, p in prepared.items():
    rel = max(abs(a - b) / max(abs(b), 1e-30)
              for a, b in zip(p["losses"], ref["losses"], strict=True))
    step, fwd = times[f"{v}/fwdbwd"], times[f"{v}/fwd"]
    out[v] = {
      "losses": p["losses"], "loss_max_rel_diff_vs_flax": rel,
      "loss_agrees": rel <= LOSS_RTOL[cfg["dtype"]],
      "output_max_abs_diff_vs_flax": float(jnp.max(jnp.abs(p["output"] - ref["output"]))),
      "step": step, "fwd": fwd, "compile_s": p["compile_s"],
      "step_ratio_vs_flax": step["median_s"] / times["flax/fwdbwd"]["median_s"],
      "fwd_ratio_vs_flax": fwd["median_s"] / times["flax/fwd"]["median_s"],
      "temp_bytes_step": p["temp_bytes_step"], "temp_bytes_fwd": p["temp_bytes_fwd"],
      "temp_step_ratio_vs_flax": p["temp_bytes_step"] / max(ref["temp_bytes_step"], 1),
      "residuals": p["residuals"],
      "residual_ratio_vs_flax": p["residuals"]["total_bytes"] / ref["residuals"]["total_bytes"]}
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(flax_params))
  return {"model": {"shape": list(shape), "parameters": int(n_params), **cfg}, "variants": out}


def to_markdown(r: dict, command: str) -> str:
  m, v, info = r["model"], r["variants"], r["machine"]
  lines = [
    "# gnorm drop-in model benchmark", "",
    f"`{command}` — {info['date_utc']}, {common.provenance(info)}", "", common.machine_line(info),
    f"Load average (1, 5, 15 min) at start {info['loadavg_start']}, at end"
    f" {info['loadavg_end']} (above the core count, other processes shared the machine).", "",
    f"Model: {m['blocks']} SD-VAE-decoder ResNet blocks ((GroupNorm(32) -> SiLU -> conv3x3) × 2"
    f" + x) at width {m['width']}, input {tuple(m['shape'])}, {m['dtype']} activations,"
    f" {m['parameters']:,} parameters; a step = value_and_grad of the MSE + optax adam"
    f" ({LEARNING_RATE}), jitted. Medians over {m['rounds']} interleaved rounds; ratios are"
    " variant / flax (< 1: smaller or faster). Temp memory: `memory_analysis()"
    ".temp_size_in_bytes` of the compiled step; residuals: the arrays the backward keeps,"
    " parameters and inputs excluded.", "",
    "| variant | train step | vs flax | forward | vs flax | step temp memory | vs flax"
    " | residuals | vs flax | loss max rel diff vs flax |",
    "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
  for name, e in v.items():
    lines.append(
      f"| {name} | {common.fmt_t(e['step']['median_s'])} | {common.fmt_x(e['step_ratio_vs_flax'])}"
      f" | {common.fmt_t(e['fwd']['median_s'])} | {common.fmt_x(e['fwd_ratio_vs_flax'])}"
      f" | {common.fmt_b(e['temp_bytes_step'])} | {common.fmt_x(e['temp_step_ratio_vs_flax'])}"
      f" | {common.fmt_b(e['residuals']['total_bytes'])}"
      f" | {common.fmt_x(e['residual_ratio_vs_flax'])}"
      f" | {e['loss_max_rel_diff_vs_flax']:.1e}{'' if e['loss_agrees'] else ' **(disagrees)**'} |")
  lines += ["", f"Losses of the first {m['check_steps']} steps (agreement: max relative"
            f" difference from flax's <= {LOSS_RTOL[m['dtype']]:g}):", ""]
  lines += [f"* {n}: {', '.join(f'{x:.6f}' for x in e['losses'])}; output at the starting"
            f" weights, max abs diff from flax's {e['output_max_abs_diff_vs_flax']:.1e}; step"
            f" compile {e['compile_s']:.1f} s" for n, e in v.items()]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: a smoke test")
  for k, default in FULL.items():
    p.add_argument(f"--{k.replace('_', '-')}", type=type(default), default=None,
                   help=f"default {default}; {QUICK[k]} with --quick")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="activations and convolutions (parameters stay float32)")
  p.add_argument("--check-steps", type=int, default=3, help="steps whose losses are compared")
  p.add_argument("--out", default=str(common.ROOT / "benchmarks" / "results" / "drop_in"))
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  base = QUICK if args.quick else FULL
  cfg = {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in base}
  cfg.update(dtype=args.dtype, check_steps=max(1, args.check_steps), quick=args.quick)
  t0 = time.perf_counter()
  info = common.machine_info()
  results = run(cfg, progress=not args.no_progress)
  info["loadavg_end"] = common.loadavg()
  results = {"machine": info, **results, "wall_s": time.perf_counter() - t0}
  command = " ".join(["python benchmarks/drop_in.py", *(sys.argv[1:] if argv is None else argv)])
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  md = to_markdown(results, command)
  (out / "latest.md").write_text(md)
  common.write_json(out / "latest.json", results)
  print(md)
  print(f"wrote {out}/latest.{{md,json}} in {results['wall_s']:.0f} s", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
