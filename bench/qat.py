"""Quantization-aware training vs post-training quantization, measured through llama.cpp.

    python bench/qat.py --data ../shared/data/az/pretrain \
        --heldout ../shared/data/az/pretrain/flores200_sib200_azj_Latn.txt [--json qat.json]

1. A byte-level BPE and token shards from the training files (the held-out file left out).
2. A base run of the given shape, --steps steps (`azllm train`).
3. Two continuations of the base run's weights, --extra steps each, with identical settings
   (`azllm.qat.qat`: lr a tenth of the base's, cosine to 0): `qat` with Q4_0 fake quantization on,
   `control` with it off. The control makes the comparison fair: both got the same extra training.
4. Every arm exported with `azllm export gguf` and scored by llama.cpp (`azllm eval --gguf`):
   held-out bits per byte of the control at f32, the control at Q4_0 (PTQ) and the QAT run at
   Q4_0 (its default export type), plus the base run at f32/Q4_0 for reference.

Figure of merit (issue 17): the share of the PTQ gap that QAT closes,
(bpb PTQ - bpb QAT) / (bpb PTQ - bpb f32); target >= 0.5.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from azllm.config import Config, ModelConfig, TrainConfig
from azllm.documents import iter_all_documents
from azllm.export.gguf import export_gguf, gguf_eval
from azllm.qat import qat
from azllm.shards import tokenize_to_shards
from azllm.tokenizer import AzTokenizer, train_tokenizer
from azllm.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/az/pretrain")
    ap.add_argument("--heldout", default="../shared/data/az/pretrain/flores200_sib200_azj_Latn.txt")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--untied", action="store_true", help="untied output layer (Q4_0 embedding)")
    ap.add_argument("--steps", type=int, default=600, help="base run steps")
    ap.add_argument("--extra", type=int, default=150, help="steps of each continuation")
    ap.add_argument("--lr-fraction", type=float, default=0.1, help="continuation lr / base lr")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="azllm-qat-bench-"))
    heldout = Path(args.heldout).resolve()
    files = sorted(p for p in Path(args.data).iterdir() if p.is_file() and p.resolve() != heldout)

    t0 = time.time()
    data = work / "data"
    if not (data / "meta.json").exists():
        tok = AzTokenizer(train_tokenizer(iter_all_documents(files), args.vocab))
        tokenize_to_shards(tok, files, data, val_fraction=0.02, progress=False, force=True)
    model = ModelConfig(
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block_size,
        tie_embeddings=not args.untied,
    )
    tc = TrainConfig(
        micro_batch=args.batch,
        grad_accum=1,
        max_steps=args.steps,
        warmup_steps=min(100, args.steps // 10),
        lr=3e-3,
        eval_interval=args.steps,
        eval_batches=4,
        log_interval=50,
        ckpt_interval=args.steps,
        keep_last=1,
        precision="fp32",
        device="cpu",
        seed=1234,
    )
    base = work / "base"
    if not (base / "model.safetensors").exists():
        train(Config(model=model, train=tc), data, base, progress=False)
    t_base = time.time() - t0
    over = {
        "train.lr": args.lr_fraction * tc.lr,
        "train.eval_interval": args.extra,
        "train.ckpt_interval": args.extra,
    }
    times = {}
    for arm, kind in (("qat", "q4_0"), ("control", "")):
        out = work / arm
        t = time.time()
        if not (out / "model.safetensors").exists():
            qat(base, data, out, kind, steps=args.extra, overrides=over, progress=False)
        times[arm] = time.time() - t

    rows = {}
    for name, run, kind in (
        ("base f32", base, "f32"),
        ("base PTQ q4_0", base, "q4_0"),
        ("control f32", work / "control", "f32"),
        ("control PTQ q4_0", work / "control", "q4_0"),
        ("QAT q4_0", work / "qat", None),  # None: the run's trained type
    ):
        path = work / f"{name.replace(' ', '_')}.gguf"
        export_gguf(run, path, kind, force=True)
        rows[name] = gguf_eval(path, heldout, threads=args.threads)["bpb"]
    f32, ptq, q = rows["control f32"], rows["control PTQ q4_0"], rows["QAT q4_0"]
    closed = (ptq - q) / (ptq - f32) if ptq != f32 else float("nan")
    print("| arm | held-out bpb (llama.cpp) | vs f32 |\n|---|---|---|")
    for name, bpb in rows.items():
        ref = rows["base f32"] if name.startswith("base") else f32
        print(f"| {name} | {bpb:.4f} | {100 * (bpb / ref - 1):+.2f}% |")
    print(
        f"\nPTQ gap {ptq - f32:+.4f} bpb; QAT gap {q - f32:+.4f} bpb; QAT closes "
        f"{100 * closed:.0f}% of the PTQ gap (target >= 50%)\n"
        f"base {args.steps} steps in {t_base:.0f} s; {args.extra} extra steps: "
        f"qat {times['qat']:.0f} s, control {times['control']:.0f} s; work dir {work}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "bpb": rows, "closed": closed, "times": times}, indent=2
            )
        )


if __name__ == "__main__":
    main()
