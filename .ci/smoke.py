"""Smoke test of an installed gnorm, run by .ci/wheel_check against the wheel.

Usage:
  python .ci/smoke.py contents DIST_DIR    # the sdist and wheel hold every package file
  python .ci/smoke.py installed VERSION    # run from outside the source tree

``contents`` compares the archives with the source tree (every ``.py`` and
``.json`` file and ``py.typed`` under ``gnorm/``). ``installed`` imports
gnorm from site-packages (never the checkout), imports every module of the
package, and runs ``group_norm`` under ``jit`` and ``grad`` against a float64 NumPy
reference, the Pallas path in interpret mode, and a training step of the
linen and nnx modules. Any failure exits non-zero.
"""

import pathlib
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _package_files():
  files = {p.relative_to(ROOT).as_posix() for pattern in ("*.py", "*.json")
           for p in (ROOT / "gnorm").rglob(pattern)}
  files.add("gnorm/py.typed")
  return files


def check_contents(dist):
  dist = pathlib.Path(dist)
  (wheel,) = dist.glob("gnorm-*.whl")
  (sdist,) = dist.glob("gnorm-*.tar.gz")
  expected = _package_files()
  in_wheel = set(zipfile.ZipFile(wheel).namelist())
  with tarfile.open(sdist) as tar:
    in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
  for archive, names in ((wheel.name, in_wheel), (sdist.name, in_sdist)):
    missing = sorted(expected - names)
    if missing:
      sys.exit(f"{archive} lacks {missing}")
  print(f"{wheel.name} and {sdist.name} hold all {len(expected)} package files")


def check_installed(version):
  import importlib
  import pkgutil
  import sysconfig

  import numpy as np

  import gnorm

  where = pathlib.Path(gnorm.__file__).resolve()
  site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
  if not where.is_relative_to(site) or (ROOT / "gnorm") in where.parents:
    sys.exit(f"gnorm was imported from {where}, not from the wheel installed in {site}")
  if gnorm.__version__ != version:
    sys.exit(f"gnorm.__version__ is {gnorm.__version__!r}, pyproject.toml says {version!r}")
  if not (where.parent / "py.typed").is_file():
    sys.exit("the installed package has no py.typed marker")
  modules = [info.name for info in pkgutil.walk_packages(gnorm.__path__, "gnorm.")]
  for name in modules:
    importlib.import_module(name)

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  params = {"gamma": jnp.full(8, 1.5), "beta": jnp.full(8, 0.25)}
  x64 = np.asarray(x, np.float64).reshape(2, 16, 4, 2)
  mean = x64.mean(axis=(1, 3), keepdims=True)
  var = ((x64 - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  ref = ((x64 - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * 1.5 + 0.25

  f = jax.jit(gnorm.group_norm, static_argnames="n_groups")
  err = float(np.abs(np.asarray(f(params, x, n_groups=4)) - ref).max())
  if err > 1e-5:
    sys.exit(f"group_norm under jit is {err:.2e} from the float64 reference")
  grads = jax.grad(lambda p: jnp.sum(gnorm.group_norm(p, x, 4) ** 2))(params)
  if not np.allclose(grads["beta"], 2 * np.sum(ref, axis=(0, 1, 2)), rtol=1e-4, atol=1e-4):
    sys.exit("grad of group_norm does not match the reference")
  pallas = gnorm.group_norm(params, x, 4, implementation="pallas")
  if float(np.abs(np.asarray(pallas) - ref).max()) > 1e-5:
    sys.exit("the Pallas path (interpret mode) does not match the reference")

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(gnorm.GroupNorm(4, activation="silu")(x).mean(axis=(1, 2)))

  variables = Net().init(jax.random.key(1), x)
  opt = optax.sgd(0.1)
  state = opt.init(variables)

  def loss(v):
    return jnp.mean(Net().apply(v, x) ** 2)

  updates, state = opt.update(jax.grad(loss)(variables), state)
  if not float(loss(optax.apply_updates(variables, updates))) < float(loss(variables)):
    sys.exit("a training step of the linen module did not lower the loss")

  layer = gnorm.nnx.GroupNorm(4, 8, rngs=nnx.Rngs(0))
  if not np.allclose(nnx.jit(lambda m, x: m(x))(layer, x), gnorm.group_norm(None, x, 4),
                     atol=1e-6):
    sys.exit("gnorm.nnx.GroupNorm does not match group_norm")
  print(f"gnorm {gnorm.__version__} from {where.parent}: {len(modules) + 1} modules import; "
        f"jit/grad/pallas/linen/nnx checks pass (jit error {err:.1e})")


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] not in ("contents", "installed"):
    sys.exit(__doc__)
  {"contents": check_contents, "installed": check_installed}[sys.argv[1]](sys.argv[2])
