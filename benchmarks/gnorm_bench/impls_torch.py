"""torch's native ``F.group_norm`` (optionally followed by ``F.silu``), on the CPU or a CUDA GPU.

torch is imported inside the functions: the command line must set
``OMP_WAIT_POLICY`` before torch loads its OpenMP runtime (see ``bench.py``).
"""

from __future__ import annotations

import numpy as np

from .cases import EPS
from .cases import Case
from .prepared import Prepared
from .prepared import residual_summary


def _blocking(fn, device):
  """``fn``, returning only once its kernels are done: CUDA launches are
  asynchronous, so a clock read right after the call would time the launch."""
  if device.type != "cuda":
    return fn  # CPU ops are synchronous: nothing to wait for, nothing added

  import torch

  def run():
    out = fn()
    torch.cuda.synchronize(device)
    return out

  return run


def tensors(case: Case, data: dict, channels_last: bool, device: str = "cpu") -> tuple:
  """``x`` and ``ct`` (NCHW, contiguous or channels-last) and ``weight``, ``bias``, on ``device``.

  The weight and bias are in x's dtype, as torch users keep them (a module's
  ``.to(torch.bfloat16)`` converts its parameters too): with bfloat16 input and
  float32 parameters, ``F.group_norm``'s backward on CUDA raises "expected scalar
  type BFloat16 but found Float" (torch 2.11, H200). JAX's implementations keep
  float32 parameters, their own convention.
  """
  import torch

  dev = torch.device(device)
  tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
  fmt = torch.channels_last if channels_last else torch.contiguous_format

  def tensor(a_nhwc):
    t = torch.from_numpy(np.array(a_nhwc)).permute(0, 3, 1, 2)  # a writable copy
    return t.to(device=dev, dtype=tdt).contiguous(memory_format=fmt)

  def param(a):
    return torch.from_numpy(a.astype(np.float32)).to(device=dev, dtype=tdt)

  return tensor(data["x"]), tensor(data["ct"]), param(data["gamma"]), param(data["beta"])


def prepare_torch(
  case: Case,
  data: dict,
  channels_last: bool,
  activation: str | None = None,
  device: str = "cpu",
) -> Prepared:
  """``F.group_norm`` on ``device`` in NCHW memory, contiguous or channels-last."""
  import torch
  import torch.nn.functional as F

  dev = torch.device(device)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  x, ct, w, b = tensors(case, data, channels_last, device)
  xl = x.detach().clone().contiguous(memory_format=fmt).requires_grad_(True)
  wl = w.detach().clone().requires_grad_(True)
  bl = b.detach().clone().requires_grad_(True)
  groups = case.groups
  act = {None: lambda t: t, "silu": F.silu}[activation]

  def fwd():
    with torch.no_grad():
      return act(F.group_norm(x, groups, w, b, EPS))

  def fwdbwd():
    y = act(F.group_norm(xl, groups, wl, bl, EPS))
    return (y, *torch.autograd.grad(y, (xl, wl, bl), ct))

  fwd, fwdbwd = _blocking(fwd, dev), _blocking(fwdbwd, dev)

  def outputs():
    y, dx, dw, db = (t.detach().cpu() for t in fwdbwd())
    nhwc = [t.permute(0, 2, 3, 1).float().numpy() for t in (y, dx)]
    return (
      *[a.astype(np.float64) for a in nhwc],
      dw.double().numpy(),
      db.double().numpy(),
    )

  def io_bytes():
    y = fwd()
    return x.numel() * x.element_size(), y.numel() * y.element_size()

  def residuals():
    # What autograd saves for the backward, seen through saved-tensor hooks;
    # one tensor saved twice (same memory, shape and strides) counts once.
    saved = {}

    def pack(t):
      key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
      is_x = t.data_ptr() == xl.data_ptr() and t.shape == xl.shape
      saved[key] = (
        str(t.dtype).removeprefix("torch."),
        list(t.shape),
        t.element_size(),
        is_x,
      )
      return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
      y = act(F.group_norm(xl, groups, wl, bl, EPS))
    del y
    return residual_summary(list(saved.values()), xl.numel(), xl.element_size())

  return Prepared(
    fwd,
    fwdbwd,
    outputs,
    io_bytes,
    residuals=residuals,
    note="channels_last" if channels_last else "contiguous NCHW",
  )
