"""The test matrix (``tests/matrix.py``) on ``"pallas"`` with the forward's
one-pass plan: a group per program, held in one block, x read once.

The class subclasses ``test_matrix_pallas.TestPallas`` through its module
(imported by name it would be collected twice); its own file lets pytest-xdist
give the two plans to different workers.
"""

from __future__ import annotations

import pytest

from gnorm._src.backends import pallas
from tests import test_matrix_pallas as two_kernels
from tests.test_matrix_pallas import fresh_caches  # noqa: F401  (the class's fixture)


class TestPallasOnePass(two_kernels.TestPallas):
  LEAVE_OUT = two_kernels.ONE_PASS

  @pytest.fixture(autouse=True)
  def plan(self, monkeypatch):
    # these small tests have few (sample, group) pairs
    monkeypatch.setattr(pallas, "ONE_PASS_MIN_PROGRAMS", 0)
