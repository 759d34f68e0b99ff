"""The implementations compared: gnorm (its default and each of its implementations), flax,
haiku, equinox and XLA's floor as JAX functions of ``(x, gamma, beta)``; torch's GroupNorm."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from .common import EPS
from .common import optional

# gnorm's variants: name -> (implementation=, the implementation forced while tracing).
# gnorm_prev is the previous XLA program ("xla": maths.py, steered for XLA:CPU), which GPUs
# ran before they had a plan of their own; gnorm_gpu_plan is that plan ("xla_gpu").
GNORM = {"gnorm": ("auto", None), "gnorm_pallas": ("pallas", None),
         "gnorm_prev": ("auto", "xla"), "gnorm_gpu_plan": ("auto", "xla_gpu")}
CHANNELS_FIRST = ("equinox",)  # equinox's layer takes one channels-first sample: vmapped, NCHW
_MODULES = {"flax": "flax.linen", "haiku": "haiku", "equinox": "equinox", "torch": "torch",
            "torch_compile": "torch", "gnorm_pallas": "jax.experimental.pallas"}


def _bc(t, ndim: int):
  return t.reshape((1,) * (ndim - 1) + t.shape)


def _base(name: str, groups: int):
  if name == "gnorm_unfused":
    return jax_fn("gnorm", groups)
  if name == "flax":
    import flax.linen as nn

    m = nn.GroupNorm(num_groups=groups, epsilon=EPS)  # gnorm's eps, so outputs compare
    return lambda x, g, b: m.apply({"params": {"scale": g, "bias": b}}, x)
  if name == "haiku":
    import haiku as hk

    def layer(x, g, b):  # scale and offset at call time: haiku's maths, no parameter dict
      return hk.GroupNorm(groups, eps=EPS, create_scale=False, create_offset=False)(
        x, scale=g, offset=b)

    apply = hk.without_apply_rng(hk.transform(layer)).apply
    return lambda x, g, b: apply({}, x, g, b)
  if name == "equinox":
    import equinox as eqx

    def f(x, g, b):  # x: NCHW
      template = eqx.nn.GroupNorm(groups, x.shape[1], eps=EPS)
      return jax.vmap(eqx.tree_at(lambda m: (m.weight, m.bias), template, (g, b)))(x)

    return f
  if name == "floor":  # one read of x, one write of y: XLA's least for this tensor
    return lambda x, g, b: x * _bc(g, x.ndim) + _bc(b, x.ndim)
  raise ValueError(f"unknown implementation {name!r}")


def jax_fn(name: str, groups: int, activation: str | None = None):
  """``f(x, gamma, beta) -> y`` of implementation ``name``. With ``activation="silu"`` gnorm's
  variants fuse it into their pass; everyone else (gnorm_unfused: gnorm) applies
  ``jax.nn.silu`` after; the floor stays the floor."""
  if name in GNORM:
    import gnorm
    from gnorm._src import dispatch

    implementation, forced = GNORM[name]

    def f(x, g, b):
      with dispatch.forced(forced) if forced else contextlib.nullcontext():
        return gnorm.group_norm({"gamma": g, "beta": b}, x, groups, EPS, activation=activation,
                                implementation=implementation)

    return f
  base = _base(name, groups)
  if activation is None or name == "floor":
    return base
  if activation != "silu":
    raise ValueError(activation)
  return lambda x, g, b: jax.nn.silu(base(x, g, b))


def fwdbwd_of(f):
  """``fb(x, g, b, ct) -> (y, dx, dg, db)``: ``f``'s output and its vjp of cotangent ``ct``."""
  def fb(x, g, b, ct):
    y, vjp = jax.vjp(f, x, g, b)
    return (y, *vjp(ct.astype(y.dtype)))

  return fb


def skip_reason(name: str, backend: str, named: bool) -> str | None:
  """Why ``name`` does not run here (None: it runs). Off a GPU the Pallas kernels run in
  Pallas's interpreter, whose times mean nothing: only where ``named`` (plumbing checks)."""
  if name == "gnorm_pallas" and backend != "gpu" and not named:
    return f"Pallas kernels run in the interpreter on {backend}: not timed unless named"
  module = _MODULES.get(name)
  if module and optional(module) is None:
    return f"{module} not importable"
  if name.startswith("torch") and backend == "gpu" and not optional("torch").cuda.is_available():
    return "torch sees no CUDA device"
  if name.startswith("torch") and backend not in ("cpu", "gpu"):
    return f"no torch device to compare with JAX's {backend}"
  return None


def torch_inputs(data: dict, dtype: str, channels_last: bool, device: str) -> tuple:
  """x, ct (NCHW, contiguous or channels-last), weight and bias, on ``device``. Weight and
  bias in x's dtype, as torch users keep them (its CUDA backward rejects float32 parameters
  with bfloat16 input); JAX's implementations keep float32 parameters."""
  import torch

  tdt = getattr(torch, dtype)
  fmt = torch.channels_last if channels_last else torch.contiguous_format

  def tensor(a):  # NHWC -> NCHW in the memory format asked
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).to(device, tdt).contiguous(
      memory_format=fmt)

  return (tensor(data["x"]), tensor(data["ct"]),
          *(torch.from_numpy(data[k]).to(device, tdt) for k in ("gamma", "beta")))


def torch_fn(groups: int, activation: str | None, compiled: bool = False):
  """``F.group_norm`` (then ``F.silu``), or ``torch.compile`` of it (a fresh function: its own
  graphs)."""
  import torch
  import torch.nn.functional as F

  def gn(x, w, b):
    y = F.group_norm(x, groups, w, b, EPS)
    return F.silu(y) if activation == "silu" else y

  return torch.compile(gn, dynamic=False) if compiled else gn


def torch_nhwc(t) -> np.ndarray:
  """A torch output as float64 NumPy, NHWC where it has channels first."""
  a = t.detach().float().cpu().numpy().astype(np.float64)
  return np.moveaxis(a, 1, -1) if a.ndim > 1 else a
