"""`azllm quickstart`: the whole chain on the bundled corpus, on a CPU, in minutes.

tokenizer -> shards -> baby model trained for a time budget -> samples and val bits-per-byte.
It calls the same functions as the individual commands, so it doubles as their smoke test.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from importlib import resources
from pathlib import Path

import torch

from azllm.atomic import atomic_write_text
from azllm.checkpoint import load_run
from azllm.config import apply_overrides, load_config
from azllm.device import autocast, resolve_device, resolve_precision
from azllm.documents import iter_all_documents
from azllm.errors import AzllmError
from azllm.generate import generate
from azllm.metrics import read_metrics
from azllm.model import GPT
from azllm.shards import TokenBatches, tokenize_to_shards
from azllm.tokenizer import AzTokenizer, tokenizer_stats, train_tokenizer
from azllm.train import train

MARKER = "quickstart.json"
PROMPTS = ["Azərbaycan", "Bakı şəhəri", "Bir gün kiçik bir uşaq"]


def sample_corpus() -> Path:
    return Path(str(resources.files("azllm") / "data" / "sample"))


def seconds_per_step(cfg, data_dir: Path) -> float:
    """Time two optimizer steps of a throwaway model, to turn minutes into a step count."""
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    model = GPT(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = TokenBatches(data_dir, cfg.model.block_size, seed=0)
    times = []
    for step in range(3):
        t0 = time.perf_counter()
        batch = data.global_batch("train", step, cfg.train.micro_batch * cfg.train.grad_accum)
        for micro in range(cfg.train.grad_accum):
            mb = batch[micro * cfg.train.micro_batch : (micro + 1) * cfg.train.micro_batch]
            with autocast(device, precision):
                _, loss = model(mb[:, :-1], mb[:, 1:])
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return min(times[1:])  # the first step pays for warm-up


def quickstart(
    out: Path, *, minutes: float = 5.0, force: bool = False, vocab_size: int = 4096
) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists() and not force:
            raise AzllmError(
                f"{out}: not empty and not an earlier quickstart; pass --force or "
                "choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.perf_counter()
    corpus = sample_corpus()

    print(f"[1/4] tokenizer: byte-level BPE, {vocab_size} tokens, on {corpus}")
    tok = AzTokenizer(train_tokenizer(iter_all_documents([corpus]), vocab_size))
    tok.save(out / "tokenizer.json")

    print("[2/4] shards: encoding the corpus, 10% of documents held out")
    meta = tokenize_to_shards(tok, [corpus], out / "data", val_fraction=0.1, progress=False)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    stats = tokenizer_stats(tok, iter_all_documents([corpus]))
    print(
        f"      train {tr['tokens']:,} tokens, val {va['tokens']:,} tokens; fertility "
        f"{stats['fertility']:.2f} tokens/word, {stats['bytes_per_token']:.2f} bytes/token"
    )

    cfg = load_config("baby")
    # The bundled corpus is small (~15k tokens): a few minutes are many epochs, so dropout keeps
    # the model from memorising it and the samples come from the best validation checkpoint.
    cfg = apply_overrides(
        cfg,
        {
            "model.vocab_size": tok.vocab_size,
            "model.dropout": 0.1,
            "train.micro_batch": 16,
            "train.grad_accum": 1,
            "train.lr": 2e-3,
        },
    )
    per_step = seconds_per_step(cfg, out / "data")
    # Leave ~15% of the budget for evaluation, checkpoints and the plot.
    steps = max(20, int(minutes * 60 * 0.85 / per_step))
    cfg = apply_overrides(
        cfg,
        {
            "train.max_steps": steps,
            "train.warmup_steps": max(5, steps // 20),
            "train.eval_interval": max(10, steps // 8),
            "train.eval_batches": 4,
            "train.log_interval": max(1, steps // 100),
            "train.ckpt_interval": max(10, steps // 4),
        },
    )
    print(
        f"[3/4] training a {cfg.model.n_layer}-layer baby model for {steps} steps "
        f"(~{per_step:.2f} s/step, budget {minutes:g} min)"
    )
    last = train(cfg, out / "data", out / "run")

    print("[4/4] samples from the best checkpoint (temperature 0.8, top-k 40):")
    model, tok, _ = load_run(out / "run", weights="best")
    outs = generate(
        model,
        [[tok.bos_id] + tok.encode(p) for p in PROMPTS],
        max_new_tokens=60,
        temperature=0.8,
        top_k=40,
        seed=0,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    for p, o in zip(PROMPTS, outs, strict=True):
        print(f"  » {p}{tok.decode(o)}")
    best = min(
        (r for r in read_metrics(out / "run") if "val_loss" in r), key=lambda r: r["val_loss"]
    )
    summary = {
        "steps": last["step"],
        "train_loss": last["loss"],
        "val_loss": best["val_loss"],
        "val_bpb": best["val_bpb"],
        "best_step": best["step"],
        "minutes": (time.perf_counter() - t_start) / 60,
        "run": str(out / "run"),
        "plot": str(out / "run" / "loss.png"),
    }
    atomic_write_text(out / MARKER, json.dumps(summary, indent=2))
    first = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])
    print(
        f"\nloss {first['loss']:.3f} -> {last['loss']:.3f} (uniform guess: "
        f"{math.log(tok.vocab_size):.3f}); best val {summary['val_bpb']:.3f} bits per byte "
        f"(step {best['step']})"
    )
    print(f"plot: {summary['plot']}   total {summary['minutes']:.1f} min")
    print(f"next: azllm generate --run {out / 'run'} --prompt 'Azərbaycan'")
    return summary
