"""llama vs gpt2 at equal parameter count, equal data and equal wall time: held-out bits per byte.

    python bench/train_quality.py --minutes 2 --data ../shared/data/az/pretrain
    python bench/train_quality.py --minutes 10 --data DIR --json quality.json

1. trains a byte-level BPE tokenizer on --data and writes train/val token shards (5% of the
   documents held out by hash, as `azllm tokenize` does) into a temporary folder (or --work);
2. builds the gpt2 model (LayerNorm, GELU MLP 4x wide, learned positions) and a llama model of
   the same shape whose SwiGLU ffn_hidden is chosen so both have the same parameter count;
3. times a few training steps of each, interleaved so both see the same machine load, and turns
   --minutes into a step count per architecture (the faster one gets more steps);
4. trains each with azllm.train.train (same seed, so the same batches in the same order, with
   warmup + cosine over its own step count) and evaluates the final weights on every token of
   the held-out split: bpb = total NLL in bits / UTF-8 bytes of the held-out documents.

The issue's target: llama at least 10% lower bpb than gpt2 at 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from azllm.checkpoint import load_run
from azllm.config import Config, config_from_dict
from azllm.device import resolve_device, resolve_precision
from azllm.documents import iter_all_documents
from azllm.evaluate import nll_of_ids
from azllm.model import GPT
from azllm.optim import lr_at, make_optimizer
from azllm.shards import TokenBatches, tokenize_to_shards
from azllm.step import TrainStep
from azllm.tokenizer import AzTokenizer, train_tokenizer
from azllm.train import train


def make_configs(args, vocab_size: int) -> dict[str, Config]:
    """gpt2 with its 4x MLP, and llama with the ffn_hidden that matches gpt2's parameter count."""
    model = dict(
        vocab_size=vocab_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    train_cfg = dict(
        micro_batch=args.micro_batch,
        grad_accum=1,
        lr=args.lr,
        precision=args.precision,
        seed=args.seed,
        device=args.device,
    )
    gpt2 = config_from_dict({"model": {**model, "arch": "gpt2"}, "train": dict(train_cfg)})
    target = GPT(gpt2.model).num_params()
    # Each unit of llama's ffn_hidden adds 3 weights (gate, up, down) per layer and channel.
    llama = config_from_dict({"model": {**model, "arch": "llama"}, "train": dict(train_cfg)})
    base = GPT(llama.model).num_params()
    per_unit = 3 * args.n_layer * args.n_embd
    ffn = llama.model.ffn_hidden + round((target - base) / per_unit / 32) * 32
    llama.model.ffn_hidden = max(32, ffn)  # a multiple of 32 keeps matmuls aligned
    return {"llama": llama, "gpt2": gpt2}


def seconds_per_step(cfgs: dict[str, Config], data: TokenBatches, steps: int) -> dict:
    """Wall time of `steps` training steps per arch, the archs taking turns step by step so that
    a neighbour's load on a shared machine falls on both alike. The step is train.py's own."""
    steppers = {}
    for arch, cfg in cfgs.items():
        device = resolve_device(cfg.train.device)
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model).to(device).train()
        tc = cfg.train
        steppers[arch] = TrainStep(
            model,
            make_optimizer(model, tc, device),
            micro_batch=tc.micro_batch,
            grad_accum=1,
            grad_clip=tc.grad_clip,
            device=device,
            precision=resolve_precision(tc.precision, device),
        )
    times: dict[str, list[float]] = {arch: [] for arch in cfgs}
    for step in range(1, steps + 2):  # step 1 is warm-up, not timed
        for arch, train_step in steppers.items():
            tc = cfgs[arch].train
            t0 = time.perf_counter()
            batch = data.batch("train", step, tc.micro_batch).to(train_step.device)
            loss, _ = train_step(batch, lr_at(step, tc))
            loss.item()  # waits for the device
            if step > 1:
                times[arch].append(time.perf_counter() - t0)
    return times


def heldout_bpb(
    run_dir: Path, data_dir: Path, meta: dict, device: torch.device, precision: str, max_tokens: int
) -> dict:
    """bpb of the final weights over the val shards, each document predicted after an EOS."""
    model, _, _ = load_run(run_dir, device)
    val = [
        np.fromfile(data_dir / s["file"], dtype=np.dtype(meta["dtype"]))
        for s in meta["splits"]["val"]["shards"]
    ]
    ids = [meta["eos_id"]] + np.concatenate(val).astype(np.int64).tolist()
    n_bytes = meta["splits"]["val"]["bytes"]
    if max_tokens and len(ids) > max_tokens + 1:  # a prefix: scale its bytes by its share
        n_bytes = n_bytes * max_tokens / (len(ids) - 1)
        ids = ids[: max_tokens + 1]
    nll, n = nll_of_ids(model, ids, batch_size=16, precision=precision)
    return {"bpb": nll / math.log(2) / n_bytes, "loss": nll / n, "tokens": n, "bytes": n_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=2.0, help="training wall time per arch")
    p.add_argument("--data", required=True, help="folder or files of Azerbaijani text")
    p.add_argument("--work", default=None, help="keep tokenizer, shards and runs here")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (| fp16 on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--calib-steps", type=int, default=8, help="timed steps per arch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--eval-tokens", type=int, default=0, help="cap held-out tokens (0: all)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="azllm-quality-")
        work = Path(tmp.name)
    t_all = time.perf_counter()
    try:
        print(f"[1/4] tokenizer ({args.vocab_size} tokens) and shards from {args.data}", flush=True)
        tok = AzTokenizer(train_tokenizer(iter_all_documents([args.data]), args.vocab_size))
        data_dir = work / "data"
        meta = tokenize_to_shards(
            tok, [args.data], data_dir, val_fraction=0.05, force=True, progress=False
        )
        tr, va = meta["splits"]["train"], meta["splits"]["val"]
        print(
            f"      train {tr['tokens']:,} tokens ({tr['bytes']:,} bytes), held out "
            f"{va['tokens']:,} tokens ({va['bytes']:,} bytes, {va['documents']} documents)"
        )

        cfgs = make_configs(args, tok.vocab_size)
        params = {a: GPT(c.model).num_params() for a, c in cfgs.items()}
        for arch, c in cfgs.items():
            m = c.model
            print(
                f"      {arch:<5} {params[arch]:>10,} params (n_layer {m.n_layer}, n_embd "
                f"{m.n_embd}, n_head {m.n_head}, ffn_hidden {m.ffn_hidden}, ctx {m.block_size})"
            )
        diff = params["llama"] / params["gpt2"] - 1
        print(f"      llama/gpt2 parameters: {diff:+.2%}")

        print(f"[2/4] timing {args.calib_steps} steps of each (taking turns)", flush=True)
        data = TokenBatches(data_dir, args.block_size, args.seed)
        times = seconds_per_step(cfgs, data, args.calib_steps)
        budget = args.minutes * 60
        steps = {}
        for arch, t in times.items():
            step_s = statistics.median(t)
            steps[arch] = max(10, int(budget / step_s))
            print(
                f"      {arch:<5} {step_s:.3f} s/step -> {steps[arch]} steps in "
                f"{args.minutes:g} min ({steps[arch] * args.micro_batch * args.block_size:,}"
                " tokens)"
            )

        results = {}
        for i, (arch, c) in enumerate(cfgs.items()):
            print(f"[{3 + i}/4] training {arch} for {steps[arch]} steps", flush=True)
            tc = c.train
            tc.max_steps = steps[arch]
            tc.warmup_steps = max(5, steps[arch] // 20)
            tc.eval_interval = tc.ckpt_interval = steps[arch]  # evaluate/save once, at the end
            tc.eval_batches, tc.log_interval, tc.keep_last = 8, 10, 1
            run_dir = work / f"run-{arch}"
            t0 = time.perf_counter()
            last = train(c, data_dir, run_dir, progress=sys.stderr.isatty())
            wall = time.perf_counter() - t0
            device = resolve_device(tc.device)
            ev = heldout_bpb(
                run_dir,
                data_dir,
                meta,
                device,
                resolve_precision(tc.precision, device),
                args.eval_tokens,
            )
            results[arch] = {
                "params": params[arch],
                "steps": steps[arch],
                "train_wall_s": wall,
                "tokens": steps[arch] * args.micro_batch * args.block_size,
                "tok_per_s": last.get("tok_per_s"),
                "train_loss": last.get("loss"),
                "val_bpb_sampled": last.get("val_bpb"),
                "heldout": ev,
                "ffn_hidden": c.model.ffn_hidden,
            }
            print(
                f"      {arch}: {wall:.0f} s, final train loss {last.get('loss', float('nan')):.3f}"
                f", held-out {ev['bpb']:.4f} bpb (loss {ev['loss']:.3f} over {ev['tokens']:,}"
                " tokens)",
                flush=True,
            )

        ratio = results["llama"]["heldout"]["bpb"] / results["gpt2"]["heldout"]["bpb"]
        print()
        print(
            f"{'arch':<6} {'params':>10} {'steps':>6} {'tokens':>10} {'train s':>8} "
            f"{'tok/s':>7} {'train loss':>10} {'val bpb*':>8} {'held-out bpb':>12}"
        )
        for arch, r in results.items():
            print(
                f"{arch:<6} {r['params']:>10,} {r['steps']:>6} {r['tokens']:>10,} "
                f"{r['train_wall_s']:>8.0f} {r['tok_per_s'] or 0:>7,.0f} {r['train_loss']:>10.3f} "
                f"{r['val_bpb_sampled'] or float('nan'):>8.4f} {r['heldout']['bpb']:>12.4f}"
            )
        print(
            "(train s: the whole azllm.train.train call, start-up and final eval/checkpoint "
            "included; tok/s: over its last 10 steps; val bpb*: train()'s estimate from "
            f"{8 * args.micro_batch} random held-out windows; held-out bpb: every held-out token)"
        )
        side = "lower" if ratio <= 1 else "higher"
        print(
            f"bpb ratio llama/gpt2 = {ratio:.4f}: llama's held-out bpb is "
            f"{100 * abs(1 - ratio):.1f}% {side} than gpt2's (target: >= 10% lower at 10 "
            f"minutes); total {time.perf_counter() - t_all:.0f} s"
        )
        if args.json:
            doc = {
                "args": vars(args),
                "tokens": {"train": tr["tokens"], "val": va["tokens"]},
                "results": results,
                "bpb_ratio_llama_over_gpt2": ratio,
            }
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
