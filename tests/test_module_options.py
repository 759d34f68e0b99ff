"""The function's options in ``gnorm.GroupNorm`` and ``gnorm.nnx.GroupNorm``.

Each option (``group_size``, ``mask``, ``activation``, ``axis_name``, and the
AdaGN ``scale``/``shift`` call arguments) must give, in both modules, the
values and gradients of ``gnorm.group_norm`` with the equivalent arguments,
and of the float64 NumPy reference, under ``jit``, ``vmap`` and ``grad``.
``axis_name`` across real shards is checked in ``multidevice_checks.py``.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import gnorm
from tests.reference import group_norm_ref_full

N, H, W, C = 3, 4, 5, 8
G = 4  # the default grouping: n_groups=4, or group_size=2


def _gelu_tanh(z):
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


# Activations the NumPy reference does not know, applied after it.
_NUMPY_ACT = {"gelu_tanh": _gelu_tanh, jnp.tanh: np.tanh}


def _ref(x, n_groups, gamma, beta, channel_axis, mask, activation):
  """The float64 reference; ``gamma``/``beta`` are ``(N, C)`` or None."""
  post = _NUMPY_ACT.get(activation)
  y = group_norm_ref_full(x, n_groups, gamma, beta, 1e-5, channel_axis, mask,
                          None if post is not None else activation)
  return y if post is None else post(y)


def _data(seed=0, channels_first=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, H, W, C)) * 2.0 + 1.5
  lengths = np.array([4, 2, 1])
  rows = np.arange(H)[None, :, None, None] < lengths[:, None, None, None]
  mask = np.broadcast_to(rows, (N, H, W, 1))  # padded; sample 2 has 1 valid row
  d = dict(x=x, mask=mask.copy(),
           gamma=rng.normal(size=C) + 1.0, beta=rng.normal(size=C),
           scale=0.5 * rng.normal(size=(N, C)), shift=rng.normal(size=(N, C)),
           w=rng.normal(size=x.shape))
  if channels_first:
    for k in ("x", "mask", "w"):
      d[k] = np.ascontiguousarray(np.moveaxis(d[k], -1, 1))
  return d


# Each case: (module options, call options). A call option "scale"/"shift"
# names the form passed: "nc" (N, C), "n11c" (N, 1, 1, C) or "c" (C,).
CASES = {
    "group_size": (dict(group_size=2), {}),
    "mask": ({}, dict(mask=True)),
    # "silu" and "gelu" are in the "all" cases; the function's own tests
    # check every activation against applying it after the normalisation.
    "gelu_tanh": (dict(activation="gelu_tanh"), {}),
    "callable": (dict(activation=jnp.tanh), {}),
    "scale_shift_nc": ({}, dict(scale="nc", shift="nc")),
    "scale_only_n11c": ({}, dict(scale="n11c")),
    "shift_only_c": ({}, dict(shift="c")),
    "no_gamma_no_beta": (dict(gamma=None, beta=None), dict(scale="nc", shift="nc")),
    "no_beta_scale": (dict(beta=None), dict(scale="nc")),
    "nchw_scale_c": (dict(channel_axis=1), dict(scale="c", shift="nc")),
    "all": (dict(group_size=2, activation="silu"),
            dict(mask=True, scale="n11c", shift="nc")),
    "all_nchw": (dict(group_size=4, activation="gelu", channel_axis=1),
                 dict(mask=True, scale="c", shift="n11c")),
}


class _Case:
  """Builds both modules, the call arguments and the references for a case."""

  def __init__(self, name, seed=0, param_dtype=jnp.float64):
    mod, call = CASES[name]
    self.axis = mod.get("channel_axis", -1)
    d = _data(seed, channels_first=self.axis == 1)
    self.x, self.w = d["x"], d["w"]
    self.activation = mod.get("activation")
    self.n_groups = C // mod["group_size"] if "group_size" in mod else G
    self.gamma = None if mod.get("gamma", 1) is None else d["gamma"]
    self.beta = None if mod.get("beta", 1) is None else d["beta"]
    opts = dict(mod, param_dtype=param_dtype)
    opts["gamma"], opts["beta"] = self.gamma, self.beta
    if "group_size" not in mod:
      opts["n_groups"] = G
    self.linen = gnorm.GroupNorm(**opts)
    # create_variables: the same params as init, without running the layer.
    self.variables = {"params": self.linen.create_variables(self.x.shape)}
    self.nnx = gnorm.nnx.GroupNorm(num_channels=C, **opts)
    self.mask = d["mask"] if call.get("mask") else None
    # The forms passed to the modules, and their (N, C) values.
    self.call = {"mask": self.mask}
    self.nc = {}
    for k in ("scale", "shift"):
      form = call.get(k)
      v = d[k]
      if form == "c":
        v = v[0]
        self.nc[k] = np.broadcast_to(v, (N, C))
      elif form is not None:
        self.nc[k] = v
        if form == "n11c":
          v = v.reshape((N, 1, 1, C) if self.axis == -1 else (N, C, 1, 1))
      self.call[k] = None if form is None else v
    self.fn_kwargs = dict(channel_axis=self.axis, activation=self.activation,
                          **({"group_size": mod["group_size"]} if "group_size" in mod
                             else {"n_groups": G}))

  def effective(self):
    """The per-sample (N, C) gamma and beta of the AdaGN formula, in NumPy."""
    s, t = self.nc.get("scale"), self.nc.get("shift")
    g = np.ones(C) if self.gamma is None else self.gamma
    b = np.zeros(C) if self.beta is None else self.beta
    f = 1 + (np.zeros((N, C)) if s is None else s)
    return g * f, b * f + (0 if t is None else t)

  def reference(self):
    g, b = self.effective()
    return _ref(self.x, self.n_groups, g, b, self.axis, self.mask, self.activation)

  def function(self, gamma, beta, x, scale, shift):
    """``group_norm`` with the equivalent per-sample params, in JAX."""
    g = jnp.ones(C) if gamma is None else gamma
    b = jnp.zeros(C) if beta is None else beta
    f = 1 + (jnp.zeros((N, C)) if scale is None
             else jnp.broadcast_to(scale.reshape(-1, C), (N, C)))
    t = 0 if shift is None else jnp.broadcast_to(shift.reshape(-1, C), (N, C))
    params = {"gamma": g[None] * f, "beta": b[None] * f + t}
    return gnorm.group_norm(params, x, mask=self.mask, **self.fn_kwargs)


def _close(a, b, tol=1e-9):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                             rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_option_values_and_gradients(x64, name):
  case = _Case(name)
  x, s, t = case.x, case.call["scale"], case.call["shift"]
  mask = case.call["mask"]

  # Values: linen under jax.jit, nnx under nnx.jit, the function, NumPy.
  y_linen = jax.jit(case.linen.apply)(case.variables, x, mask=mask, scale=s, shift=t)
  y_nnx = nnx.jit(lambda m, x, s, t: m(x, mask=mask, scale=s, shift=t))(
      case.nnx, x, s, t)
  y_fn = jax.jit(case.function)(case.gamma, case.beta, x, s, t)
  ref = case.reference()
  assert y_linen.shape == x.shape and y_linen.dtype == jnp.float64
  _close(y_fn, ref)
  _close(y_linen, ref)
  _close(y_nnx, ref)

  # Gradients w.r.t. gamma, beta, x, scale and shift.
  w = case.w

  def loss_linen(p, x, s, t):
    return jnp.sum(jnp.sin(case.linen.apply({"params": p}, x, mask=mask, scale=s,
                                            shift=t)) * w)

  def loss_nnx(m, x, s, t):
    return jnp.sum(jnp.sin(m(x, mask=mask, scale=s, shift=t)) * w)

  def loss_fn(g, b, x, s, t):
    return jnp.sum(jnp.sin(case.function(g, b, x, s, t)) * w)

  gl_p, *gl = jax.jit(jax.grad(loss_linen, argnums=(0, 1, 2, 3)))(
      case.variables["params"], x, s, t)
  gn_m, *gn = nnx.jit(nnx.grad(loss_nnx, argnums=(0, 1, 2, 3)))(case.nnx, x, s, t)
  gf_g, gf_b, *gf = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2, 3, 4)))(
      case.gamma, case.beta, x, s, t)
  for a, b, c in zip(gl, gn, gf, strict=True):  # x, scale, shift
    if c is None:
      assert a is None and b is None
      continue
    assert a.shape == b.shape == c.shape
    _close(a, c)
    _close(b, c)
  for pname, gf_p in (("gamma", gf_g), ("beta", gf_b)):
    if gf_p is None:
      assert pname not in gl_p and getattr(case.nnx, pname) is None
      continue
    _close(gl_p[pname], gf_p)
    _close(gn_m[pname][...], gf_p)


def test_composition_under_vmap():
  # float32 here: vmap over a leading axis equals a loop over it.
  case = _Case("all", seed=1, param_dtype=jnp.float32)
  k = 2
  rng = np.random.default_rng(5)
  xs = np.stack([case.x, case.x[::-1] * 3.0 - 1.0]).astype(np.float32)
  ms = np.stack([case.mask, case.mask[::-1]])
  ss = np.stack([case.call["scale"], -case.call["scale"]]).astype(np.float32)
  ts = rng.normal(size=(k,) + case.call["shift"].shape).astype(np.float32)
  variables, linen = case.variables, case.linen

  def one(x, m, s, t):
    return linen.apply(variables, x, mask=m, scale=s, shift=t)

  def grad_x(x, m, s, t):
    return jax.grad(lambda x: jnp.sum(jnp.sin(one(x, m, s, t))))(x)

  y_linen = jax.jit(jax.vmap(one))(xs, ms, ss, ts)
  y_nnx = nnx.jit(nnx.vmap(lambda mod, x, m, s, t: mod(x, mask=m, scale=s, shift=t),
                           in_axes=(None, 0, 0, 0, 0)))(case.nnx, xs, ms, ss, ts)
  gx = jax.jit(jax.vmap(grad_x))(xs, ms, ss, ts)  # per-example gradients
  one, grad_x = jax.jit(one), jax.jit(grad_x)
  for i in range(k):
    y_i = one(xs[i], ms[i], ss[i], ts[i])
    np.testing.assert_allclose(y_linen[i], y_i, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_nnx[i], y_i, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx[i], grad_x(xs[i], ms[i], ss[i], ts[i]),
                               rtol=1e-4, atol=1e-4)


def test_adagn_gradients_follow_the_formula(x64):
  # Without activation, y = (xhat * gamma + beta) * (1 + scale) + shift, so
  # with a cotangent ct: d shift = sum_s ct, d scale = sum_s ct * (xhat gamma
  # + beta), d gamma = sum_{n,s} ct xhat (1 + scale), d beta = sum ct (1 + scale).
  d = _data(2)
  x, ct, s, t = d["x"], d["w"], d["scale"], d["shift"]
  layer = gnorm.GroupNorm(G, gamma=d["gamma"], beta=d["beta"], param_dtype=jnp.float64)
  params = layer.create_variables(x.shape)
  grads = jax.jit(jax.grad(
      lambda p, s, t: jnp.sum(layer.apply({"params": p}, x, scale=s, shift=t) * ct),
      argnums=(0, 1, 2)))(params, s, t)
  xhat = group_norm_ref_full(x, G)
  s4 = s[:, None, None, :]
  pre = xhat * d["gamma"][None, None, None] + d["beta"][None, None, None]
  _close(grads[2], ct.sum(axis=(1, 2)))
  _close(grads[1], (ct * pre).sum(axis=(1, 2)))
  _close(grads[0]["gamma"], (ct * xhat * (1 + s4)).sum(axis=(0, 1, 2)))
  _close(grads[0]["beta"], (ct * (1 + s4)).sum(axis=(0, 1, 2)))


def test_composition_numerical_gradients(x64):
  case = _Case("all", seed=3)
  mask = case.mask

  def f(p, x, s, t):
    return case.linen.apply({"params": p}, x, mask=mask, scale=s, shift=t)

  check_grads(jax.jit(f), (case.variables["params"], case.x, case.call["scale"],
                  case.call["shift"]), order=1, modes=("rev",))


def test_axis_name_reaches_the_function():
  # A named vmap axis stands in for devices: the spatial axis split in 4
  # pieces, normalised with statistics combined across them, equals the whole.
  d = _data(4)
  x = d["x"].astype(np.float32)
  pieces = np.stack(np.split(x, 4, axis=1))  # (4, N, 1, W, C)
  s = d["scale"].astype(np.float32)
  whole = gnorm.GroupNorm(group_size=2, activation="silu")
  variables = {"params": whole.create_variables(x.shape)}
  expected = jax.jit(whole.apply)(variables, x, scale=s)
  layer = gnorm.GroupNorm(group_size=2, activation="silu", axis_name="d")
  assert layer._function_kwargs()["axis_name"] == "d"
  y = jax.jit(jax.vmap(lambda p: layer.apply(variables, p, scale=s), axis_name="d"))(
      pieces)
  np.testing.assert_allclose(np.concatenate(list(y), axis=1), expected,
                             rtol=1e-5, atol=1e-5)
  mod = gnorm.nnx.GroupNorm(num_channels=C, group_size=2, activation="silu",
                            axis_name=["d"])
  assert mod.axis_name == ("d",)  # a list of names is kept as a tuple
  y = nnx.jit(nnx.vmap(lambda m, p: m(p, scale=s), in_axes=(None, 0), axis_name="d"))(
      mod, pieces)
  np.testing.assert_allclose(np.concatenate(list(y), axis=1), expected,
                             rtol=1e-5, atol=1e-5)


def test_module_kwargs_cover_the_function_options():
  # _function_kwargs is the one place options reach group_norm: every keyword
  # option of the function is a module field or (mask) a call argument.
  sig = inspect.signature(gnorm.group_norm)
  options = {k for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
  linen = gnorm.GroupNorm(4)
  mod = gnorm.nnx.GroupNorm(4, C)
  for m in (linen, mod):
    assert set(m._function_kwargs()) | {"mask"} == options
    call = inspect.signature(m.__call__).parameters
    assert all(call[k].kind is inspect.Parameter.KEYWORD_ONLY
               for k in ("mask", "scale", "shift"))
  init = inspect.signature(gnorm.GroupNorm).parameters
  for k in ("group_size", "activation", "axis_name"):
    assert init[k].kind is inspect.Parameter.KEYWORD_ONLY and init[k].default is None
  assert gnorm.GroupNorm(group_size=4).group_size == 4


def test_group_size_in_the_seed_methods():
  layer = gnorm.GroupNorm(group_size=4)
  assert layer.get_output_shape((None, 5, 16)) == (None, 5, 16)
  assert layer.create_variables((None, 5, 16))["gamma"].shape == (16,)
  with pytest.raises(ValueError, match=r"Cannot divide 10 input channels into groups "
                                       r"of 4.*group_size=4"):
    layer.get_output_shape((None, 5, 10))
  with pytest.raises(ValueError,
                     match=r"Cannot divide 6 input channels into groups of 4"):
    layer.init(jax.random.key(0), jnp.ones((2, 6)))
  mod = gnorm.nnx.GroupNorm(num_channels=16, group_size=4)
  assert mod.get_output_shape((None, 5, 16)) == (None, 5, 16)
  with pytest.raises(ValueError, match=r"group_size=4, num_channels=16.*has 8"):
    mod(jnp.ones((1, 8)))


class _UNetBlock(nn.Module):
  """GroupNorm with a time embedding, as in a diffusion UNet's ResBlock."""

  @nn.compact
  def __call__(self, x, emb):
    scale, shift = jnp.split(nn.Dense(2 * x.shape[-1])(emb), 2, axis=-1)
    return gnorm.GroupNorm(group_size=2, activation="silu", name="norm{}")(
        x, scale=scale, shift=shift)


def test_conditioning_inside_a_model():
  x = jnp.asarray(_data(6)["x"], jnp.float32)
  emb = jax.random.normal(jax.random.key(1), (N, 4))
  block = _UNetBlock()
  variables = jax.jit(block.init)(jax.random.key(0), x, emb)
  assert sorted(variables["params"]) == ["Dense_0", "norm1"]
  grads = jax.jit(jax.grad(lambda v: jnp.sum(block.apply(v, x, emb) ** 2)))(variables)
  # The gradient reaches the embedding projection through scale and shift.
  assert float(jnp.abs(grads["params"]["Dense_0"]["kernel"]).sum()) > 0


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    ({}, ValueError, r"exactly one of n_groups and group_size, got n_groups=None and "
                     r"group_size=None"),
    ({"n_groups": 4, "group_size": 2}, ValueError,
     r"exactly one of n_groups and group_size, got n_groups=4 and group_size=2"),
    ({"group_size": 0}, ValueError, r"group_size must be a positive int, got 0"),
    ({"group_size": 1.5}, TypeError, r"group_size must be a positive int, got 1\.5"),
    ({"group_size": True}, TypeError, r"group_size must be a positive int, got True"),
    ({"n_groups": 2, "activation": "mish"}, ValueError, r"unknown activation 'mish'"),
    ({"n_groups": 2, "activation": 3}, TypeError, r"activation must be None, a name"),
    ({"n_groups": 2, "axis_name": {"a": 1}}, TypeError,
     r"axis_name must be a mesh axis"),
])
@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_bad_options_fail_at_construction(flavour, kwargs, error, match):
  with pytest.raises(error, match=match):
    if flavour == "linen":
      gnorm.GroupNorm(**kwargs)
    else:
      gnorm.nnx.GroupNorm(num_channels=C, **kwargs)


def test_nnx_checks_grouping_against_num_channels():
  with pytest.raises(ValueError,
                     match=r"group_size \(3\) must divide num_channels \(8\)"):
    gnorm.nnx.GroupNorm(num_channels=8, group_size=3)
  with pytest.raises(TypeError, match="needs num_channels"):
    gnorm.nnx.GroupNorm(group_size=2)
  assert gnorm.nnx.GroupNorm(num_channels=8, group_size=8).gamma.shape == (8,)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"scale": np.ones(3)}, ValueError,
     r"scale has shape \(3,\), but the input of shape \(3, 4, 5, 8\) has 8 channels.*"
     r"\(3, 8\) \(per sample\)"),
    ({"shift": np.ones((4, 8))}, ValueError,
     r"shift has shape \(4, 8\), but the input of shape \(3, 4, 5, 8\).*batch size 3"),
    ({"scale": np.ones((N, H, W, C))}, ValueError, r"scale has shape \(3, 4, 5, 8\)"),
    ({"shift": "zero"}, TypeError, r"shift must be an array or a number"),
    ({"mask": np.ones((N, 2, 1, 1), bool)}, ValueError,
     r"mask of shape \(3, 2, 1, 1\) does not broadcast"),
    ({"mask": np.ones((N, H, 1, 1))}, TypeError, r"mask must be a boolean array"),
])
def test_bad_call_arguments(kwargs, error, match):
  x = jnp.ones((N, H, W, C))
  linen = gnorm.GroupNorm(4)
  variables = linen.init(jax.random.key(0), x)
  mod = gnorm.nnx.GroupNorm(4, C)
  with pytest.raises(error, match=match + (r".*gnorm.GroupNorm\(n_groups=4" if
                                           "mask" not in kwargs else "")):
    linen.apply(variables, x, **kwargs)
  with pytest.raises(error, match=match + (r".*gnorm.nnx.GroupNorm\(n_groups=4" if
                                           "mask" not in kwargs else "")):
    mod(x, **kwargs)
