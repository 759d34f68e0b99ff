"""pytest runs every ``>>>`` example on the documentation pages as a doctest.

Each page (``docs/*.md``) is one doctest: its ``pycon`` blocks run in order in
one namespace, and a block ends with a blank line before its closing fence so
that the fence is not read as expected output. ``conf.py`` and the Sphinx
extension are not tests.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

collect_ignore = ["conf.py", "_ext", "_build", "notebooks"]

# As in the test suite: implicit rank promotion is an error in the examples too.
jax.config.update("jax_numpy_rank_promotion", "raise")
