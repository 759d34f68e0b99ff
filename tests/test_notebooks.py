"""Runs the notebooks top to bottom, in their small-settings mode."""

import os
import pathlib

# Before jupyter_core is imported: its platformdirs migration warning would be
# an error under filterwarnings=error.
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")

import nbclient  # noqa: E402
import nbformat  # noqa: E402
import pytest  # noqa: E402

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name, monkeypatch):
  """Executes notebooks/NAME in GNORM_NB_SMOKE mode; returns the notebook."""
  # The kernel inherits this process's environment (JAX_PLATFORMS=cpu too).
  monkeypatch.setenv("GNORM_NB_SMOKE", "1")
  path = NOTEBOOKS / name
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute()
  return nb


def _text(cell):
  return "".join(out.get("text", "") for out in cell.get("outputs", ())
                 if out.get("output_type") == "stream")


def _images(nb):
  return [out for cell in nb.cells for out in cell.get("outputs", ())
          if "image/png" in out.get("data", {})]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "batch_size_study.ipynb"])
def test_committed_with_full_outputs(name):
  """The committed notebooks carry the outputs of a full (not smoke) run."""
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(cell.execution_count for cell in code), "not executed"
  assert _images(nb), "no plot in the committed outputs"
  assert not any(out.get("output_type") == "error"
                 for cell in code for out in cell.outputs)
  assert "GNORM_NB_SMOKE" in code[1].source + code[2].source


def test_quickstart(monkeypatch):
  nb = _execute("quickstart.ipynb", monkeypatch)
  out = "\n".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
  assert "ready" in out
  assert "jit matches:  True" in out
  assert "vmap matches: True" in out
  assert "same as the function: True" in out
  assert "94,714 parameters" in out
  assert "gn1" in out and "gn2" in out
  assert "epoch 1: train loss" in out
  assert len(_images(nb)) == 1


def test_batch_size_study(monkeypatch):
  nb = _execute("batch_size_study.ipynb", monkeypatch)
  out = "\n".join(_text(cell) for cell in nb.cells if cell.cell_type == "code")
  for norm in ("group", "batch", "none"):
    assert f"{norm:5s} batch  2: held-out accuracy" in out
  assert len(_images(nb)) == 1
