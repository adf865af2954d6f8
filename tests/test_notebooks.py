"""The notebooks run: each jupytext script in notebooks/ is executed as a notebook on small
parameters (DKM_NOTEBOOK_SMALL=1), and its paired .ipynb holds the same code.

The notebooks' jobs (``dkm.run_job``) run on the session's cluster of worker processes, given
to them as ``$DKM_SCHEDULER``, instead of a LocalCluster started for each job: starting one
is pinned by the ``dkm run`` tests, and digits_1000 starts its own from the kernel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def _code(notebook) -> list[str]:
    return [c.source.strip() for c in notebook.cells if c.cell_type == "code"]


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_paired_notebook_holds_the_same_code(script):
    paired = script.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} is missing: run `jupytext --sync {script.name}`"
    assert _code(jupytext.read(paired)) == _code(jupytext.read(script)), (
        f"{paired.name} and {script.name} differ: run `jupytext --sync {script.name}`"
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_small_parameters(script, process_cluster, monkeypatch):
    monkeypatch.setenv("DKM_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("DKM_SCHEDULER", process_cluster.scheduler_address)
    notebook = jupytext.read(script)
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(script.parent)}},
    )
    client.execute(env=dict(os.environ))
    errors = [
        out
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    images = [
        out
        for cell in notebook.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 3, "the notebook's figures did not render"
