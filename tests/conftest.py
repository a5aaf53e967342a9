"""Shared fixtures: a small tokenizer and shard folder built once from the bundled corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = REPO / "azllm" / "data" / "sample"

# Tests must not fight over the two cores: one intra-op thread per process, set for subprocesses
# too, so results are deterministic and DDP workers do not oversubscribe.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Under CI=true nothing may skip: a missing browser, extra or ../shared file is a broken CI
# machine, not a reason to pass with less tested. Locally a missing optional piece still skips.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_unless_ci(reason: str) -> None:
    """pytest.skip(reason) on a developer's machine, pytest.fail(reason) under CI=true."""
    if IN_CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        skip_unless_ci(f"{p} not present (../shared is only beside the repo in dev and CI)")
    return p


def shared_files(folder: str, pattern: str) -> list[Path]:
    """Files of ../shared/FOLDER matching PATTERN, for tests that widen their inputs with real
    text; [] without ../shared locally, a failure under CI (an input set silently smaller)."""
    base = SHARED / folder
    if not base.is_dir():
        if IN_CI:
            pytest.fail(f"CI=true: {base} not present", pytrace=False)
        return []
    return sorted(base.glob(pattern))


def _ci_forbids_skip(report) -> None:
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI=true: skipped ({reason}); a CI machine must have what this needs"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """skip/skipif/importorskip in a test or fixture: a failure under CI."""
    outcome = yield
    _ci_forbids_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module-level importorskip (a missing extra) skips a whole file: a failure under CI."""
    outcome = yield
    _ci_forbids_skip(outcome.get_result())


def run_cli(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 600,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `python -m azllm.cli ARGS` as a real process."""
    proc = subprocess.run(
        [sys.executable, "-m", "azllm.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"azllm {' '.join(map(str, args))} failed ({proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


def mark_logged_steps(run, upto):
    """Tag the metrics rows of steps 1..upto as the interrupted process left them. A resume that
    continues after `upto` keeps them untouched; one that retrains from step 0 (deterministic, so
    its losses are the same) rewrites them untagged: the tag tells the two apart."""
    path = run / "metrics.jsonl"
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill: left for the resume to drop
            lines.append(line)
            continue
        if rec.get("step", 0) <= upto:
            rec["before_resume"] = True
        lines.append(json.dumps(rec))
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


def kill_after_checkpoint(argv, run, step: int, *, timeout: float = 300) -> int:
    """Run `python -m azllm.cli *argv` (writing to `run`), SIGKILL it once its checkpoint for
    `step` exists, and return the step of the newest checkpoint it left (the kill may land
    after a later one). A command that ends before it can be killed fails the test."""
    import signal
    import time

    from azllm.checkpoint import checkpoint_dirs

    proc = subprocess.Popen(
        [sys.executable, "-m", "azllm.cli", *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    try:
        while not (Path(run) / "checkpoints" / f"step-{step}").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.time() < deadline, f"no checkpoint step-{step} after {timeout:.0f} s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return int(checkpoint_dirs(Path(run))[-1].name.split("-")[1])


def assert_resumed_after(run, upto, max_steps):
    """Steps 1..upto were not rerun by the resume, the rest ran once each, by the resume."""
    from azllm.metrics import read_metrics

    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))
    assert [r["step"] for r in rows if r.get("before_resume")] == list(range(1, upto + 1))


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    from azllm.documents import iter_all_documents
    from azllm.tokenizer import AzTokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    AzTokenizer(train_tokenizer(iter_all_documents([SAMPLE]), 512)).save(path)
    return path


@pytest.fixture(scope="session")
def tok(tokenizer_path):
    from azllm.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tok) -> Path:
    from azllm.shards import tokenize_to_shards

    out = tmp_path_factory.mktemp("data") / "shards"
    tokenize_to_shards(tok, [SAMPLE], out, val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir) -> Path:
    """A pretrained `tiny` run (context 128) on the bundled corpus."""
    from azllm.config import apply_overrides, load_config
    from azllm.train import train

    run = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = apply_overrides(
        load_config("tiny"),
        {
            "model.block_size": 128,
            "train.precision": "fp32",
            "train.max_steps": 60,
            "train.eval_interval": 60,
            "train.ckpt_interval": 60,
        },
    )
    train(cfg, data_dir, run, progress=False)
    return run
