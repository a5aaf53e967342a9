"""Atomic writes: a file or folder appears whole under its final name, or not at all.

Everything azllm leaves on disk (tokenizers, shards, checkpoints, metrics, corpora, exports)
goes through here, so a crash or Ctrl-C never leaves a half-written file where a good one is
expected.

Temporary names are `.NAME.PID[.xxx].tmp` beside NAME: hidden (input readers skip dot files, so
`tokenizer stats --text DIR` never reads a half-written corpus), removed on every exit Python
sees (exceptions, Ctrl-C, SIGTERM inside `terminate_raises`), and, for a process killed outright
(SIGKILL, power loss), removed by the next write of the same NAME once that PID is gone.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from azllm.errors import AzllmError


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale(path: Path) -> None:
    """Remove temporaries of `path` left by azllm processes that no longer run."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)(?:\.[\w.-]+)?\.tmp")
    try:
        siblings = list(path.parent.iterdir())
    except OSError:  # no folder yet, or unreadable: nothing of ours there
        return
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m and not _pid_alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def temp_path(path: Path, tag: str = "") -> Iterator[Path]:
    """`.NAME.PID[.tag].tmp` beside `path` for the caller to write and rename; whatever is
    left under that name is removed on the way out (success or not)."""
    path = Path(path)
    sweep_stale(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{'.' + tag if tag else ''}.tmp")
    try:
        yield tmp
    finally:
        _remove(tmp)


# torch's zip writer (torch.save, DCP) reports a short write as RuntimeError, without errno
_TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def short_write(e: BaseException) -> bool:
    """torch's RuntimeError for a write the filesystem cut short (a full disk, a size limit)."""
    return any(k in str(e) for k in _TORCH_SHORT_WRITE)


def write_error(path: Path, e: BaseException, what: str = "--out") -> AzllmError:
    """A one-line user error for a failed write: a full disk, a read-only place, a file where
    a folder should be."""
    text = str(e)
    reason = getattr(e, "strerror", None) or (text.splitlines() or [type(e).__name__])[0][:160]
    code = getattr(e, "errno", None)
    if m := re.search(r"os error (\d+)", text):  # safetensors' (Rust) I/O error
        code = int(m.group(1))
        reason = os.strerror(code)
    if short_write(e):
        reason = "the write was cut short: the disk is full or a file-size limit was reached"
    # numpy's short write ("... requested and ... written"), safetensors' StorageFull
    if code == errno.ENOSPC or any(
        k in text for k in ("requested and", "StorageFull", "No space left")
    ):
        reason = "no space left on the device"
    blocker = next((q for q in Path(path).parents if q.exists() or q.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        reason = f"{blocker} is a file, not a folder"
    return AzllmError(f"{what} {path}: cannot write there ({reason}); choose another place")


@contextmanager
def writing(path: Path, what: str = "--out", errors: tuple = ()) -> Iterator[None]:
    """Turn OSError (and `errors`, e.g. SafetensorError) inside the block into write_error."""
    try:
        yield
    except (OSError, *errors) as e:
        raise write_error(path, e, what) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
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
    sweep_stale(path)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    )
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that `finally` blocks remove temporary files."""


@contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated (like Ctrl-C raises KeyboardInterrupt).
    Only for code that forks no workers: a handler that raises can fire inside an at-fork hook,
    where Python drops the exception (corpus/pipeline.py sets a flag instead)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
