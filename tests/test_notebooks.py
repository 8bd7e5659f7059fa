"""The follow-along notebooks run top to bottom, in their default small mode (CPU, offline).

Each notebook executes in a Jupyter kernel (nbclient) inside a scratch copy of the repository
layout: symbolic links to the code, a fresh ``runs/``, so every run trains from scratch and
nothing is written into the working tree. Set ``NOTEBOOK_OUTPUT_DIR`` to keep the executed
notebooks (with their figures) there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from .conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def scratch_repository(folder: Path) -> Path:
    """``folder`` with a link to every top-level entry of the repository except ``runs``."""
    folder.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", ".git", ".pytest_cache"):
            (folder / entry.name).symlink_to(entry)
    return folder


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2, f"expected the follow-along notebooks in {ROOT / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_and_in_small_mode(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name}: clear its outputs"
    assert 'MODE = "small"' in code[0].source, f"{path.name}: the first code cell must set MODE = \"small\""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, fashion_mnist, tmp_path, monkeypatch):
    repo = scratch_repository(tmp_path / "repo")
    # The kernel starts in the scratch root (the notebooks find train.py there and stay in it) and inherits
    # this environment: imports from the scratch root, offline, 2 threads at most.
    monkeypatch.setenv("PYTHONPATH", str(repo))
    threads = os.environ.get("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))  # 1 under `make test`'s workers
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    monkeypatch.setenv("MKL_NUM_THREADS", threads)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, startup_timeout=120,
                                     resources={"metadata": {"path": str(repo)}})
    start = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    finally:
        seconds = time.perf_counter() - start
        print(f"{path.name}: {seconds:.0f} s")
        keep = os.environ.get("NOTEBOOK_OUTPUT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(Path(keep) / path.name))
    assert (repo / "runs").is_dir(), "the notebook should have trained into runs/"
