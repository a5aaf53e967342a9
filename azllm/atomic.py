"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything azllm leaves on disk (tokenizers, shards, checkpoints, metrics, corpora) goes through
here, so a crash or Ctrl-C never leaves a half-written file where a good one is expected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success rename it to `path`.

    On an exception the temporary folder is removed and `path` is left as it was.
    With replace=True an existing `path` is swapped out only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        move_dir_into_place(tmp, path, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_dir_into_place(tmp: Path, path: Path, *, replace: bool = True) -> None:
    """Rename the finished folder `tmp` to `path`. An existing `path` (replace=True) is first
    renamed aside, so there is never a moment with neither the old nor the new one whole."""
    if path.exists() and replace:
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
