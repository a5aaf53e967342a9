import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli

from azllm.checkpoint import checkpoint_dirs, load_run
from azllm.metrics import read_metrics

TINY = ["--config", "tiny", "--precision", "fp32", "--log-interval", "1"]


def _losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def test_train_writes_a_self_contained_run(tmp_path, data_dir):
    run = tmp_path / "run"
    run_cli(
        "train",
        *TINY,
        "--data",
        data_dir,
        "--out",
        run,
        "--max-steps",
        "30",
        "--ckpt-interval",
        "10",
        "--keep-last",
        "2",
        "--eval-interval",
        "10",
    )
    for name in (
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "best.safetensors",
        "metrics.jsonl",
        "loss.png",
    ):
        assert (run / name).exists(), name
    assert [p.name for p in checkpoint_dirs(run)] == ["step-20", "step-30"]  # keep last 2
    ckpt = run / "checkpoints/step-30"
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert trainer["step"] == 30 and "rng_cpu" in trainer and trainer["world_size"] == 1
    assert (ckpt / ".metadata").exists() and [p.name for p in ckpt.glob("*.distcp")]
    assert not list((run / "checkpoints").glob(".*"))  # no temporary folder left behind
    losses = [loss for _, loss in _losses(run)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it learns
    vals = [r for r in read_metrics(run) if "val_loss" in r]
    assert [v["step"] for v in vals] == [10, 20, 30]
    assert all(v["val_bpb"] > 0 for v in vals)
    model, tok, cfg = load_run(run)
    assert cfg.model.vocab_size == tok.vocab_size == 512
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 30


def test_exact_resume_after_a_real_kill(tmp_path, data_dir):
    args = [
        *TINY,
        "--data",
        data_dir,
        "--max-steps",
        "150",
        "--ckpt-interval",
        "10",
        "--eval-interval",
        "50",
    ]
    ref = tmp_path / "ref"
    run_cli("train", *args, "--out", ref)

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "azllm.cli", "train", *map(str, args), "--out", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-30").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(checkpoint_dirs(run)[-1].name.split("-")[1])
    assert killed_at < 150
    run_cli("train", *args, "--out", run, "--resume")
    # the whole loss curve, bit for bit, including steps redone after the kill
    assert _losses(run) == _losses(ref)
    assert [r for r in read_metrics(run) if "val_loss" in r] == [
        r for r in read_metrics(ref) if "val_loss" in r
    ]


def test_two_process_ddp_matches_one_process(tmp_path, data_dir):
    common = [*TINY, "--data", data_dir, "--max-steps", "8", "--eval-interval", "4",
              "--ckpt-interval", "8"]  # fmt: skip
    one = tmp_path / "one"
    run_cli("train", *common, "--out", one, "--micro-batch", "4", "--grad-accum", "2")
    two = tmp_path / "two"
    _torchrun(*common, "--out", two, "--micro-batch", "2", "--grad-accum", "2")
    a, b = _losses(one), _losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x == pytest.approx(y, rel=1e-4)
    va = [r["val_loss"] for r in read_metrics(one) if "val_loss" in r]
    vb = [r["val_loss"] for r in read_metrics(two) if "val_loss" in r]
    assert va == pytest.approx(vb, rel=1e-4)


def _torchrun(*args, nproc=2):
    """`torchrun --standalone --nproc_per_node=N -m azllm.cli train ARGS`, one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "azllm.cli", "train", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fsdp_matches_one_process_and_checkpoints_reshard(tmp_path, data_dir):
    import shutil

    common = [*TINY, "--data", data_dir, "--max-steps", "8", "--eval-interval", "4",
              "--ckpt-interval", "4", "--keep-last", "2", "--chunked-ce", "50",
              "--optimizer-state", "bf16"]  # fmt: skip
    one = tmp_path / "one"
    run_cli("train", *common, "--out", one, "--micro-batch", "4", "--grad-accum", "2")
    fsdp = tmp_path / "fsdp"
    _torchrun(
        *common, "--out", fsdp, "--micro-batch", "2", "--grad-accum", "2", "--strategy", "fsdp"
    )
    a, b = _losses(one), _losses(fsdp)
    assert [s for s, _ in b] == list(range(1, 9))
    assert [x for _, x in a] == pytest.approx([y for _, y in b], rel=1e-4)
    # Sharded: each process wrote its own file, neither holds the whole state.
    shards = sorted((fsdp / "checkpoints" / "step-4").glob("*.distcp"))
    sizes = [p.stat().st_size for p in shards]
    assert len(shards) == 2 and max(sizes) < 0.75 * sum(sizes), sizes
    single = [p.stat().st_size for p in (one / "checkpoints" / "step-4").glob("*.distcp")]
    assert sum(sizes) < 1.15 * sum(single)  # together one copy (plus per-file overhead)
    # As if killed after step 4: drop the later checkpoint, resume on ONE process...
    shutil.rmtree(fsdp / "checkpoints" / "step-8")
    run_cli("train", *common, "--out", fsdp, "--micro-batch", "4", "--grad-accum", "2", "--resume")
    assert [x for _, x in _losses(fsdp)] == pytest.approx([x for _, x in a], rel=1e-4)
    # ...and a one-process checkpoint resumes sharded over TWO.
    shutil.rmtree(one / "checkpoints" / "step-8")
    _torchrun(
        *common,
        "--out",
        one,
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--strategy",
        "fsdp",
        "--resume",
    )
    assert [x for _, x in _losses(one)] == pytest.approx([x for _, x in b], rel=1e-4)


def test_compile_setting(tmp_path):
    from azllm.config import apply_overrides, load_config
    from azllm.errors import AzllmError
    from azllm.train import use_compile

    assert load_config("baby").train.compile == "auto"
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[train]\ncompile = true\n')
    assert load_config(str(toml)).train.compile == "on"  # older configs said true/false
    assert apply_overrides(load_config("tiny"), {"compile": False}).train.compile == "off"
    with pytest.raises(AzllmError, match="train.compile"):
        apply_overrides(load_config("tiny"), {"compile": "fast"}).train.validate()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_compile("auto", cpu, fsdp=False)
    assert use_compile("on", cpu, fsdp=False) and not use_compile("off", cuda, fsdp=False)
    assert not use_compile("auto", cuda, fsdp=True)
