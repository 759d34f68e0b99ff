"""gnorm: Group Normalization (Wu & He, 2018) for JAX.

A pure function, ``gnorm.group_norm``, and thin Flax modules over it.
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from gnorm import init as init
from gnorm import nnx as nnx
from gnorm._src.functional import group_norm as group_norm
from gnorm._src.modules import GroupNorm as GroupNorm
from gnorm._src.porting import DEFAULT_EPSILON as DEFAULT_EPSILON
from gnorm._src.porting import from_equinox as from_equinox
from gnorm._src.porting import from_flax as from_flax
from gnorm._src.porting import from_haiku as from_haiku
from gnorm._src.porting import from_pytorch as from_pytorch

try:
  __version__ = _version("gnorm")
except _PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0+unknown"

__all__ = (
    "DEFAULT_EPSILON",
    "GroupNorm",
    "from_equinox",
    "from_flax",
    "from_haiku",
    "from_pytorch",
    "group_norm",
    "init",
    "nnx",
)
