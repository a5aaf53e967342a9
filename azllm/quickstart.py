"""`azllm quickstart`: the whole chain on the bundled corpus, on a CPU, in minutes.

tokenizer -> shards -> a small model trained until the announced time is up -> samples and val
bits-per-byte. It calls the same functions as the individual commands, so it doubles as their
smoke test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from importlib import resources
from pathlib import Path

from azllm.atomic import atomic_write_text
from azllm.checkpoint import load_run
from azllm.config import apply_overrides, load_config
from azllm.documents import iter_all_documents
from azllm.errors import AzllmError
from azllm.generate import SamplingSettings, generate
from azllm.metrics import read_metrics
from azllm.shards import tokenize_to_shards
from azllm.tokenizer import AzTokenizer, tokenizer_stats, train_tokenizer
from azllm.train import train

MARKER = "quickstart.json"
PROMPTS = ["Azərbaycan", "Bakı şəhəri", "Bir gün kiçik bir uşaq"]
DEFAULT_MINUTES = 4.0
VOCAB_SIZE = 4096

# Sized to the ~1.7 MB bundled corpus (~440k training tokens) and a 2-core CPU: a 4-layer,
# 256-wide model takes ~3x fewer FLOPs per token than `baby`, so the few minutes buy more steps.
# Measured with this setting: validation loss still fell at every evaluation to step 480 (2M
# tokens, 4.5 passes over the corpus; 7.22 at step 40, 5.63 = 2.33 bits per byte at 480), more
# steps than 4 minutes on 2 cores give; on the 80 KB of ../sample alone it rose after step 60.
# The rest is `baby`'s recipe (Muon + QK-norm since issue 13): 185 steps on one busy core reached
# val loss 5.47 (2.25 bpb), still falling, below AdamW's 5.68 after 440 steps on a quiet machine.
# AdamW's lr (embeddings and gains under Muon) is the derived one (0.014 at this width): at this
# shape (4 x 256) it beat 4e-3, near the 3e-3 set here before, by 2.1% at equal steps
# (bench/README.md, "The AdamW lr under Muon").
MODEL = {
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.n_embd": 256,
    "model.block_size": 128,
    "model.dropout": 0.1,
}
TRAIN = {
    "train.micro_batch": 32,
    "train.grad_accum": 1,
    "train.warmup_steps": 20,
    "train.max_steps": 1_000_000,  # the clock ends the run (train.max_minutes), not a count
    "train.eval_interval": 25,
    "train.eval_batches": 4,  # the same 4 batches each time: paired, so rises show
    "train.log_interval": 5,
    "train.ckpt_interval": 1_000_000,  # only the final checkpoint: saving costs seconds
}
# Kept back from the budget for what follows the last training step (its evaluation and
# checkpoint, loading the best weights, sampling): 10 s, or a fifth of a short budget. On 2 busy
# cores the default model's last step and evaluation took ~10 s and the run ended up to ~20 s
# late; it never ends early.
RESERVE_S = 10.0
RESERVE_FRACTION = 0.2
# The final validation loss may sit this far above the best before we call it overfitting
# (evaluation noise on the 4 validation batches is a fraction of this).
OVERFIT_MARGIN = 0.01


def sample_corpus() -> list[Path]:
    """The bundled corpus: the project's own text and the public texts beside it."""
    data = resources.files("azllm") / "data"
    return [Path(str(data / "sample")), Path(str(data / "sample_public"))]


def one_thread_if_busy() -> str | None:
    """On a CPU already busier than it has cores, train on one thread; returns a line saying so.

    Two threads that each wait for the other at every operation lose whenever the scheduler
    takes one away: on 2 cores at load 8-16, a training step took ~10x longer with 2 threads than
    with 1. An explicit OMP_NUM_THREADS is left alone.
    """
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores < 2 or load < cores or "OMP_NUM_THREADS" in os.environ:
        return None
    import torch

    torch.set_num_threads(1)
    return f"      the CPU is busy (load {load:.1f} on {cores} cores): training on one thread"


def overfit_note(final_val: float, best_val: float, best_step: int) -> str | None:
    """A line telling the user the run overfitted, or None when the final val loss is near best."""
    if final_val <= best_val * (1 + OVERFIT_MARGIN):
        return None
    return (
        f"note: the model overfitted: validation loss rose from {best_val:.3f} (step {best_step}) "
        f"to {final_val:.3f} at the end, so it memorised the training text; the samples come from "
        "the best checkpoint. Give it more text, a smaller model or a shorter run."
    )


def quickstart(
    out: Path,
    *,
    minutes: float = DEFAULT_MINUTES,
    force: bool = False,
    vocab_size: int = VOCAB_SIZE,
    corpus: list[Path] | None = None,
    overrides: dict | None = None,
) -> dict:
    """Run the chain in about `minutes` of wall time, tokenizer to samples.

    `corpus` (default: the bundled one) and `overrides` (config key -> value, replacing the sized
    defaults above) are for experiments and tests, e.g. a tiny model on a tiny text to overfit.
    """
    if not minutes > 0:
        raise AzllmError(f"--minutes must be a positive number, got {minutes}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists() and not force:
            raise AzllmError(
                f"{out}: not empty and not an earlier quickstart; pass --force or "
                "choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    corpus = [Path(c) for c in corpus] if corpus else sample_corpus()

    print(f"[1/4] tokenizer: byte-level BPE, {vocab_size} tokens, on {', '.join(map(str, corpus))}")
    tok = AzTokenizer(train_tokenizer(iter_all_documents(corpus), vocab_size))
    tok.save(out / "tokenizer.json")

    print("[2/4] shards: encoding the corpus, 10% of documents held out")
    meta = tokenize_to_shards(tok, corpus, out / "data", val_fraction=0.1, progress=False)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    stats = tokenizer_stats(tok, iter_all_documents(corpus))
    print(
        f"      train {tr['tokens']:,} tokens, val {va['tokens']:,} tokens; fertility "
        f"{stats['fertility']:.2f} tokens/word, {stats['bytes_per_token']:.2f} bytes/token"
    )

    # The clock, not a step count, ends training: what is left of the budget after the
    # tokenizer, less what the samples and the last evaluation need.
    reserve = min(RESERVE_S, RESERVE_FRACTION * minutes * 60)
    left_s = minutes * 60 - (time.perf_counter() - t_start) - reserve
    train_minutes = max(left_s, 0.1 * minutes * 60) / 60
    cfg = apply_overrides(
        load_config("baby"),
        {"model.vocab_size": tok.vocab_size, **MODEL, **TRAIN, **(overrides or {})},
    )
    cfg.train.max_minutes = train_minutes
    m = cfg.model
    print(
        f"[3/4] training a {m.n_layer}-layer, {m.n_embd}-wide model (context {m.block_size}) "
        f"for {train_minutes * 60:.0f} s of the {minutes:g} min budget"
    )
    busy = one_thread_if_busy()
    if busy:
        print(busy)
    last = train(cfg, out / "data", out / "run")

    print("[4/4] samples from the best checkpoint (temperature 0.5, top-k 50, 60 tokens):")
    model, tok, _ = load_run(out / "run", weights="best")
    # A few minutes' model is unsure of most words: at temperature 0.5 its samples are mostly
    # real words (at the default 0.8 about half are made up; compared on the same run).
    sampling = SamplingSettings().override(temperature=0.5, max_new_tokens=60, seed=0)
    outs = generate(
        model,
        [[tok.bos_id] + tok.encode(p) for p in PROMPTS],
        sampling,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    for p, o in zip(PROMPTS, outs, strict=True):
        print(f"  » {p}{tok.decode(o)}")

    records = read_metrics(out / "run")
    vals = [r for r in records if "val_loss" in r]
    best = min(vals, key=lambda r: r["val_loss"])
    note = overfit_note(vals[-1]["val_loss"], best["val_loss"], best["step"])
    summary = {
        "steps": last["step"],
        "train_loss": last["loss"],
        "final_val_loss": vals[-1]["val_loss"],
        "val_loss": best["val_loss"],
        "val_bpb": best["val_bpb"],
        "best_step": best["step"],
        "overfit": note is not None,
        "train_minutes": train_minutes,
        "minutes": (time.perf_counter() - t_start) / 60,
        "budget_minutes": minutes,
        "run": str(out / "run"),
        "plot": str(out / "run" / "loss.png"),
    }
    atomic_write_text(out / MARKER, json.dumps(summary, indent=2))
    first = next(r for r in records if "loss" in r)
    print(
        f"\nloss {first['loss']:.3f} -> {last['loss']:.3f} (uniform guess: "
        f"{math.log(tok.vocab_size):.3f}); val loss {vals[-1]['val_loss']:.3f} at the end, "
        f"best {best['val_loss']:.3f} = {best['val_bpb']:.3f} bits per byte (step {best['step']})"
    )
    if note:
        print(note)
    print(
        f"plot: {summary['plot']}   total {summary['minutes']:.1f} min "
        f"(budget {minutes:g} min, {last['step']} steps)"
    )
    print(f"next: azllm generate --run {out / 'run'} --prompt 'Azərbaycan'")
    return summary
