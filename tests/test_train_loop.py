"""The training loop's bookkeeping: what it reports, when it evaluates, what it leaves behind.

Timing is checked with a fake clock that moves only when the test says (1 s per training step,
50 s per evaluation batch and per checkpoint), so the figures are exact, not measured.
"""

from __future__ import annotations

import types

import pytest
import torch

import azllm.train as train_mod
from azllm.batch import Batch
from azllm.chat.data import ChatBatches
from azllm.config import apply_overrides, load_config
from azllm.metrics import read_metrics
from azllm.model import GPT


def tiny_cfg(**train):
    over = {
        "train.precision": "fp32",
        "train.compile": "off",
        **{f"train.{k}": v for k, v in train.items()},
    }
    return apply_overrides(load_config("tiny"), over)


@pytest.fixture
def fake_clock(monkeypatch):
    """azllm.train's clock: advances 1 s per training forward, 50 s per eval forward and per
    checkpoint, nothing otherwise."""
    now = [1000.0]
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    forward = GPT.forward

    def timed_forward(self, *a, **kw):
        now[0] += 1.0 if self.training else 50.0
        return forward(self, *a, **kw)

    monkeypatch.setattr(GPT, "forward", timed_forward)
    save = train_mod.save_checkpoint

    def slow_save(*a, **kw):
        now[0] += 50.0
        return save(*a, **kw)

    monkeypatch.setattr(train_mod, "save_checkpoint", slow_save)
    return now


def test_tokens_per_second_count_training_time_only(fake_clock, data_dir, tmp_path):
    # eval every 6 steps and a checkpoint every 5, logs every 4: before the fix the log after an
    # evaluation divided 4 steps by the time of 2 (too fast) and the one after a checkpoint
    # counted its 50 s (too slow).
    cfg = tiny_cfg(max_steps=16, log_interval=4, eval_interval=6, ckpt_interval=5, eval_batches=1)
    train_mod.train(cfg, data_dir, tmp_path / "run", progress=False)
    tokens_per_step = cfg.train.micro_batch * cfg.train.grad_accum * cfg.model.block_size
    logs = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in logs] == [4, 8, 12, 16]
    for r in logs:  # one training second per step, whatever else happened in between
        assert r["tok_per_s"] == pytest.approx(tokens_per_step), r
        # MFU is named for its denominator: the matmul peak measured here (no datasheet on CPU)
        assert "mfu" not in r and r["mfu_vs_measured_peak"] > 0
        assert "mfu_vs_datasheet_peak" not in r


def test_evaluating_more_often_than_logging(data_dir, tmp_path, capsys):
    # The first evaluation (step 2) comes before any train-loss log (step 5): it used to raise
    # KeyError on the missing train loss.
    cfg = tiny_cfg(max_steps=6, log_interval=5, eval_interval=2, eval_batches=1)
    train_mod.train(cfg, data_dir, tmp_path / "run", progress=True)
    vals = [r["step"] for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert vals == [2, 4, 6]
    assert "step 2: val loss" in capsys.readouterr().out


def test_compiler_fallback_setting_is_restored(monkeypatch, data_dir, tmp_path):
    # compile=auto sets dynamo's suppress_errors for the run (a compiler failure falls back to
    # eager); it must not leak into the rest of the process.
    monkeypatch.setattr(train_mod, "use_compile", lambda *a: True)
    monkeypatch.setattr(torch, "compile", lambda m: m)
    before = torch._dynamo.config.suppress_errors
    cfg = tiny_cfg(max_steps=2, compile="auto")
    train_mod.train(cfg, data_dir, tmp_path / "run", progress=False)
    assert torch._dynamo.config.suppress_errors == before


def test_a_time_budget_stops_the_run_and_ends_its_schedule(fake_clock, data_dir, tmp_path):
    # 1 fake second per step: a 0.25-minute budget (15 s) has run out when step 16 starts; that
    # step is the last, evaluated and checkpointed, and its learning rate is the end of the
    # cosine although max_steps is far away.
    cfg = tiny_cfg(max_steps=10_000, max_minutes=0.25, eval_interval=1000, ckpt_interval=1000)
    last = train_mod.train(cfg, data_dir, tmp_path / "run", progress=False)
    assert last["step"] == 16 and "val_loss" in last
    assert last["lr"] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-16"]


def test_chat_rows_are_dealt_in_epochs(tok, tokenizer_path):
    # Every conversation once per pass: drawing rows with replacement left ~5% of them unseen
    # after three "epochs".
    convs = [
        [{"role": "user", "content": f"Sual {i}"}, {"role": "assistant", "content": f"Cavab {i}"}]
        for i in range(23)
    ]
    data = ChatBatches(convs, tok, tokenizer_path, 64, seed=3, val_fraction=0.0, pack=False)
    n = len(data.rows["train"])
    seen = torch.cat([data.batch("train", k, 5).inputs for k in range(n * 3 // 5)])
    ids = [tuple(r.tolist()) for r in seen[: 3 * n - (3 * n) % 5]]
    counts = {row: ids.count(row) for row in set(ids)}
    first = [tuple(r.tolist()) for r in seen[:n]]
    assert len(set(first)) == n  # the first pass shows every row exactly once
    assert max(counts.values()) <= 3 and len(counts) == n
    # and the split between processes still takes the same rows
    whole = data.batch("train", 4, 6)
    assert isinstance(whole, Batch)
    assert torch.equal(data.batch("train", 4, 6, slice(3, 6)).inputs, whole.inputs[3:])
