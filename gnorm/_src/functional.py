"""``group_norm``: the pure function at the heart of gnorm."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gnorm._src import array_types
from gnorm._src import derivative
from gnorm._src import dispatch
from gnorm._src import maths
from gnorm._src import validation


def group_norm(
    params: Mapping[str, ArrayLike] | None,
    x: ArrayLike,
    n_groups: int | None = None,
    eps: float = 1e-5,
    *,
    channel_axis: int = -1,
    group_size: int | None = None,
    mask: ArrayLike | None = None,
    activation: str | Callable[[jax.Array], jax.Array] | None = None,
    axis_name: Hashable | tuple[Hashable, ...] | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    implementation: str = "auto",
) -> jax.Array:
  r"""Group Normalization (Wu & He, 2018) as a pure function.

  The channels of each sample are split into ``n_groups`` contiguous groups;
  each group is normalised by its own mean and (biased) variance over the
  group's channels and all spatial positions, then scaled and shifted per
  channel:

  .. math::

    y = \mathrm{act}\Big(\frac{x - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}}
        \,\gamma_{c} + \beta_{c}\Big)

  Axis 0 of ``x`` is the batch, ``channel_axis`` holds the channels and every
  other axis is spatial, so ``(N, C)``, ``(N, L, C)``, ``(N, H, W, C)`` and
  ``(N, D, H, W, C)`` all work (``channel_axis=1`` for NCHW).

  Numerics: statistics are computed in at least float32 (float64 input with
  ``jax_enable_x64`` stays float64), never as ``E[x^2] - E[x]^2``: a two-pass
  variance on the CPU and TPU, a shifted one-pass form with an exact combine
  on CUDA and ROCm GPUs (docs/accuracy.md gives the bounds), so data whose
  mean is large against its spread keeps its digits; the output has the
  input's dtype. Integer and bool input is promoted to float32. NaN or Inf in
  ``x`` that is not masked out makes the statistics, and so the whole group,
  NaN. A group whose variance plus ``eps`` is 0 (with ``eps=0``: a constant
  group, or one with a single element) normalises to 0, so its output is
  ``act(beta)``, with finite gradients, not NaN.

  The function is stateless and safe under ``jit``, ``vmap``, ``grad``,
  ``jvp``, ``hessian`` and sharding. Its derivative rule keeps only ``x`` and
  the per-(sample, group) statistics for the backward pass.

  Beyond the paper, all composable with each other:

  * ``group_size`` instead of ``n_groups`` (exactly one of the two);
  * ``mask``: positions where it is False are padding. They are left out of
    the statistics, their output is 0 and they receive no gradient, so
    whatever they hold (even NaN or Inf) reaches no output and no gradient:
    the counted outputs and every gradient equal those of zeros in the
    padding. A group with no counted element outputs 0 everywhere;
  * ``activation``: ``"relu"``, ``"silu"`` (alias ``"swish"``), ``"gelu"``
    (exact, erf), ``"gelu_tanh"`` or any callable, fused into the same pass;
    the backward pass recomputes it from ``x`` instead of keeping it;
  * per-sample ``gamma``/``beta`` of shape ``(N, C)`` (AdaGN / FiLM
    conditioning), differentiable like any parameter;
  * ``axis_name``: inside ``shard_map`` or ``pmap``, statistics are combined
    across that mesh axis (or axes) with one collective, so an input split
    along its spatial axes, or within a group's channels, is normalised
    exactly as the whole would be; ``axis_index_groups`` combines them
    within groups of devices only, as ``lax.pmean`` does. Under plain
    ``jax.jit`` with sharded inputs no ``axis_name`` is needed: XLA inserts
    what is required.

  Args:
    params: ``{"gamma": ..., "beta": ...}`` (the names of
      ``neupy.layers.GroupNorm``). Either key may be absent, and ``None``
      means no affine transform. Each value has shape ``(C,)``, is a scalar,
      or broadcasts against ``x`` with ``C`` on the channel axis and 1
      elsewhere, such as neupy's ``(1, 1, 1, C)`` for NHWC input. A 1-D
      value is always read as per-channel, whatever the layout; a value of
      shape ``(N, C)`` (or ``(N, 1, 1, C)``) is per sample.
    x: input of rank >= 2, batch first.
    n_groups: number of groups; a positive int that divides ``C``.
      ``n_groups=1`` is layer normalisation over all but the batch axis,
      ``n_groups=C`` is instance normalisation.
    eps: added to the variance inside the square root; a real number >= 0
      known at trace time.
    channel_axis: the axis of ``x`` that holds the channels (default ``-1``,
      channels-last as in neupy). It may not be the batch axis 0.
    group_size: channels per group, instead of ``n_groups``.
    mask: boolean array broadcastable to ``x`` (for example ``(N, L, 1)`` for
      padded sequences); True marks the positions that count, False the
      padding, whose output is 0. The backward pass keeps it as given.
    activation: applied after the affine transform, fused.
    axis_name: a mesh axis name or tuple of names to combine statistics over
      (inside ``shard_map``/``pmap`` only).
    axis_index_groups: with ``axis_name`` only: groups of indices along it,
      such as ``((0, 1), (2, 3))``, each index in exactly one group and all
      groups of one size (``lax.psum``'s argument); the statistics are
      combined within each group. JAX implements it in ``shard_map`` and
      ``pmap``, not under ``vmap`` (``NotImplementedError``).
    implementation: ``"auto"`` (default), ``"xla"`` or ``"pallas"``. ``"xla"``
      is the maths above as XLA fusions, each platform with its own reduction
      plan. ``"pallas"`` runs the forward and the backward pass as Pallas
      kernels (Triton) on CUDA GPUs, and in Pallas's interpreter elsewhere
      (for tests: slow); it covers channels-last and channels-first input,
      every dtype, group count and activation, per-sample gamma/beta, but not
      ``mask``, ``axis_name``, a channel axis with spatial axes on both sides
      or 2**31 elements or more (a ``ValueError`` names the reason).
      Derivatives of every order work with both. ``"auto"`` is each
      platform's default: today ``"xla"`` everywhere, as no GPU has yet
      measured the kernels faster (docs/gpu_kernels.md).

  Returns:
    An array of the shape of ``x``, in ``x``'s dtype (float32 for integer or
    bool input).

  Raises:
    TypeError: ``n_groups``, ``group_size``, ``channel_axis``, ``eps``,
      ``activation`` or ``axis_index_groups`` of the wrong type, ``params``
      not a mapping, a complex or non-numeric ``x``, gamma or beta, or a
      non-boolean ``mask``.
    ValueError: neither or both of ``n_groups`` and ``group_size``, either
      not positive or not dividing ``C``, ``x`` of rank < 2,
      ``channel_axis`` out of range or the batch axis, ``eps`` negative, NaN
      or infinite, gamma or beta of the wrong size, an unknown key in
      ``params``, a ``mask`` that does not broadcast to ``x``, an unknown
      activation name or ``implementation``, ``axis_index_groups`` without
      ``axis_name`` or not each index of its axis exactly once in groups of
      one size, or ``implementation="pallas"``
      with an option the kernels do not cover or on a JAX without Pallas's
      Triton backend.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))  # NHWC
    >>> params = {"gamma": jnp.ones(16), "beta": jnp.zeros(16)}
    >>> y = gnorm.group_norm(params, x, n_groups=4)
    >>> y.shape, y.dtype
    ((2, 8, 8, 16), dtype('float32'))

    Each (sample, group) now has zero mean and unit variance:

    >>> g = y.reshape(2, 64, 4, 4)
    >>> bool(jnp.allclose(g.mean(axis=(1, 3)), 0.0, atol=1e-5))
    True
    >>> bool(jnp.allclose(g.var(axis=(1, 3)), 1.0, atol=1e-3))
    True

    Channels-first input, no affine, under ``jit``:

    >>> f = jax.jit(gnorm.group_norm, static_argnames=("n_groups", "channel_axis"))
    >>> f(None, jnp.moveaxis(x, -1, 1), n_groups=4, channel_axis=1).shape
    (2, 16, 8, 8)

    Padded sequences, groups of 8 channels, fused SiLU:

    >>> seq = jax.random.normal(jax.random.key(1), (2, 10, 16))
    >>> valid = jnp.arange(10)[None, :, None] < jnp.array([7, 10])[:, None, None]
    >>> out = gnorm.group_norm(None, seq, group_size=8, mask=valid,
    ...                        activation="silu")
    >>> out.shape
    (2, 10, 16)

  References:
    Yuxin Wu and Kaiming He, "Group Normalization", ECCV 2018,
    arXiv:1803.08494.
  """
  x = validation.as_input_array(x)
  shape = tuple(x.shape)
  axis = validation.check_channel_axis(channel_axis, shape)
  n_groups = validation.check_groups(n_groups, group_size, shape, axis)
  eps = validation.check_eps(eps, shape)
  gamma, beta = validation.split_params(params, shape)
  gamma = validation.check_affine("gamma", gamma, shape, axis)
  beta = validation.check_affine("beta", beta, shape, axis)
  mask = validation.check_mask(mask, shape)
  activation = validation.check_activation(activation, maths.ACTIVATIONS, shape)
  axis_name = validation.check_axis_name(axis_name, shape)
  groups = validation.check_axis_index_groups(axis_index_groups, axis_name, shape)
  validation.check_groups_cover_axis(groups, axis_name, shape)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    # As neupy's GroupNorm casts its input to float32.
    x = x.astype(jnp.float32)
  cfg = maths.Config(n_groups, eps, axis, axis_name, activation, axis_index_groups=groups)
  implementation = validation.check_implementation(implementation, cfg, shape, mask is not None)
  cfg = cfg._replace(implementation=dispatch.requested(implementation))
  if cfg.implementation == "pallas" and implementation != "pallas":  # forced (tests)
    validation.check_pallas(cfg, shape, mask is not None)
  # JAX's types beyond shape and dtype (array_types.py): operands varying
  # along the same manual axes, explicit mesh axes made Auto for the maths.
  x, gamma, beta, mask = array_types.match_varying(x, gamma, beta, mask)
  core = functools.partial(derivative.group_norm_core, cfg=cfg)
  return array_types.on_auto_axes(core, x)(x, gamma, beta, mask)
