"""Reading training text: files and folders in, a stream of documents out.

This is the small reader the tokenizer and shard stages use; `azllm corpus build` has the full
set (Wikipedia dumps, HTML, WARC, Parquet, cleaning). Finding the files (folders walked in
sorted order, hidden files and folders skipped, formats detected) and opening them
(gzip/bz2/xz/zstd) is the corpus readers' one implementation (corpus/readers.expand_inputs,
corpus/formats.open_binary); the documents of a file are read here, strictly. Formats:

- `.txt` (optionally `.gz`/`.bz2`/`.xz`/`.zst`): one document per blank-line-separated block,
  a block longer than DOC_CHARS cut at line boundaries, as `azllm corpus build` does. A file
  with no blank line at all (a verse or a sentence per line) is therefore running text with
  its line breaks, in chunks of about DOC_CHARS characters. It used to be a document per line
  (EOS between lines), so a model never saw a line break inside such text, though the text
  users evaluate and prompt with has them (measurements: bench/README.md, "Recipe comparison").
- `.jsonl` (optionally compressed): one JSON object per line with a `"text"` field.
- a folder: every such file below it, in sorted order. A folder written by `azllm corpus build`
  (it holds `train.jsonl.zst` and `val.jsonl.zst`) keeps its own train/val split.

A file that is not UTF-8, not valid JSON Lines, or truncated/corrupt (a compressed stream that
ends early) is an AzllmError naming it: a tokenizer is not trained on part of the data quietly.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterable, Iterator
from contextlib import closing
from pathlib import Path

from azllm.corpus import readers
from azllm.corpus.formats import STREAM_ERRORS, UnknownFormat, detect_format, open_binary
from azllm.corpus.readers import ReaderOptions, describe_error, expand_inputs, text_blocks
from azllm.errors import AzllmError

_TEXT = (".txt", ".jsonl")
_COMPRESSED = ("", ".gz", ".bz2", ".xz", ".zst")
TEXT_SUFFIXES = tuple(t + c for t in _TEXT for c in _COMPRESSED)
# Longest document cut from a text file: the corpus reader's, so `azllm tokenize` on raw text and
# on a corpus folder cut alike. Many chunks per file keep the hash split by document meaningful.
DOC_CHARS = ReaderOptions.max_doc_chars


def _format(path: Path) -> tuple[str, str | None]:
    try:
        return detect_format(path)
    except UnknownFormat as e:
        raise AzllmError(f"{path}: not a text or JSON Lines file ({e})") from None
    except STREAM_ERRORS as e:
        raise AzllmError(f"{path}: cannot read ({describe_error(e)})") from None


def _read_lines(path: Path) -> Iterator[str]:
    """The lines of a text file, each held whole only up to readers.MAX_RECORD_CHARS: a longer
    one (a 50 MB JSONL record) is read through in pieces and stands as a blank line (line
    numbers stay right), with one warning per file."""
    lineno, too_long = 0, []
    try:
        _, compression = _format(path)
        # strict decoding: a non-UTF-8 file is the user's to fix, not ours to guess; universal
        # newlines, as _bounded_lines ends a line at "\n" only
        with io.TextIOWrapper(
            open_binary(path, compression), encoding="utf-8", errors="strict", newline=None
        ) as f:
            for lineno, line in enumerate(readers._bounded_lines(f), 1):
                if isinstance(line, readers.RecordTooLong):
                    too_long.append(lineno)
                    line = "\n"
                yield line
    except UnicodeDecodeError as e:
        raise AzllmError(
            f"{path}: not UTF-8 text (bad byte near line {lineno + 1}: {e.reason}); "
            "convert it to UTF-8 or run `azllm corpus build` to repair it"
        ) from None
    except STREAM_ERRORS as e:  # truncated or corrupt compressed stream, unreadable file
        raise AzllmError(
            f"{path}: cannot read after line {lineno} ({describe_error(e)}); "
            "fetch or copy the file again"
        ) from None
    if too_long:
        print(
            f"azllm: warning: {path}: skipped {len(too_long)} line(s) longer than "
            f"{readers.MAX_RECORD_CHARS:,} characters (line {too_long[0]})",
            file=sys.stderr,
        )


def _txt_documents(path: Path, max_chars: int = DOC_CHARS) -> Iterator[str]:
    with closing(_read_lines(path)) as lines:  # closed now, not whenever it is collected
        yield from text_blocks(lines, max_chars)


def jsonl_records(lines: Iterable[str], path: Path | str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON Lines file; a line that is
    not JSON is an AzllmError naming file:line. The one JSONL reader of user files (corpus text,
    chat data, task files), each of which then checks its own fields."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise AzllmError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); one object per line"
            ) from None


def _jsonl_documents(path: Path) -> Iterator[str]:
    with closing(_read_lines(path)) as lines:
        for lineno, record in jsonl_records(lines, path):
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise AzllmError(f'{path}:{lineno}: expected an object with a string field "text"')
            if text.strip():
                yield text


def text_files(inputs: list[str | Path]) -> list[Path]:
    """Text and JSON Lines files named directly and found below named folders (TEXT_SUFFIXES
    only there), in a stable order. A text file that cannot be opened is an error."""
    if not inputs:
        raise AzllmError("no input files given")
    found, skipped = expand_inputs(list(inputs))
    named = {Path(i).resolve() for i in inputs if not Path(i).is_dir()}
    files: list[Path] = []
    for inp in found:
        if inp.path in named:
            if inp.fmt not in ("text", "jsonl"):
                raise AzllmError(
                    f"{inp.path}: {inp.fmt} input; turn it into a corpus folder first with "
                    "`azllm corpus build`"
                )
        elif not (inp.path.name.endswith(TEXT_SUFFIXES) and inp.fmt in ("text", "jsonl")):
            continue
        files.append(inp.path)
    for source, reason in skipped:
        if source.endswith(TEXT_SUFFIXES):  # one of ours, but unreadable
            raise AzllmError(f"{source}: cannot read ({reason})")
    if not files:
        folders = ", ".join(str(i) for i in inputs if Path(i).is_dir())
        raise AzllmError(f"{folders}: folder has no text files ({', '.join(TEXT_SUFFIXES)})")
    return files


def split_hint(path: Path) -> str | None:
    """'train'/'val' for the two files of an `azllm corpus build` folder, else None."""
    if path.name in ("train.jsonl.zst", "val.jsonl.zst") and (path.parent / "report.json").exists():
        return path.name.split(".")[0]
    return None


def iter_documents(path: Path) -> Iterator[str]:
    """The documents of one file (see the module docstring for formats)."""
    if _format(path)[0] == "jsonl":
        yield from _jsonl_documents(path)
    else:
        yield from _txt_documents(path)


def iter_all_documents(inputs: list[str | Path], *, train_only: bool = False) -> Iterator[str]:
    """All documents of all inputs; train_only skips the val file of a built corpus folder."""
    for path in text_files(inputs):
        if not (train_only and split_hint(path) == "val"):
            yield from iter_documents(path)
