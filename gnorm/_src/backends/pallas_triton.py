"""GroupNorm's forward kernels, in Pallas with Triton's lowering.

The input is a free view of ``x``: ``(N, S, C)`` (channels last) or
``(N, C, S)`` (channels first), tiled into blocks of ``bs`` spatial rows by
``bc`` channels (powers of two; loads and stores masked at the tails), one
program per block, so that few groups still make many programs:

* ``one_pass``: one program per (sample, group) whose group fits in one
  block: mean and variance in two passes over registers, then ``y``;
* ``partial_moments``: per block and channel, the mean and the sum of
  squared deviations of its rows;
* ``finish``: one small program per (sample, group) combines those exactly
  (Chan et al.) into ``mean`` and ``rstd``;
* ``normalise``: each block again, writing ``act((x - mean) * rstd * gamma + beta)``.

Everything is computed in ``cdt`` (float32 for half-precision input);
``interpret=True`` runs the same kernels in Pallas's interpreter on any
platform, which is how CI tests them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gnorm._src import array_types
from gnorm._src import maths

# Elements per block: 8192 keeps a float32 block in registers with 4-8 warps.
_BLOCK_ELEMENTS = 8192
# Partials the combining kernels hold at once (they loop over the rest).
FINISH_BLOCK_ELEMENTS = 4096
# Channels per block when channels are last (contiguous): 128 float32 = 512 B
# per row, whole memory transactions.
_MAX_BC_LAST = 128
# Spatial positions per block when channels are first (S is contiguous).
_MAX_BS_FIRST = 512


def pow2_at_least(n: int) -> int:
  """The least power of two >= ``n`` (a block that covers ``n``)."""
  return 1 << max(0, (n - 1).bit_length())


class Block(NamedTuple):
  """A tile choice: rows and channels per block (powers of two), Triton warps
  (0: the heuristic's)."""

  bs: int
  bc: int
  warps: int = 0


class Tiling(NamedTuple):
  """How a ``(N, S, C)`` or ``(N, C, S)`` view is cut into blocks."""

  n: int
  s: int
  c: int
  bs: int
  bc: int
  channels_last: bool
  warps: int = 0  # 0: compiler_params' heuristic

  @property
  def grid(self) -> tuple[int, int, int]:
    return (self.n, pl.cdiv(self.s, self.bs), pl.cdiv(self.c, self.bc))


_override: list[tuple[Block | None, Block | None]] = []


@contextlib.contextmanager
def tiles(forward: Block | None = None, backward: Block | None = None) -> Iterator[None]:
  """While lowering inside it, the block-tiled kernels of the forward and of
  the backward use these tiles (private: for a benchmark to try others)."""
  for b in (forward, backward):
    if b is not None and (b.bs < 1 or b.bc < 1 or b.bs & (b.bs - 1) or b.bc & (b.bc - 1)):
      raise ValueError(f"block sizes must be powers of two, got {b}")
  _override.append((forward, backward))
  try:
    yield
  finally:
    _override.pop()


def tiling(n: int, s: int, c: int, channels_last: bool, backward: bool = False) -> Tiling:
  """Power-of-two blocks of at most ``_BLOCK_ELEMENTS`` elements, never larger
  than the array needs (or the tiles of ``tiles``)."""
  chosen = _override[-1][backward] if _override else None
  if chosen is not None:
    return Tiling(n, s, c, min(chosen.bs, pow2_at_least(s)), min(chosen.bc, pow2_at_least(c)),
                  channels_last, chosen.warps)
  if channels_last:
    bc = min(pow2_at_least(c), _MAX_BC_LAST)
    bs = min(pow2_at_least(s), max(1, _BLOCK_ELEMENTS // bc))
  else:
    bs = min(pow2_at_least(s), _MAX_BS_FIRST)
    bc = min(pow2_at_least(c), max(1, _BLOCK_ELEMENTS // bs))
  return Tiling(n, s, c, bs, bc, channels_last)


def block(t: Tiling):
  """This program's ``(rows, channels)``, their validity, and ``x``'s index."""
  n, k, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  rows = k * t.bs + jnp.arange(t.bs, dtype=jnp.int32)
  cols = j * t.bc + jnp.arange(t.bc, dtype=jnp.int32)
  row_ok, col_ok = rows < t.s, cols < t.c
  rs, cs = pl.ds(k * t.bs, t.bs), pl.ds(j * t.bc, t.bc)
  if t.channels_last:
    valid = row_ok[:, None] & col_ok[None, :]
    index = (n, rs, cs)
  else:
    valid = col_ok[:, None] & row_ok[None, :]
    index = (n, cs, rs)
  return n, k, cs, col_ok, valid, index


def per_channel(t: Tiling, v: jax.Array) -> jax.Array:
  """A ``(bc,)`` vector broadcast against a block."""
  return v[None, :] if t.channels_last else v[:, None]


def columns(t: Tiling) -> jax.Array:
  """This program's channel indices (past ``C`` in a tail block)."""
  return pl.program_id(2) * t.bc + jnp.arange(t.bc, dtype=jnp.int32)


def by_group(ref, n, cols, col_ok, cg: int) -> jax.Array:
  """``ref[n, c // cg]`` for the block's channels: a per-(sample, group)
  value gathered per channel, so that no per-channel copy is ever made."""
  return plgpu.load(ref.at[n, cols // cg], mask=col_ok, other=0)


def parameter(ref, n, cs, col_ok) -> jax.Array:
  """A ``(1, C)`` or ``(N, C)`` parameter's values for the block's channels
  (row ``n`` of a per-sample one, row 0 of a per-channel one)."""
  row = n if ref.shape[0] > 1 else n * 0  # a traced 0: a literal breaks the interpreter
  return plgpu.load(ref.at[row, cs], mask=col_ok, other=0)


def _moments_kernel(x_ref, mean_ref, m2_ref, *, t: Tiling, cdt):
  n, k, cs, col_ok, valid, index = block(t)
  x = plgpu.load(x_ref.at[index], mask=valid, other=0).astype(cdt)
  axis = 0 if t.channels_last else 1
  rows = jnp.minimum(t.s - k * t.bs, t.bs).astype(cdt)  # valid rows, >= 1
  # Shifted by the block's first row (always valid): a constant column's
  # mean is then exact, whatever the division rounds to.
  first = (n, k * t.bs, cs) if t.channels_last else (n, cs, k * t.bs)
  p = plgpu.load(x_ref.at[first], mask=col_ok, other=0).astype(cdt)
  d = jnp.where(valid, x - per_channel(t, p), jnp.zeros((), cdt))
  mean = p + jnp.sum(d, axis=axis) / rows
  xc = jnp.where(valid, x - per_channel(t, mean), jnp.zeros((), cdt))
  m2 = jnp.sum(xc * xc, axis=axis)
  plgpu.store(mean_ref.at[n, k, cs], mean, mask=col_ok)
  plgpu.store(m2_ref.at[n, k, cs], m2, mask=col_ok)


def over_blocks(t: Tiling, cg: int, body, init):
  """``fori_loop`` over the row blocks of one (sample, group)'s partials,
  ``KB`` at a time: ``body(ds, ks, ok, cs, carry)`` gets the slice of row
  blocks ``ds``, their indices ``ks`` ``(KB,)``, the validity ``ok``
  ``(KB, CGP)`` and the slice of the group's channels ``cs``."""
  g = pl.program_id(1)
  k_total = t.grid[1]
  cgp = pow2_at_least(cg)
  kb = min(pow2_at_least(k_total), max(1, FINISH_BLOCK_ELEMENTS // cgp))
  cs = pl.ds(g * cg, cgp)
  col_ok = jnp.arange(cgp, dtype=jnp.int32) < cg

  def step(i, carry):
    ks = i * kb + jnp.arange(kb, dtype=jnp.int32)
    ok = (ks < k_total)[:, None] & col_ok[None, :]
    return body(pl.ds(i * kb, kb), ks, ok, cs, carry)

  return jax.lax.fori_loop(0, pl.cdiv(k_total, kb), step, init)


def _finish_kernel(mean_ref, m2_ref, out_mean_ref, out_rstd_ref, *, t: Tiling, cg: int,
                   eps: float, cdt):
  """Chan et al.'s combine of a (sample, group)'s block partials, two passes
  over them: the mean (shifted by the first block's first mean, so that equal
  means combine to exactly that mean), then the blocks' M2 plus their means'
  spread."""
  n, g = pl.program_id(0), pl.program_id(1)
  count = t.s * cg
  ref = mean_ref[n, n * 0, g * cg]  # a traced 0: a literal breaks the interpreter

  def rows(ks):  # valid rows of each block, 0 past the last
    return jnp.where(ks < t.grid[1], jnp.minimum(t.bs, t.s - ks * t.bs), 0).astype(cdt)

  def total(ds, ks, ok, cs, acc):
    bm = plgpu.load(mean_ref.at[n, ds, cs], mask=ok, other=0)
    dev = jnp.where(ok, bm - ref, jnp.zeros((), cdt))
    return acc + jnp.sum(rows(ks)[:, None] * dev)

  mean = ref + over_blocks(t, cg, total, jnp.zeros((), cdt)) / count

  def m2(ds, ks, ok, cs, acc):
    bm = plgpu.load(mean_ref.at[n, ds, cs], mask=ok, other=0)
    dev = jnp.where(ok, bm - mean, jnp.zeros((), cdt))
    bm2 = plgpu.load(m2_ref.at[n, ds, cs], mask=ok, other=0)
    return acc + jnp.sum(bm2) + jnp.sum(rows(ks)[:, None] * dev * dev)

  var_eps = over_blocks(t, cg, m2, jnp.zeros((), cdt)) / count + eps
  out_mean_ref[n, g] = mean
  out_rstd_ref[n, g] = maths.rsqrt_or_zero(var_eps)


def _normalise_kernel(x_ref, mean_ref, rstd_ref, gamma_ref, beta_ref, y_ref, *, t: Tiling, cdt,
                      cg: int, activation):
  n, _, cs, col_ok, valid, index = block(t)
  x = plgpu.load(x_ref.at[index], mask=valid, other=0).astype(cdt)
  cols = columns(t)
  mean = by_group(mean_ref, n, cols, col_ok, cg)
  scale = by_group(rstd_ref, n, cols, col_ok, cg) * parameter(gamma_ref, n, cs, col_ok)
  shift = parameter(beta_ref, n, cs, col_ok)
  z = (x - per_channel(t, mean)) * per_channel(t, scale) + per_channel(t, shift)
  if activation is not None:
    z = activation(z)
  plgpu.store(y_ref.at[index], z.astype(y_ref.dtype), mask=valid)


# A (sample, group) of at most this many elements (padded to powers of two)
# is normalised by one program that holds it in registers: x is read once.
ONE_PASS_MAX_ELEMENTS = 8192


class GroupTiling(NamedTuple):
  """One program per (sample, group): the whole group as one block."""

  n: int
  s: int
  c: int
  groups: int
  bs: int  # all spatial positions, padded to a power of two
  bg: int  # the group's channels, padded to a power of two
  channels_last: bool


def group_tiling(n: int, s: int, c: int, groups: int, channels_last: bool) -> GroupTiling | None:
  """The one-pass tiling, or None when a group does not fit in one block."""
  bs, bg = pow2_at_least(s), pow2_at_least(c // groups)
  if bs * bg > ONE_PASS_MAX_ELEMENTS:
    return None
  return GroupTiling(n, s, c, groups, bs, bg, channels_last)


def _one_pass_kernel(x_ref, gamma_ref, beta_ref, y_ref, mean_ref, rstd_ref, *, t: GroupTiling,
                     cdt, eps: float, activation):
  n, g = pl.program_id(0), pl.program_id(1)
  cg = t.c // t.groups
  rows, cols = jnp.arange(t.bs, dtype=jnp.int32), jnp.arange(t.bg, dtype=jnp.int32)
  row_ok, col_ok = rows < t.s, cols < cg
  # int32 starts throughout: with jax_enable_x64 a literal 0 would be int64.
  rs, cs = pl.ds(jnp.int32(0), t.bs), pl.ds(g * cg, t.bg)
  if t.channels_last:
    valid, index = row_ok[:, None] & col_ok[None, :], (n, rs, cs)
  else:
    valid, index = col_ok[:, None] & row_ok[None, :], (n, cs, rs)
  per_channel = (lambda v: v[None, :]) if t.channels_last else (lambda v: v[:, None])
  x = plgpu.load(x_ref.at[index], mask=valid, other=0).astype(cdt)
  count = t.s * cg
  # Shifted by the group's first element: a constant group's mean is exact.
  zero = n * 0  # int32, as the starts below
  p = (x_ref[n, zero, g * cg] if t.channels_last else x_ref[n, g * cg, zero]).astype(cdt)
  mean = p + jnp.sum(jnp.where(valid, x - p, jnp.zeros((), cdt))) / count
  xc = jnp.where(valid, x - mean, jnp.zeros((), cdt))
  var_eps = jnp.sum(xc * xc) / count + eps
  rstd = maths.rsqrt_or_zero(var_eps)
  gamma = parameter(gamma_ref, n, cs, col_ok)
  beta = parameter(beta_ref, n, cs, col_ok)
  z = xc * per_channel(rstd * gamma) + per_channel(beta)
  if activation is not None:
    z = activation(z)
  plgpu.store(y_ref.at[index], z.astype(y_ref.dtype), mask=valid)
  mean_ref[n, g] = mean
  rstd_ref[n, g] = rstd


def one_pass(xv: jax.Array, gamma, beta, t: GroupTiling, cdt, eps: float,
             activation: Callable[[jax.Array], jax.Array] | None, *, interpret: bool):
  """``(y, mean, rstd)`` with ``x`` read once; ``gamma``/``beta`` are ``(1, C)`` or ``(N, C)``."""
  stat = array_types.struct((t.n, t.groups), cdt, xv)
  warps = 4 if t.bs * t.bg <= 2048 else 8
  return pl.pallas_call(
      functools.partial(_one_pass_kernel, t=t, cdt=cdt, eps=eps, activation=activation),
      out_shape=(array_types.struct(xv.shape, xv.dtype, xv), stat, stat),
      grid=(t.n, t.groups),
      compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=1),
      interpret=interpret,
      name="gnorm_one_pass",
  )(xv, gamma, beta)


def compiler_params(t: Tiling, inputs: int = 1):
  """Triton's settings for a kernel over ``t``'s blocks reading ``inputs``
  full-size arrays: 8 warps for blocks of more than 4096 elements per input
  array (a heuristic, not yet measured on a GPU)."""
  warps = t.warps or (4 if t.bs * t.bc * inputs <= 4096 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=1)


def partial_moments(xv: jax.Array, t: Tiling, cdt, *, interpret: bool):
  """Per ``(sample, row block, channel)``: the block's mean and M2.

  Returns:
    ``(mean, m2)``, each ``(N, cdiv(S, bs), C)`` in ``cdt``.
  """
  k = t.grid[1]
  out = array_types.struct((t.n, k, t.c), cdt, xv)
  return pl.pallas_call(
      functools.partial(_moments_kernel, t=t, cdt=cdt),
      out_shape=(out, out),
      grid=t.grid,
      compiler_params=compiler_params(t),
      interpret=interpret,
      name="gnorm_partial_moments",
  )(xv)


def finish(block_mean, block_m2, t: Tiling, groups: int, cdt, eps: float, *, interpret: bool):
  """``(mean, rstd)`` per (sample, group), ``(N, G)`` in ``cdt``, from the
  partial moments: one small program per (sample, group)."""
  stat = array_types.struct((t.n, groups), cdt, block_mean)
  return pl.pallas_call(
      functools.partial(_finish_kernel, t=t, cg=t.c // groups, eps=eps, cdt=cdt),
      out_shape=(stat, stat),
      grid=(t.n, groups),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="gnorm_finish_moments",
  )(block_mean, block_m2)


def normalise(xv: jax.Array, mean, rstd, gamma, beta, t: Tiling, cdt,
              activation: Callable[[jax.Array], jax.Array] | None, *, interpret: bool):
  """``act((x - mean) * rstd * gamma + beta)`` in ``x``'s dtype and view.

  ``mean`` and ``rstd`` are ``(N, G)``; ``gamma`` and ``beta`` ``(1, C)`` or
  ``(N, C)``, all in ``cdt``.
  """
  return pl.pallas_call(
      functools.partial(_normalise_kernel, t=t, cdt=cdt, cg=t.c // mean.shape[1],
                        activation=activation),
      out_shape=array_types.struct(xv.shape, xv.dtype, xv),
      grid=t.grid,
      compiler_params=compiler_params(t),
      interpret=interpret,
      name="gnorm_normalise",
  )(xv, mean, rstd, gamma, beta)
