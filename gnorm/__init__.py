"""gnorm: Group Normalization (Wu & He, 2018) for JAX.

A pure function, ``gnorm.group_norm``, and thin Flax modules over it.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from gnorm._src.functional import group_norm as group_norm

try:
  __version__ = _version("gnorm")
except _PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0+unknown"

__all__ = (
    "group_norm",
)
