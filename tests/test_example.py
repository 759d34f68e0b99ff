"""Smoke tests of examples/mnist_cnn.py: a few steps on tiny data."""

import contextlib
import io
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import mnist_cnn  # noqa: E402
from mnist import idx  # noqa: E402
from mnist import checkpoint  # noqa: E402
from mnist import input_pipeline  # noqa: E402
from mnist import models  # noqa: E402
from mnist import train  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
  """64 real training digits and 32 held-out ones from the embedded set."""
  data = input_pipeline.load_embedded()
  rng = np.random.default_rng(0)
  tr = rng.choice(len(data.train_labels), 64, replace=False)
  te = rng.choice(len(data.test_labels), 32, replace=False)
  return input_pipeline.Dataset(
      data.train_images[tr], data.train_labels[tr],
      data.test_images[te], data.test_labels[te])


def _params_equal(a, b):
  same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      jax.tree.leaves(same))


@pytest.mark.parametrize("norm,total", [
    ("group", 94_714), ("batch", 94_714), ("none", 94_650)])
def test_summary(norm, total):
  table = models.summary(models.CNN(norm=norm))
  lines = table.splitlines()
  assert lines[-1].split() == ["total", f"{total:,}"]
  rows = {line.split()[0]: line for line in lines[2:-2]}
  assert list(rows) == [
      "input", "conv1", *(["norm1"] if norm != "none" else []), "relu1",
      "conv2", *(["norm2"] if norm != "none" else []), "relu2", "flatten",
      "dense", "softmax"]
  assert rows["conv1"].split()[-1] == "160"
  assert "(N, 26, 26, 16)" in rows["conv1"]
  assert rows["conv2"].split()[-1] == "2,320"
  assert "(N, 9216)" in rows["flatten"]
  assert rows["dense"].split()[-1] == "92,170"
  if norm == "group":
    assert "GroupNorm(4)" in rows["norm1"]
    assert rows["norm2"].split()[-1] == "32"


def test_model_uses_gnorm_group_norm():
  import gnorm

  model = models.CNN()
  state = train.create_train_state(train.Config(), 8)
  params = state.params
  assert jax.tree.map(jnp.shape, params["norm1"]) == {
      "gamma": (16,), "beta": (16,)}
  assert state.batch_stats is None

  @jax.jit
  def forward(x):
    _, inter = model.apply({"params": params}, x, capture_intermediates=True,
                           mutable=["intermediates"])
    return inter["intermediates"], models.predict_proba(
        model, {"params": params}, x)

  inter, probs = forward(jax.random.uniform(jax.random.key(1), (2, 28, 28, 1)))
  # The layer's output is the pure function's.
  np.testing.assert_allclose(
      inter["norm2"]["__call__"][0],
      gnorm.group_norm(params["norm2"], inter["conv2"]["__call__"][0], 4),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("norm", models.NORMS)
def test_train_smoke(tiny, norm):
  config = train.Config(epochs=2, batch_size=16, norm=norm)
  lines = []
  state, history = train.train(config, tiny, progress=False,
                               log=lines.append)
  assert len(lines) == 2 and lines[-1].startswith("epoch 2/2: train loss")
  assert all(len(v) == 2 for v in history.values())
  assert all(np.isfinite(v).all() for v in history.values())
  # Two epochs on 64 real digits: the training loss falls from ~ln(10).
  assert history["train_loss"][1] < history["train_loss"][0]
  assert all(0.0 <= a <= 1.0 for a in history["test_accuracy"])
  assert int(state.step) == 2 * 64 // 16
  assert (state.batch_stats is not None) == (norm == "batch")


def test_train_step_and_evaluate(tiny):
  # The settings of test_train_smoke, so its compiled step is reused.
  config = train.Config(epochs=2, batch_size=16, norm="batch")
  state = train.create_train_state(config, total_steps=8)
  x, y = tiny.train_images[:16], tiny.train_labels[:16]
  new, loss = train.train_step(state, x, y)
  assert loss.shape == () and np.isfinite(float(loss))
  assert int(new.step) == 1
  assert not _params_equal(new.params, state.params)
  # BatchNorm's running statistics moved towards the batch statistics.
  assert not _params_equal(new.batch_stats, state.batch_stats)
  loss, accuracy = train.evaluate(new, tiny.test_images, tiny.test_labels,
                                  batch_size=10)  # 32 = 10 + 10 + 10 + 2
  ref_loss, ref_accuracy = train.evaluate(new, tiny.test_images,
                                          tiny.test_labels)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert accuracy == ref_accuracy
  assert accuracy * 32 == round(accuracy * 32)


def test_deterministic_for_a_seed(tiny):
  config = train.Config(epochs=2, batch_size=16)
  a, ha = train.train(config, tiny, progress=False, log=lambda s: None)
  b, hb = train.train(config, tiny, progress=False, log=lambda s: None)
  assert _params_equal(a.params, b.params)
  assert ha["train_loss"] == hb["train_loss"]
  c, _ = train.train(train.Config(epochs=2, batch_size=16, seed=1), tiny,
                     progress=False, log=lambda s: None)
  assert not _params_equal(a.params, c.params)


def test_mesh_of_one_device_matches_plain_run(tiny, tmp_path):
  # The data-parallel code path on this one-device suite (the 8-device
  # comparison is check_mnist_example_data_parallel_matches_single_device in
  # multidevice_checks.py). The settings of test_deterministic_for_a_seed.
  config = train.Config(epochs=2, batch_size=16)
  mesh = train.make_mesh()
  assert mesh.size == 1 and mesh.axis_names == (train.BATCH_AXIS,)
  plain, h_plain = train.train(config, tiny, progress=False,
                               log=lambda s: None)
  dp, h_dp = train.train(config, tiny, progress=False, log=lambda s: None,
                         mesh=mesh)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               dp.params, plain.params)
  np.testing.assert_allclose(h_dp["train_loss"], h_plain["train_loss"],
                             rtol=1e-6)
  assert h_dp["test_accuracy"] == h_plain["test_accuracy"]
  # Saved from the mesh: host arrays, which load like any others.
  checkpoint.save(tmp_path / "dp.msgpack", dp, "group")
  loaded = checkpoint.load(tmp_path / "dp.msgpack",
                      train.create_train_state(config, 1), "group")
  assert all(isinstance(leaf, np.ndarray)
             for leaf in jax.tree.leaves(loaded.params))
  assert _params_equal(loaded.params, dp.params)
  with pytest.raises(ValueError, match="between 1 and the number of devices"):
    train.make_mesh(2)


def test_batch_size_larger_than_data(tiny):
  with pytest.raises(ValueError, match=r"batch size \(65\)"):
    train.train(train.Config(batch_size=65), tiny, progress=False)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_save_load_exact(tiny, tmp_path, norm):
  config = train.Config(epochs=2, batch_size=16, norm=norm)
  state, _ = train.train(config, tiny, progress=False, log=lambda s: None)
  path = tmp_path / "model.msgpack"
  checkpoint.save(path, state, norm)
  assert not path.read_bytes().startswith(b"\x80")  # not a pickle
  fresh = train.create_train_state(train.Config(seed=5, norm=norm), 1)
  loaded = checkpoint.load(path, fresh, norm)
  assert _params_equal(loaded.params, state.params)
  if norm == "batch":
    assert _params_equal(loaded.batch_stats, state.batch_stats)
  assert train.evaluate(loaded, tiny.test_images, tiny.test_labels) == (
      train.evaluate(state, tiny.test_images, tiny.test_labels))
  other = "none" if norm == "group" else "group"
  with pytest.raises(ValueError, match=f"saved with --norm {norm}"):
    checkpoint.load(path, train.create_train_state(
        train.Config(norm=other), 1), other)


def test_load_rejects_other_files(tmp_path):
  state = train.create_train_state(train.Config(), 1)
  bad = tmp_path / "bad.bin"
  bad.write_bytes(b"\xc1 definitely not msgpack")
  with pytest.raises(ValueError, match="not a saved model"):
    checkpoint.load(bad, state, "group")
  import flax

  other = tmp_path / "other.msgpack"
  other.write_bytes(flax.serialization.msgpack_serialize({"a": 1}))
  with pytest.raises(ValueError, match="not a model saved by this example"):
    checkpoint.load(other, state, "group")


def _run_main(argv):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    accuracy = mnist_cnn.main(argv)
  return accuracy, out.getvalue().splitlines()


def test_main_with_idx_files_save_load_plot(tmp_path):
  rng = np.random.default_rng(0)
  for key, n in [("train", 64), ("t10k", 32)]:
    idx.write_idx(tmp_path / f"{key}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    idx.write_idx(tmp_path / f"{key}-labels-idx1-ubyte",
                  rng.integers(0, 10, n, dtype=np.uint8))
  saved, plot = tmp_path / "p.msgpack", tmp_path / "curves.png"
  accuracy, lines = _run_main([
      "--data-dir", str(tmp_path), "--epochs", "2", "--batch-size", "16",
      "--save", str(saved), "--plot", str(plot), "--no-progress"])
  assert lines[0] == (f"data: MNIST IDX files in {tmp_path}: 64 train, "
                      "32 held-out")
  assert any(line.split()[:2] == ["total", "94,714"] for line in lines)
  assert "single cpu device" in lines  # the suite has one device
  assert re.fullmatch(r"held-out accuracy: \d\.\d{4}", lines[-1])
  assert lines[-1] == f"held-out accuracy: {accuracy:.4f}"
  assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
  # --load with --epochs 0 evaluates the saved parameters: same accuracy.
  again, lines = _run_main([
      "--data-dir", str(tmp_path), "--epochs", "0", "--load", str(saved)])
  assert f"loaded parameters from {saved}" in lines
  assert again == accuracy


def test_cli_runs_from_elsewhere(tmp_path):
  script = EXAMPLES / "mnist_cnn.py"
  result = subprocess.run(
      [sys.executable, str(script), "--help"], cwd=tmp_path,
      capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  for flag in ("--epochs", "--batch-size", "--learning-rate", "--seed",
               "--norm {group,batch,none}", "--data-dir", "--save", "--load",
               "--plot", "--devices N"):
    assert flag in result.stdout


def test_cli_rejects_bad_flags(capsys):
  for argv, message in [(["--epochs", "-1"], "--epochs must be >= 0"),
                        (["--batch-size", "0"], "--batch-size must be >= 1"),
                        (["--norm", "layer"], "invalid choice: 'layer'"),
                        (["--devices", "0"], "--devices must be between 1 "
                         "and the number of devices (1), got 0"),
                        (["--devices", "2"], "--devices must be between 1 "
                         "and the number of devices (1), got 2")]:
    with pytest.raises(SystemExit) as info:
      mnist_cnn.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_choose_devices():
  assert mnist_cnn.choose_devices(32, 1) == 1
  assert mnist_cnn.choose_devices(32, 8) == 8
  assert mnist_cnn.choose_devices(36, 8) == 6  # the most that divide 36
  assert mnist_cnn.choose_devices(7, 4) == 1
  assert mnist_cnn.choose_devices(32, 8, requested=2) == 2


def test_cli_reports_bad_files_without_traceback(tmp_path):
  idx.write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28),
                                                               np.uint8))
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00")
  with pytest.raises(SystemExit) as info:
    mnist_cnn.main(["--data-dir", str(tmp_path)])
  message = str(info.value.code)
  assert message.startswith("error: ")
  assert str(tmp_path / "train-labels-idx1-ubyte") in message
  assert "truncated header" in message
  missing = tmp_path / "missing.msgpack"
  with pytest.raises(SystemExit, match="error: .*missing.msgpack"):
    mnist_cnn.main(["--epochs", "0", "--load", str(missing)])
