"""Reading training text: files and folders in, a stream of documents out.

This is the small reader the tokenizer and shard stages use; `azllm corpus build` has the full
set (Wikipedia dumps, HTML, WARC, Parquet, cleaning). Formats here:

- `.txt` (optionally `.gz`/`.zst`): one document per blank-line-separated block; a file with
  no blank line at all (a verse per line, a sentence per line) is one document per line, so that
  such a file still splits into many documents for the train/val split.
- `.jsonl` (optionally `.gz`/`.zst`): one JSON object per line with a `"text"` field.
- a folder: every such file below it, in sorted order. A folder written by `azllm corpus build`
  (it holds `train.jsonl.zst` and `val.jsonl.zst`) keeps its own train/val split.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from azllm.errors import AzllmError

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst", ".jsonl", ".jsonl.gz", ".jsonl.zst")


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name
    if name.endswith(".gz"):
        raw = gzip.open(path, "rb")
    elif name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    else:
        raw = open(path, "rb")
    # strict decoding: a non-UTF-8 file is the user's to fix, not ours to guess
    return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", errors="strict", newline="")


def _read_lines(path: Path) -> Iterator[str]:
    lineno = 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 (lineno is read in the except)
                yield line
    except UnicodeDecodeError as e:
        raise AzllmError(
            f"{path}: not UTF-8 text (bad byte near line {lineno + 1}: {e.reason}); "
            "convert it to UTF-8 or run `azllm corpus build` to repair it"
        ) from None
    except (OSError, EOFError) as e:
        raise AzllmError(f"{path}: cannot read ({e})") from None


def _txt_documents(path: Path) -> Iterator[str]:
    # Streams: a first pass stops at the first blank line (or reads through a file that has none)
    per_line = not any(not ln.strip() for ln in _read_lines(path))
    block: list[str] = []
    for ln in _read_lines(path):
        ln = ln.rstrip()
        if per_line:
            if ln.strip():
                yield ln.strip()
        elif ln.strip():
            block.append(ln)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _jsonl_documents(path: Path) -> Iterator[str]:
    for lineno, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AzllmError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise AzllmError(f'{path}:{lineno}: expected an object with a string field "text"')
        if text.strip():
            yield text


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named directly and the text files found below named folders, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES)
            )
            if not found:
                raise AzllmError(f"{p}: folder has no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise AzllmError(f"{p}: no such file or folder")
    if not files:
        raise AzllmError("no input files given")
    return files


def split_hint(path: Path) -> str | None:
    """'train'/'val' for the two files of an `azllm corpus build` folder, else None."""
    if path.name in ("train.jsonl.zst", "val.jsonl.zst") and (path.parent / "report.json").exists():
        return path.name.split(".")[0]
    return None


def iter_documents(path: Path) -> Iterator[str]:
    """The documents of one file (see the module docstring for formats)."""
    if ".jsonl" in path.suffixes or path.name.endswith((".jsonl.gz", ".jsonl.zst")):
        yield from _jsonl_documents(path)
    else:
        yield from _txt_documents(path)


def iter_all_documents(inputs: list[str | Path], *, train_only: bool = False) -> Iterator[str]:
    """All documents of all inputs; train_only skips the val file of a built corpus folder."""
    for path in expand_inputs(inputs):
        if not (train_only and split_hint(path) == "val"):
            yield from iter_documents(path)
