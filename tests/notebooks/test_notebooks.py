"""Executes every notebook at its tiny setting (EGPO_NOTEBOOK_SETTING=tiny) with nbclient.

A notebook fails the test if any cell raises. Notebooks are stored without outputs, so
the executed copies are discarded. The kernel inherits this process's environment
(8 fake CPU devices from conftest, the compilation cache if enabled).
"""

import os
import pathlib

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ("egpo_weights_explained.ipynb", "ablate_calibration.ipynb", "inspect_run.ipynb",
         "study.ipynb")


def test_every_notebook_is_listed_and_stored_without_outputs():
  assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
  for name in NAMES:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), name
    # One parameters cell, read from the environment, so CI can pick the tiny setting.
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "EGPO_NOTEBOOK_SETTING" in params[0].source, name


def test_study_preregistration_cell_is_the_markdown_copy():
  nb = nbformat.read(NOTEBOOKS / "study.ipynb", as_version=4)
  cells = [c for c in nb.cells if "preregistration" in c.metadata.get("tags", [])]
  assert len(cells) == 1
  assert cells[0].source.strip() == (NOTEBOOKS / "PREREGISTRATION.md").read_text().strip()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_at_tiny_setting(name, tmp_path, monkeypatch):
  monkeypatch.setenv("EGPO_NOTEBOOK_SETTING", "tiny")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.delenv("EGPO_INSPECT_WORKDIR", raising=False)
  monkeypatch.delenv("EGPO_NOTEBOOK_OUTPUT", raising=False)
  # The notebooks import the repository's `experiments` package.
  root = str(NOTEBOOKS.parent)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  if name == "study.ipynb":   # the tiny study draws its figures and tables, not empty ones
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("| default |" in t for t in tables)                   # the pilot table
    assert any("| primary | accuracy | egpo - grpo |" in t for t in tables)
