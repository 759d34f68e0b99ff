"""The MNIST example trained data parallel on 8 simulated CPU devices: a check
run by ``test_sharding.py``.

``multidevice_checks.py`` runs it in its subprocess with its own checks. The
example (``examples/mnist_cnn.py`` and its ``mnist`` package) trains the same
network on 1, 2 and 8 devices, with GroupNorm and with BatchNorm, as
``docs/multiple_devices.md`` says; batches that do not split are refused.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import pathlib
import sys

import jax
import numpy as np


def _mnist_example_modules():
  """examples/mnist_cnn.py and its ``mnist`` package, imported as the tests do."""
  examples = str(pathlib.Path(__file__).resolve().parents[1] / "examples")
  if examples not in sys.path:
    sys.path.insert(0, examples)
  import mnist_cnn
  from mnist import input_pipeline
  from mnist import train

  return mnist_cnn, input_pipeline, train


def check_mnist_example_data_parallel_matches_single_device():
  # The example's float32 training, as a user runs it: not in this script's
  # float64 mode (restored afterwards for the other checks).
  prev_x64 = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", False)
  try:
    _mnist_data_parallel_case()
  finally:
    jax.config.update("jax_enable_x64", prev_x64)


def _mnist_data_parallel_case():
  mnist_cnn, input_pipeline, train = _mnist_example_modules()
  data = input_pipeline.load_embedded()
  rng = np.random.default_rng(0)
  tr = rng.choice(len(data.train_labels), 256, replace=False)
  te = rng.choice(len(data.test_labels), 128, replace=False)
  small = input_pipeline.Dataset(data.train_images[tr], data.train_labels[tr],
                                 data.test_images[te], data.test_labels[te])
  mesh8 = train.make_mesh()
  assert mesh8.size == 8 and mesh8.axis_names == (train.BATCH_AXIS,), mesh8
  quiet = dict(progress=False, log=lambda s: None)
  # docs/multiple_devices.md: 1, 2 and 8 devices train the same network (8 steps of 32).
  for norm, mesh in itertools.product(("group", "batch"), (train.make_mesh(2), mesh8)):
    config = train.Config(epochs=1, batch_size=32, norm=norm)  # 8 steps
    one, h_one = train.train(config, small, **quiet)
    dp, h_dp = train.train(config, small, mesh=mesh, **quiet)
    # Trained data-parallel: every array replicated on the mesh's devices.
    for leaf in jax.tree_util.tree_leaves(dp.params):
      assert leaf.sharding.is_fully_replicated, leaf.sharding
      assert len(leaf.sharding.device_set) == mesh.size, leaf.sharding
    assert int(dp.step) == int(one.step) == 8
    params_one = jax.device_get(one.params)
    params_dp = jax.device_get(dp.params)
    assert all(leaf.dtype == np.float32
               for leaf in jax.tree_util.tree_leaves(params_dp))
    scale = max(float(np.max(np.abs(p)))
                for p in jax.tree_util.tree_leaves(params_one))
    for path, a in jax.tree_util.tree_leaves_with_path(params_one):
      name = jax.tree_util.keystr(path)
      if norm == "batch" and name.startswith("['conv") and "bias" in name:
        # BatchNorm subtracts the batch mean, so the loss does not depend on
        # the bias of the convolution before it: its gradient is rounding
        # noise, which adam scales up to steps of the learning rate, and
        # any change in the order of the sums (here: per-device partial
        # sums) moves it. The function is compared below instead.
        continue
      b = _get_path(params_dp, path)
      err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
      assert err <= 1e-4 * scale, (norm, name, err, scale)
    np.testing.assert_allclose(h_dp["train_loss"], h_one["train_loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(h_dp["test_loss"], h_one["test_loss"],
                               rtol=1e-5 if norm == "group" else 1e-2)
    assert h_dp["test_accuracy"] == h_one["test_accuracy"], (
        norm, h_dp["test_accuracy"], h_one["test_accuracy"])
    # The networks compute the same function (BatchNorm with batch
    # statistics, where the convolutions' biases cancel).
    x = small.test_images[:64]
    np.testing.assert_allclose(_mnist_logits(jax.device_get(dp), x),
                               _mnist_logits(one, x), rtol=1e-4, atol=1e-4)
    if norm == "batch":
      # The running variances do not depend on that bias: they agree.
      stats_one = jax.device_get(one.batch_stats)
      stats_dp = jax.device_get(dp.batch_stats)
      for layer in ("norm1", "norm2"):
        np.testing.assert_allclose(stats_dp[layer]["var"],
                                   stats_one[layer]["var"], rtol=1e-5)
  # A batch that does not split evenly is refused, by train() and the CLI.
  try:
    train.train(train.Config(epochs=1, batch_size=36), small, mesh=mesh8,
                **quiet)
  except ValueError as e:
    assert "multiple of the number of devices (8)" in str(e), e
  else:
    raise AssertionError("batch size 36 on 8 devices was accepted")
  try:
    with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage
      mnist_cnn.parse_args(["--devices", "3"])  # the default batch size: 32
  except SystemExit as e:
    assert e.code == 2, e
  else:
    raise AssertionError("--devices 3 with --batch-size 32 was accepted")
  assert mnist_cnn.choose_devices(32, 8) == 8
  assert mnist_cnn.choose_devices(36, 8) == 6
  assert mnist_cnn.describe_devices(8, 32) == (
      "data parallel over 8 cpu devices (4 examples each per step)")


@jax.jit
def _mnist_logits(state, x):
  """The example network's logits; BatchNorm with the batch's statistics."""
  variables = {"params": state.params}
  if state.batch_stats is None:
    return state.apply_fn(variables, x, train=False)
  variables["batch_stats"] = state.batch_stats
  return state.apply_fn(variables, x, train=True, mutable=["batch_stats"])[0]


def _get_path(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


EXAMPLE_CHECKS = {"check_mnist_example_data_parallel_matches_single_device":
                  check_mnist_example_data_parallel_matches_single_device}
