"""Shared fixtures: a small tokenizer and shard folder built once from the bundled corpus."""

from __future__ import annotations

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


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (../shared is only beside the repo in dev and CI)")
    return p


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
