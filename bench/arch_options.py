"""Held-out bits per byte of each recipe option, and an lr sweep across widths, at equal steps.

    python bench/arch_options.py --data ../shared/data/az/pretrain --steps 300 --json out.json
    python bench/arch_options.py --data DIR --only lr      # just the width/lr sweep
    python bench/arch_options.py --data DIR --only schedule --precision bf16  # warmup, batch
    python bench/arch_options.py --data DIR --only recipe --precision bf16  # around the defaults

`--only schedule` runs the recipe of `baby` and up (Muon + QK-norm) at three widths and varies
one of warmup, the lr floor, Muon's lr and the batch (at equal tokens: a smaller batch takes
more steps): does the best value move with the width? (issue 13, item 3). `--only recipe` starts
from the recipe as shipped (derived lr and warmup) and moves one of its other settings.

Every arm is a real `azllm.train.train` run of the same small llama (4 layers, 4 heads, context
128, fp32, one seed: the same batches in the same order) that differs from the baseline in one
setting; the figure is its validation bits per byte after the last step (the 5% of documents
held out by `tokenize_to_shards`, `--eval-batches` batches). Equal steps, not equal time: the
machine this ran on was shared, and the options cost about the same per step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from azllm.config import config_from_dict, derived_lr
from azllm.documents import iter_all_documents
from azllm.shards import tokenize_to_shards
from azllm.tokenizer import AzTokenizer, train_tokenizer
from azllm.train import train

OPTIONS = {  # arm -> (model overrides, train overrides)
    "adamw (baseline)": ({}, {}),
    "muon": ({}, {"optimizer": "muon"}),
    "qk_norm": ({"qk_norm": True}, {}),
    "logit_softcap=15": ({"logit_softcap": 15.0}, {}),
    "z_loss=1e-4": ({}, {"z_loss": 1e-4}),
    "untied head": ({"tie_embeddings": False}, {}),
    "muon + qk_norm": ({"qk_norm": True}, {"optimizer": "muon"}),
}


def prepare(data: Path, work: Path, vocab: int) -> Path:
    out = work / "shards"
    if (out / "meta.json").exists():
        return out
    files = sorted(p for p in data.rglob("*") if p.is_file())
    tok = AzTokenizer(train_tokenizer(iter_all_documents(files), vocab))
    tokenize_to_shards(tok, files, out, val_fraction=0.05, progress=False, force=True)
    return out


def run_arm(shards: Path, work: Path, name: str, model: dict, tr: dict, args) -> dict:
    cfg = config_from_dict(
        {
            "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, **model},
            "train": {
                **dict(
                    micro_batch=16, grad_accum=1, max_steps=args.steps,
                    warmup_steps=args.steps // 10, eval_batches=args.eval_batches, keep_last=1,
                    precision=args.precision, device="cpu", seed=args.seed,
                ),
                **tr,
            },
        }
    )  # fmt: skip
    steps = cfg.train.max_steps  # one evaluation, log and checkpoint: at the end
    cfg.train.eval_batches = args.eval_batches * 16 // cfg.train.micro_batch  # the same tokens
    cfg.train.eval_interval = cfg.train.log_interval = cfg.train.ckpt_interval = steps
    t0 = time.perf_counter()
    safe = "".join(c if c.isalnum() else "_" for c in name)
    last = train(cfg, shards, work / f"run-{safe}-{args.seed}", progress=False)
    row = {"arm": name, "val_bpb": last["val_bpb"], "seconds": time.perf_counter() - t0,
           "lr": cfg.train.lr, "n_embd": cfg.model.n_embd, "seed": args.seed,
           "steps": cfg.train.max_steps, "warmup": cfg.train.warmup_steps}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def schedule_sweep(shards: Path, work: Path, args) -> list[dict]:
    """The recipe (Muon + QK-norm, warmup 10% of the steps) at each width, and one change at a
    time; AdamW (no QK-norm: `tiny`'s recipe) for its warmup. Batch arms keep the tokens: batch
    8 runs twice the steps of 16, warmup 10% of its steps."""
    rows, n = [], args.steps
    muon, adamw = {"optimizer": "muon"}, {"optimizer": "adamw"}

    def batch(b: int) -> dict:
        return {"micro_batch": b, "max_steps": n * 16 // b, "warmup_steps": n * 16 // b // 10}

    arms = {
        "base": muon,
        "warmup 0": {**muon, "warmup_steps": 0},
        "warmup 30%": {**muon, "warmup_steps": n * 3 // 10},
        "floor 0": {**muon, "min_lr_ratio": 0.0},
        "muon_lr x2": {**muon, "muon_lr": 0.04},
        **{f"batch {b}": {**muon, **batch(b)} for b in (4, 8, 32)},
        "adamw": adamw,
        "adamw warmup 0": {**adamw, "warmup_steps": 0},
        "adamw warmup 30%": {**adamw, "warmup_steps": n * 3 // 10},
    }
    for width in (int(w) for w in args.widths.split(",")):
        for arm, tr in arms.items():
            name = f"w{width} {arm}"
            model = {"n_embd": width, "n_head": 4, "qk_norm": tr["optimizer"] == "muon"}
            if not args.arms or name in args.arms:
                rows.append(run_arm(shards, work, name, model, tr, args))
    return rows


def recipe_sweep(shards: Path, work: Path, args) -> list[dict]:
    """The recipe as the presets ship it (Muon + QK-norm, derived lr and warmup) at each width,
    and one of its other settings moved: AdamW's lr (under Muon: the embeddings, tied head and
    gains) around the derived one, as multiples of the AdamW-only rule (what Muon runs derived
    before) and absolute; Muon's lr and momentum; the lr floor."""
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        m = config_from_dict({"model": {"n_embd": width}}).model
        lr, adamw_rule = derived_lr(m, "muon"), derived_lr(m, "adamw")
        arms = {
            "recipe": {},
            "lr x0.5": {"lr": lr / 2},
            "lr x2": {"lr": lr * 2},
            **{f"adamw rule x{k}": {"lr": adamw_rule * k} for k in (0.5, 1, 3, 10, 30)},
            "lr 0.1": {"lr": 0.1},
            "lr 0.2": {"lr": 0.2},
            "muon_lr 0.01": {"muon_lr": 0.01},
            "muon_lr 0.03": {"muon_lr": 0.03},
            "momentum 0.9": {"muon_momentum": 0.9},
            "floor 0.3": {"min_lr_ratio": 0.3},
        }
        for arm, tr in arms.items():
            name = f"w{width} {arm}"
            model = {"n_embd": width, "n_head": 4, "qk_norm": True}
            if not args.arms or name in args.arms:
                tr = {"optimizer": "muon", "warmup_steps": -1, **tr}
                rows.append(run_arm(shards, work, name, model, tr, args))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="keep shards/runs here (default: a temp folder)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-batches", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--widths", default="64,128,256", help="--only schedule: the widths")
    ap.add_argument("--only", choices=("options", "lr", "schedule", "recipe"), default=None)
    ap.add_argument("--arms", nargs="*", help="run only these arms (names as printed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="azllm-options-"))
    shards = prepare(args.data, work, args.vocab)
    rows = []
    if args.only in (None, "options"):
        for name, (model, tr) in OPTIONS.items():
            if not args.arms or name in args.arms:
                rows.append(run_arm(shards, work, name, model, tr, args))
    if args.only in (None, "lr"):
        # Around the width-aware default: does the best multiplier stay at 1 as width changes?
        for width, heads in ((64, 4), (128, 4), (256, 4)):
            base = derived_lr(config_from_dict({"model": {"n_embd": width}}).model, "adamw")
            for mult in (0.5, 1.0, 2.0):
                model, name = {"n_embd": width, "n_head": heads}, f"w{width} lr x{mult}"
                if not args.arms or name in args.arms:
                    rows.append(run_arm(shards, work, name, model, {"lr": base * mult}, args))
    if args.only == "schedule":
        rows += schedule_sweep(shards, work, args)
    if args.only == "recipe":
        rows += recipe_sweep(shards, work, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
