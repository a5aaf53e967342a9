"""notebooks/walkthrough.ipynb runs from top to bottom with FAST = True on the bundled data.

The notebook is executed in a real Jupyter kernel (nbclient + ipykernel), in an empty temporary
folder, with a papermill-style cell `FAST = True` injected after its "parameters" cell; any cell
that raises fails the test (the notebook's own asserts check the repair, the attention
recomputation and llama.cpp's agreement). The executed copy, figures included, is written to
$AZLLM_NOTEBOOK_OUT (a CI artifact) or the test's tmp_path: never into the repository.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

from conftest import REPO, skip_unless_ci

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK = NOTEBOOKS / "walkthrough.ipynb"


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        skip_unless_ci(f"{module} not installed (pip install 'azllm[notebook]')")


def _read():
    import nbformat

    return nbformat.read(NOTEBOOK, as_version=4)


def inject_parameters(nb, **params) -> None:
    """Papermill's convention: a cell tagged "injected-parameters" right after "parameters"."""
    from nbformat.v4 import new_code_cell

    at = next(
        i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])
    )  # StopIteration (a test error) when the notebook lost its parameters cell
    cell = new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, cell)


def outputs_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        data = out.get("data", {})
        parts.append(data.get("text/plain", "") + data.get("text/html", ""))
        parts.append(data.get("text/markdown", ""))
    return "".join(p if isinstance(p, str) else "".join(p) for p in parts)


def test_committed_notebook_is_the_generated_one_without_outputs():
    _need("nbformat")
    sys.path.insert(0, str(NOTEBOOKS))
    try:
        import build_walkthrough
    finally:
        sys.path.remove(str(NOTEBOOKS))
    assert NOTEBOOK.read_text(encoding="utf-8") == build_walkthrough.text(), (
        "notebooks/walkthrough.ipynb differs from notebooks/walkthrough_cells.py: edit the "
        "cells file and run `python notebooks/build_walkthrough.py`"
    )
    nb = _read()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "FAST = True" in tagged[0].source


def test_walkthrough_notebook_executes(tmp_path, monkeypatch):
    for module in ("nbclient", "nbformat", "ipykernel"):
        _need(module)
    import nbformat
    from nbclient import NotebookClient

    nb = _read()
    inject_parameters(nb, FAST=True)
    work = tmp_path / "cwd"
    work.mkdir()
    out_dir = Path(os.environ.get("AZLLM_NOTEBOOK_OUT") or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The kernel imports this checkout's azllm (under bench/mutants.py a mutated copy), not
    # whatever the environment has installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    client = NotebookClient(
        nb,
        timeout=600,  # per cell; the whole notebook takes ~2 min on 2 idle cores
        kernel_name="python3",
        resources={"metadata": {"path": str(work)}},
    )
    start = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError on the first cell that raises
    finally:
        nbformat.write(nb, out_dir / "walkthrough.executed.ipynb")
        print(f"notebook ran {time.perf_counter() - start:.0f} s; executed copy in {out_dir}")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a code cell did not run"
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    # the loss curve, the attention map, the temperature plot and the evaluation bar chart
    assert len(images) >= 4, f"only {len(images)} figures"
    everything = "\n".join(outputs_text(c) for c in code)
    assert "✅" in everything and "❌" not in everything  # the mojibake table
    if importlib.util.find_spec("llama_cpp") is None:
        skip_unless_ci("llama-cpp-python not installed: the notebook skipped llama.cpp")
    assert "llama.cpp result:" in everything, "the llama.cpp cell did not run"
