"""Writes notebooks/walkthrough.ipynb from the cells below: edit this file, then run

    .venv/bin/python notebooks/build_walkthrough.py
    .venv/bin/python notebooks/build_walkthrough.py --figures EXECUTED.ipynb OUTDIR  # its PNGs

The notebook is committed without outputs; tests/test_notebook.py executes it (FAST = True) and
checks that this script still produces the committed file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "walkthrough.ipynb"
CELLS_FILE = HERE / "walkthrough_cells.py"


def parse_cells(text: str) -> list:
    """Cells from `walkthrough_cells.py`: blocks start with a line `# %% [markdown]`,
    `# %%` or `# %% tags=a,b`; a markdown block is its lines without the leading `# `."""
    cells, kind, tags, lines = [], None, [], []

    def flush() -> None:
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            md = "\n".join(ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in lines)
            cells.append(new_markdown_cell(md.strip("\n")))
        else:
            cell = new_code_cell(body)
            if tags:
                cell.metadata["tags"] = tags
            cells.append(cell)

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            rest = line[4:].strip()
            kind = "markdown" if rest == "[markdown]" else "code"
            tags = rest[len("tags=") :].split(",") if rest.startswith("tags=") else []
            lines = []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build() -> nbformat.NotebookNode:
    nb = new_notebook(cells=parse_cells(CELLS_FILE.read_text(encoding="utf-8")))
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": [], "toc_visible": True}
    nb.metadata["accelerator"] = "GPU"
    for i, cell in enumerate(nb.cells):  # stable ids: a rebuild changes nothing that did not
        cell["id"] = f"cell-{i:02d}"
    return nb


def text() -> str:
    return nbformat.writes(build()) + "\n"


def export_figures(executed: Path, out: Path) -> list[Path]:
    """Every PNG an executed copy of the notebook shows, as OUT/walkthrough-<cell>-<n>.png."""
    import base64

    nb = nbformat.read(executed, as_version=4)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, cell in enumerate(nb.cells):
        pngs = [
            o["data"]["image/png"]
            for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        for k, data in enumerate(pngs):
            path = out / f"walkthrough-{i:02d}-{k}.png"
            path.write_bytes(base64.b64decode(data))
            written.append(path)
    return written


def main() -> int:
    if sys.argv[1:2] == ["--figures"]:
        for path in export_figures(Path(sys.argv[2]), Path(sys.argv[3])):
            print(path)
        return 0
    NOTEBOOK.write_text(text(), encoding="utf-8")
    print(f"wrote {NOTEBOOK} ({len(build().cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
