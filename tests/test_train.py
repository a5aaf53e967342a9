import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, assert_resumed_after, kill_after_checkpoint, mark_logged_steps, run_cli

from azllm.checkpoint import checkpoint_dirs, load_run
from azllm.metrics import read_metrics

TINY = ["--config", "tiny", "--precision", "fp32", "--log-interval", "1"]


def _losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def _untagged(rows):
    return [{k: v for k, v in r.items() if k != "before_resume"} for r in rows]


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
    killed_at = kill_after_checkpoint(["train", *args, "--out", run], run, 30)
    assert killed_at < 150
    mark_logged_steps(run, killed_at)
    run_cli("train", *args, "--out", run, "--resume")
    assert_resumed_after(run, killed_at, 150)  # continued after the checkpoint, not from 0
    # the whole loss curve, bit for bit, including steps redone after the kill
    assert _losses(run) == _losses(ref)
    assert _untagged(r for r in read_metrics(run) if "val_loss" in r) == [
        r for r in read_metrics(ref) if "val_loss" in r
    ]


def test_two_process_ddp_matches_one_process_and_resumes_across_world_sizes(tmp_path, data_dir):
    import shutil

    common = [*TINY, "--data", data_dir, "--max-steps", "8", "--eval-interval", "4",
              "--ckpt-interval", "4", "--keep-last", "2"]  # fmt: skip
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
    # As if killed after step 4: the two-process checkpoint resumes on ONE process...
    shutil.rmtree(two / "checkpoints" / "step-8")
    mark_logged_steps(two, 4)
    run_cli("train", *common, "--out", two, "--micro-batch", "4", "--grad-accum", "2", "--resume")
    assert_resumed_after(two, 4, 8)
    assert [x for _, x in _losses(two)] == pytest.approx([x for _, x in a], rel=1e-4)
    # ...and a one-process checkpoint resumes on TWO.
    shutil.rmtree(one / "checkpoints" / "step-8")
    mark_logged_steps(one, 4)
    _torchrun(*common, "--out", one, "--micro-batch", "2", "--grad-accum", "2", "--resume")
    assert_resumed_after(one, 4, 8)
    assert [x for _, x in _losses(one)] == pytest.approx([x for _, x in b], rel=1e-4)


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
    mark_logged_steps(fsdp, 4)
    run_cli("train", *common, "--out", fsdp, "--micro-batch", "4", "--grad-accum", "2", "--resume")
    assert_resumed_after(fsdp, 4, 8)
    assert [x for _, x in _losses(fsdp)] == pytest.approx([x for _, x in a], rel=1e-4)
    # ...and a one-process checkpoint resumes sharded over TWO.
    shutil.rmtree(one / "checkpoints" / "step-8")
    mark_logged_steps(one, 4)
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
    assert_resumed_after(one, 4, 8)
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


def _checkpoint_as_dict(ckpt, tmp_path):
    """A DCP checkpoint folder read with torch's own converter (not azllm's loader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=True)


def test_resume_restores_optimizer_and_rng_state(tmp_path, data_dir):
    """Resuming from an intact checkpoint equals the uninterrupted run bit for bit; resuming
    from copies whose RNG state or optimizer moments were tampered with does not. So the bitwise
    match is evidence those states are restored, not a coincidence. Dropout makes the RNG
    matter (without it no step draws a random number)."""
    import shutil

    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

    args = [*TINY, "--data", data_dir, "--max-steps", "12", "--ckpt-interval", "6",
            "--eval-interval", "6", "--set", "model.dropout=0.1"]  # fmt: skip
    ref = tmp_path / "ref"
    run_cli("train", *args, "--out", ref)

    def interrupted(name):  # as if killed after the step-6 checkpoint
        run = tmp_path / name
        shutil.copytree(ref, run)
        shutil.rmtree(run / "checkpoints" / "step-12")
        mark_logged_steps(run, 6)
        return run

    intact = interrupted("intact")
    run_cli("train", *args, "--out", intact, "--resume")
    assert_resumed_after(intact, 6, 12)
    assert _losses(intact) == _losses(ref)

    rng = interrupted("rng")
    trainer_pt = rng / "checkpoints" / "step-6" / "trainer.pt"
    trainer = torch.load(trainer_pt, weights_only=True)
    trainer["rng_cpu"] = torch.Generator().manual_seed(12345).get_state()
    torch.save(trainer, trainer_pt)

    moments = interrupted("moments")
    ckpt = moments / "checkpoints" / "step-6"
    state = _checkpoint_as_dict(ckpt, tmp_path)
    for s in state["optimizer"]["state"].values():  # what a fresh optimizer would hold
        s["exp_avg"].zero_()
        s["exp_avg_sq"].zero_()
    for f in ckpt.glob("*.distcp"):
        f.unlink()
    torch.save(state, tmp_path / "moments.pt")
    torch_save_to_dcp(tmp_path / "moments.pt", ckpt)

    for tampered in (rng, moments):
        run_cli("train", *args, "--out", tampered, "--resume")
        assert_resumed_after(tampered, 6, 12)
        # step 7's loss comes from step 6's weights; the optimizer's moments first show at step 8
        after = [loss for step, loss in _losses(tampered) if step > 7]
        expected = [loss for step, loss in _losses(ref) if step > 7]
        assert all(a != b for a, b in zip(after, expected, strict=True)), tampered.name


def test_checkpoint_restores_the_grad_scaler(tmp_path):
    """fp16's loss scale survives save/load (CPU training never enables the scaler, so the
    end-to-end resume tests cannot see it)."""
    from azllm.checkpoint import load_checkpoint, save_checkpoint
    from azllm.config import ModelConfig
    from azllm.model import GPT

    cfg = ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    saved = {"scale": 96.0, "growth_factor": 3.0, "backoff_factor": 0.25,
             "growth_interval": 7, "_growth_tracker": 2}  # fmt: skip
    scaler.load_state_dict(saved)
    ckpt = save_checkpoint(tmp_path, 5, model, opt, scaler, 1.5, keep_last=1)
    fresh = torch.amp.GradScaler("cpu")
    assert fresh.state_dict() != saved
    other = GPT(cfg)
    state = load_checkpoint(ckpt, other, torch.optim.AdamW(other.parameters()), fresh)
    assert fresh.state_dict() == saved
    assert state == {"step": 5, "best_val_loss": 1.5}


def test_best_weights_are_the_lowest_validation_step_and_load_with_weights_best(tmp_path, data_dir):
    from safetensors.torch import load_file

    from azllm.config import ModelConfig
    from azllm.evaluate import evaluate_text
    from azllm.model import GPT
    from azllm.tokenizer import load_tokenizer

    # The learning rate climbs all run long to a value that wrecks the model: the validation
    # loss is lowest early (measured: 8.1 at step 4, 14.2 at step 24), so best != latest.
    run = tmp_path / "run"
    run_cli("train", *TINY, "--data", data_dir, "--out", run, "--max-steps", "24",
            "--warmup-steps", "24", "--lr", "2.0", "--eval-interval", "4",
            "--ckpt-interval", "4", "--keep-last", "10", "--log-interval", "4")  # fmt: skip
    vals = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    best_step = min(vals, key=vals.get)
    assert best_step != 24, vals
    weights = {
        step: _checkpoint_as_dict(run / "checkpoints" / f"step-{step}", tmp_path)["model"]
        for step in (best_step, 24)
    }
    best = load_file(run / "best.safetensors")
    assert best.keys() <= weights[best_step].keys()
    assert all(torch.equal(best[k], weights[best_step][k]) for k in best)
    assert not all(torch.equal(best[k], weights[24][k]) for k in best)

    # `azllm eval --weights best|model` scores exactly those weights
    text = tmp_path / "t.txt"
    text.write_text("Azərbaycan Respublikası Cənubi Qafqazda yerləşir. " * 20, encoding="utf-8")
    tok = load_tokenizer(run / "tokenizer.json")
    cfg = json.loads((run / "config.json").read_text())["model"]
    for which, step in (("best", best_step), ("model", 24)):
        out = run_cli("eval", "--run", run, "--text", text, "--weights", which, "--json").stdout
        model = GPT(ModelConfig(**cfg))
        model.load_state_dict(weights[step], strict=False)  # a tied head is not stored
        expected = evaluate_text(model.eval(), tok, text.read_text(encoding="utf-8"))
        assert json.loads(out.splitlines()[-1])["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_resume_refuses_a_different_model_config(tmp_path, data_dir):
    run = tmp_path / "run"
    common = [*TINY, "--data", data_dir, "--out", run, "--eval-interval", "4"]
    run_cli("train", *common, "--max-steps", "4", "--ckpt-interval", "4")
    before = (run / "config.json").read_text()
    for change in (["--set", "model.n_layer=3"], ["--arch", "gpt2"], ["--block-size", "32"]):
        proc = run_cli("train", *common, "--max-steps", "8", "--resume", *change, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "config.json" in proc.stderr and "differs" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert (run / "config.json").read_text() == before
    assert [p.name for p in checkpoint_dirs(run)] == ["step-4"]
