"""A plain `kill` (SIGTERM) of a command that writes files leaves no temporary files behind
(issue 11): the commands that start no worker processes turn SIGTERM into an exception, and the
atomic writers remove their temporaries on the way out."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import SAMPLE

TEXT = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt")))


def hidden(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*"))


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"ended before the signal: {proc.communicate()}"
        assert time.monotonic() < end, "the temporary never appeared"
        time.sleep(0.02)


def test_sigterm_during_tokenize_removes_its_temporary_folder(tmp_path, tokenizer_path):
    src = tmp_path / "big.txt"
    src.write_text(TEXT * 200, encoding="utf-8")  # ~20 MB: tens of seconds on one thread
    out = tmp_path / "shards"
    proc = subprocess.Popen(
        [sys.executable, "-m", "azllm.cli", "tokenize", "--tokenizer", str(tokenizer_path),
         "--input", str(src), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    wait_for(lambda: any(p.name.startswith(".shards.") for p in tmp_path.iterdir()), proc)
    time.sleep(0.5)  # into the encoding loop, shard files open
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "azllm: interrupted" in err and "Traceback" not in err, err
    assert hidden(tmp_path) == [] and not out.exists()
