"""Training and evaluation of the seed's CNN with optax.

Structured like flax's MNIST example: :func:`train_step` is jitted and
pure, :func:`evaluate` runs a jitted step over batches, :func:`train` runs
the epochs, and ``examples/mnist_cnn.py`` parses flags and calls it.

Data parallelism: given a ``mesh`` (:func:`make_mesh`), :func:`train` and
:func:`evaluate` replicate the state on every device of the mesh and split
each batch along its ``"batch"`` axis. The step is the same function, jitted
with these shardings; XLA sums the gradients (and BatchNorm's batch
statistics) across devices, so the update is that of the whole batch on one
device, up to the order of floating-point sums. GroupNorm normalises each
example on its own and needs no communication at all.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from mnist import input_pipeline
from mnist import models

# Written into saved files so that --load can reject a file of another model.

# The mesh axis that batches are split along.
BATCH_AXIS = "batch"


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters; the defaults are those of ``python mnist_cnn.py``."""

  epochs: int = 8
  batch_size: int = 32
  learning_rate: float = 1e-3
  seed: int = 0
  norm: str = "group"


class TrainState(train_state.TrainState):
  """Parameters and optimizer state, plus BatchNorm's running statistics."""

  batch_stats: Any = None


@functools.partial(jax.jit, static_argnums=0)
def _init(model, key, x):
  # Jitted: run eagerly, init would dispatch (and compile) op by op.
  return model.init(key, x)


def create_train_state(
    config: Config, total_steps: int, input_shape=(28, 28, 1),
) -> TrainState:
  """Initialises the network and adam with a cosine learning-rate decay."""
  model = _model(config.norm)
  # The "rbg" generator: XLA's CPU compiler spends seconds on threefry's
  # unrolled rounds in the initializers, a fraction of that on RngBitGenerator.
  key = jax.random.key(config.seed, impl="rbg")
  variables = _init(model, key, jnp.zeros((1, *input_shape), jnp.float32))
  return TrainState.create(
      apply_fn=model.apply,
      params=variables["params"],
      batch_stats=variables.get("batch_stats"),
      tx=_optimizer(config.learning_rate, max(total_steps, 1)),
  )


@functools.cache
def _model(norm: str) -> models.CNN:
  # Cached for the reason of _optimizer: bound methods compare their module
  # by identity, so `apply_fn` must come from one module object per norm.
  return models.CNN(norm=norm)


@functools.cache
def _optimizer(learning_rate: float, total_steps: int):
  # Cached: the optimizer is a static part of the jitted train_step, so an
  # equal one must be the same object for a second train() not to recompile.
  schedule = optax.cosine_decay_schedule(learning_rate, total_steps)
  return optax.adam(schedule)


def model_variables(state: TrainState) -> dict:
  """The variables ``apply`` takes: the parameters, and BatchNorm's statistics."""
  if state.batch_stats is None:
    return {"params": state.params}
  return {"params": state.params, "batch_stats": state.batch_stats}


def make_mesh(n_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first ``n_devices`` devices (default: all).

  The devices are ``jax.devices()``: with several processes
  (``jax.distributed.initialize()`` on each host) those of every process,
  and the mesh must then span them all, since each process runs the same
  program on its own devices. Its one axis, ``"batch"``, is the axis that
  :func:`train` splits each batch along.

  Raises:
    ValueError: ``n_devices`` is not between 1 and the device count, or,
      with several processes, is not all of them.
  """
  devices = jax.devices()
  n = len(devices) if n_devices is None else n_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"n_devices must be between 1 and the number of "
                     f"devices ({len(devices)}), got {n}")
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(f"with {jax.process_count()} processes the mesh must "
                     f"span all {len(devices)} devices, got n_devices={n}")
  return jax.make_mesh((n,), (BATCH_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXIS))


def replicate(state: TrainState, mesh: Mesh) -> TrainState:
  """``state`` with a full copy of every array on each device of ``mesh``.

  Every process must pass the same values (the same seed gives them).
  """
  return jax.device_put(state, _replicated(mesh))


def split_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Host arrays of a whole batch, split along ``"batch"`` over ``mesh``.

  Each process holds the whole batch (the data set ships in a package, and
  every process draws the same order); it passes on only the rows of its
  own devices (``jax.make_array_from_process_local_data``).
  """
  split = _batch_sharded(mesh)
  out = []
  for a in arrays:
    index = split.addressable_devices_indices_map(a.shape).values()
    lo = min(i[0].start or 0 for i in index)
    hi = max(len(a) if i[0].stop is None else i[0].stop for i in index)
    if hi - lo != len(index) * (len(a) // mesh.size):
      raise ValueError(f"this process's devices hold rows {lo}:{hi} of the batch, "
                       "not one contiguous block of their shares")
    out.append(jax.make_array_from_process_local_data(split, a[lo:hi], a.shape))
  return tuple(out)


def _train_step(
    state: TrainState, images: jax.Array, labels: jax.Array,
) -> tuple[TrainState, jax.Array]:
  """One adam step on a batch; returns the new state and the batch's loss."""

  def loss_fn(params):
    variables = {**model_variables(state), "params": params}
    if state.batch_stats is None:
      logits, updates = state.apply_fn(variables, images, train=True), {}
    else:
      logits, updates = state.apply_fn(
          variables, images, train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    return loss, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads)
  if state.batch_stats is not None:
    state = state.replace(batch_stats=updates["batch_stats"])
  return state, loss


train_step = jax.jit(_train_step)


@functools.cache
def _sharded_train_step(mesh: Mesh):
  # Cached per mesh so that a second train() reuses the compiled step. The
  # state goes in and comes out replicated; the batch is split.
  replicated, split = _replicated(mesh), _batch_sharded(mesh)
  return jax.jit(_train_step, in_shardings=(replicated, split, split),
                 out_shardings=(replicated, replicated))


def _eval_batch_impl(state, images, labels, mask):
  logits = state.apply_fn(model_variables(state), images, train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, axis=-1) == labels
  return jnp.sum(losses * mask), jnp.sum(correct * mask)


_eval_batch = jax.jit(_eval_batch_impl)


@functools.cache
def _sharded_eval_batch(mesh: Mesh):
  replicated, split = _replicated(mesh), _batch_sharded(mesh)
  return jax.jit(_eval_batch_impl,
                 in_shardings=(replicated, split, split, split),
                 out_shardings=replicated)


def evaluate(
    state: TrainState, images: np.ndarray, labels: np.ndarray,
    batch_size: int = 1000, *, mesh: Mesh | None = None,
) -> tuple[float, float]:
  """Mean cross-entropy and accuracy on a data set (BatchNorm in eval mode).

  The last batch is padded to ``batch_size`` and masked, so one compiled
  shape serves every data set size. With a ``mesh``, each batch is split
  over its devices (``batch_size`` is rounded up to a multiple of their
  number; the padding is masked, so the result does not change).
  """
  n = len(labels)
  batch_size = min(batch_size, n)
  eval_batch = _eval_batch
  if mesh is not None:
    batch_size = -(-batch_size // mesh.size) * mesh.size
    state = replicate(state, mesh)
    eval_batch = _sharded_eval_batch(mesh)
  total_loss = total_correct = 0.0
  for start in range(0, n, batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(y)
    mask = np.concatenate([np.ones(len(y), np.float32),
                           np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    if mesh is not None:
      x, y, mask = split_batch(mesh, x, y, mask)
    loss, correct = eval_batch(state, x, y, mask)
    total_loss += float(loss)
    total_correct += float(correct)
  return total_loss / n, total_correct / n


def train(
    config: Config,
    data: input_pipeline.Dataset,
    *,
    state: TrainState | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    mesh: Mesh | None = None,
) -> tuple[TrainState, dict[str, list[float]]]:
  """Trains for ``config.epochs`` epochs; deterministic for ``config.seed``.

  Each epoch visits the training set in a fresh order drawn from
  ``config.seed`` and drops the last incomplete batch, so every step has the
  same shape and compiles once.

  With a ``mesh`` (:func:`make_mesh`) it trains data-parallel: the state is
  replicated on the mesh's devices and each batch split between them, so
  each device computes the gradient of ``batch_size / mesh.size`` examples
  and XLA sums them. The batches, their order and the updates are those of
  the run without a mesh, up to floating-point rounding.

  Args:
    config: the hyperparameters.
    data: the train and held-out sets.
    state: a state to continue from (``--load``); a new one if ``None``.
    progress: show a tqdm progress bar per epoch.
    log: where the per-epoch summary lines go.
    mesh: a 1-D mesh to train data-parallel on; ``None``: the default device.

  Returns:
    The final state and the history: per-epoch ``train_loss``,
    ``test_loss``, ``test_accuracy`` and ``seconds``. With a mesh, the
    state's arrays are replicated on its devices (``jax.device_get`` them,
    or use :func:`save`, for host copies).

  Raises:
    ValueError: the batch size exceeds the training set, or is not a
      multiple of the number of devices in ``mesh``.
  """
  n = len(data.train_labels)
  if not 1 <= config.batch_size <= n:
    raise ValueError(
        f"batch size ({config.batch_size}) must be between 1 and the number "
        f"of training examples ({n})")
  if mesh is not None and config.batch_size % mesh.size:
    raise ValueError(
        f"batch size ({config.batch_size}) must be a multiple of the number "
        f"of devices ({mesh.size}) to split it evenly between them")
  steps_per_epoch = n // config.batch_size
  if state is None:
    state = create_train_state(
        config, config.epochs * steps_per_epoch, data.train_images.shape[1:])
  step_fn = train_step
  if mesh is not None:
    state = replicate(state, mesh)
    step_fn = _sharded_train_step(mesh)
  rng = np.random.default_rng(config.seed)
  history = {"train_loss": [], "test_loss": [], "test_accuracy": [],
             "seconds": []}
  for epoch in range(1, config.epochs + 1):
    start = time.perf_counter()
    order = rng.permutation(n)[:steps_per_epoch * config.batch_size]
    batches = order.reshape(steps_per_epoch, config.batch_size)
    losses = []
    bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="step",
               disable=not progress, leave=False, file=sys.stderr)
    for i, batch in enumerate(bar):
      images, labels = data.train_images[batch], data.train_labels[batch]
      if mesh is not None:  # each device receives only its slice
        images, labels = split_batch(mesh, images, labels)
      state, loss = step_fn(state, images, labels)
      losses.append(loss)
      if i % 25 == 0:  # reading the loss syncs with the device; not every step
        bar.set_postfix(loss=f"{float(loss):.4f}")
    train_loss = float(jnp.mean(jnp.stack(losses)))
    test_loss, test_accuracy = evaluate(
        state, data.test_images, data.test_labels, mesh=mesh)
    seconds = time.perf_counter() - start
    for key, value in zip(history, (train_loss, test_loss, test_accuracy,
                                    seconds), strict=True):
      history[key].append(value)
    log(f"epoch {epoch:{len(str(config.epochs))}d}/{config.epochs}: "
        f"train loss {train_loss:.4f}, held-out loss {test_loss:.4f}, "
        f"held-out accuracy {test_accuracy:.4f} ({seconds:.1f} s)")
  return state, history


def plot_history(history: dict[str, list[float]], path: str | os.PathLike,
                 title: str = "") -> None:
  """Saves a PNG of the loss and held-out accuracy curves."""
  import matplotlib  # Imported late: only --plot needs it.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  epochs = np.arange(1, len(history["train_loss"]) + 1)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
  ax_loss.plot(epochs, history["train_loss"], "o-", label="train")
  ax_loss.plot(epochs, history["test_loss"], "o-", label="held-out")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
  ax_loss.legend()
  ax_acc.plot(epochs, history["test_accuracy"], "o-", color="C1")
  ax_acc.set(xlabel="epoch", ylabel="accuracy", title="held-out accuracy")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
