"""Saving and loading the example's trained model: msgpack, no pickle.

A file holds a format tag, the ``--norm`` it was trained with and the
network's variables (parameters, and BatchNorm's statistics); loading checks
all three before it touches the state.
"""

from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp

from mnist import train

_FORMAT = "gnorm-examples-mnist-cnn/1"


def save(path: str | os.PathLike, state: TrainState, norm: str) -> None:
  """Writes the parameters (and BatchNorm statistics) as msgpack; no pickle.

  The optimizer state is not saved: ``--load`` restores the model exactly,
  and further training starts a fresh schedule. The arrays are copied to the
  host first, so a state replicated over a mesh saves like any other.
  """
  variables = jax.device_get(train.model_variables(state))
  payload = {"format": _FORMAT, "norm": norm,
             "variables": flax.serialization.to_state_dict(variables)}
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(payload))


def load(path: str | os.PathLike, state: TrainState, norm: str) -> TrainState:
  """Returns ``state`` with the parameters saved in ``path``.

  Raises:
    ValueError: the file is not a saved model of this example, or was saved
      with another ``--norm``, or its parameters do not fit the network.
  """
  with open(path, "rb") as f:
    raw = f.read()
  try:
    payload = flax.serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises several unrelated types
    raise ValueError(f"{path}: not a saved model ({e})") from e
  if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
    raise ValueError(f"{path}: not a model saved by this example")
  if payload["norm"] != norm:
    raise ValueError(
        f"{path}: saved with --norm {payload['norm']}, loading with "
        f"--norm {norm}")
  target = train.model_variables(state)
  variables = flax.serialization.from_state_dict(target, payload["variables"])
  shapes = jax.tree.map(jnp.shape, (target, variables))
  if shapes[0] != shapes[1]:
    raise ValueError(f"{path}: parameter shapes do not match the network")
  return state.replace(params=variables["params"],
                       batch_stats=variables.get("batch_stats"))
