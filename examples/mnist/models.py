"""The seed's example network, and a summary table of its layers.

neupy's ``GroupNorm`` documentation builds this CNN::

    Input((28, 28, 1)),
    Convolution((3, 3, 16)) >> GroupNorm(4) >> Relu(),
    Convolution((3, 3, 16)) >> GroupNorm(4) >> Relu(),
    Reshape(),
    Softmax(10),

:class:`CNN` is that network in Flax. neupy's convolutions default to valid
padding, so the feature maps shrink 28 -> 26 -> 24. The softmax is left to the
loss (cross-entropy on logits); :func:`predict_proba` applies it.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import gnorm

NORMS = ("group", "batch", "none")


class CNN(nn.Module):
  """conv 3x3x16 -> norm -> ReLU -> conv 3x3x16 -> norm -> ReLU -> dense 10.

  Attributes:
    norm: ``"group"`` for ``gnorm.GroupNorm(4)`` (the seed's network),
      ``"batch"`` for ``flax.linen.BatchNorm`` (for comparison; batch
      statistics in training, running averages at evaluation), ``"none"``.
    n_groups: groups of each GroupNorm layer.
  """

  norm: str = "group"
  n_groups: int = 4

  def _norm(self, name: str, train: bool):
    if self.norm == "group":
      return gnorm.GroupNorm(self.n_groups, name=name)
    if self.norm == "batch":
      return nn.BatchNorm(use_running_average=not train, name=name)
    if self.norm == "none":
      return lambda x: x
    raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps images ``(N, 28, 28, 1)`` to logits ``(N, 10)``."""
    for i in (1, 2):
      x = nn.Conv(16, (3, 3), padding="VALID", name=f"conv{i}")(x)
      x = self._norm(f"norm{i}", train)(x)
      x = nn.relu(x)
      # Recorded only when the caller asks for intermediates (the summary).
      self.sow("intermediates", f"relu{i}", x)
    x = x.reshape((x.shape[0], -1))
    self.sow("intermediates", "flatten", x)
    return nn.Dense(10, name="dense")(x)


def predict_proba(model: CNN, variables, x: jax.Array) -> jax.Array:
  """Class probabilities: the seed's ``Softmax(10)`` output layer."""
  return jax.nn.softmax(model.apply(variables, x, train=False))


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays."""
  return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))


def summary(model: CNN, input_shape: Sequence[int] = (28, 28, 1)) -> str:
  """A table of the layers, output shapes and parameter counts.

  Computed abstractly (``jax.eval_shape``), so it costs no FLOPs. Only
  trainable parameters are counted; BatchNorm's running statistics are not.

  Args:
    model: the network.
    input_shape: the shape of one example, without the batch axis.

  Returns:
    The table as text, ending with the total.
  """
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)

  def init(x):
    return model.init_with_output(
        jax.random.key(0), x, capture_intermediates=True,
        mutable=["params", "batch_stats", "intermediates"])

  logits, variables = jax.eval_shape(init, x)
  params = variables["params"]
  rows = [("input", "", (None, *input_shape), 0)]
  inter = variables["intermediates"]
  # In the order of the forward pass (eval_shape returns dicts key-sorted).
  for name in ("conv1", "norm1", "relu1", "conv2", "norm2", "relu2",
               "flatten", "dense"):
    if name not in inter:  # norm="none"
      continue
    # Submodules store their output under "__call__", sow() a 1-tuple.
    value = inter[name]
    out = value["__call__"][0] if "__call__" in value else value[0]
    kind = _layer_type(model, name)
    rows.append((name, kind, (None, *out.shape[1:]),
                 count_params(params.get(name, {}))))
  rows.append(("softmax", "in the loss", (None, *logits.shape[1:]), 0))
  total = count_params(params)
  header = ("layer", "type", "output shape", "params")

  def fmt_shape(shape):
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"

  body = [(n, k, fmt_shape(s), f"{p:,}") for n, k, s, p in rows]
  body.append(("total", "", "", f"{total:,}"))
  widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]

  def line(row):  # parameter counts right-aligned, the rest left
    cells = (c.rjust(w) if i == 3 else c.ljust(w)
             for i, (c, w) in enumerate(zip(row, widths, strict=True)))
    return "  ".join(cells).rstrip()

  rule = "-" * len(line(header))
  out = [line(header), rule, *map(line, body[:-1]), rule, line(body[-1])]
  return "\n".join(out)


def _layer_type(model: CNN, name: str) -> str:
  if name.startswith("conv"):
    return "Conv 3x3, valid"
  if name.startswith("norm"):
    return {"group": f"GroupNorm({model.n_groups})",
            "batch": "BatchNorm"}[model.norm]
  if name.startswith("relu"):
    return "ReLU"
  if name == "flatten":
    return "Reshape"
  if name == "dense":
    return "Dense"
  return ""
