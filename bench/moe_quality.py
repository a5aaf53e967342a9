"""Dense vs mixture of experts at the same *active* parameters, on this CPU.

    python bench/moe_quality.py --data ../shared/data/az/pretrain --steps 200 --json out.json

Three real `azllm.train.train` runs of a small llama (4 layers, 4 heads, 128 wide, context 128,
fp32, one seed: the same batches in the same order):
- dense: the SwiGLU MLP, ffn_hidden F (--ffn, 384);
- moe: --experts experts of width F / k, k = --top-k per token: each token goes through the same
  F hidden units as in the dense model (plus a router of 128 x E per layer), the model holds
  E / k times the MLP parameters;
- dense, equal time: the dense model again, for as long as the MoE run trained (train.max_minutes),
  so the comparison is also made at equal wall time on this machine.

Figures per run: held-out bits per byte (the 5% of documents `tokenize_to_shards` holds out,
--eval-batches batches), training tokens/s (evaluation excluded), total and active parameters,
and for the MoE the fraction of token-slots each expert got on held-out text, per layer, with the
load-balancing loss (k = uniform, E = collapsed). A figure, not a pass/fail.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from arch_options import prepare  # the same BPE + shards as the recipe options bench

from azllm.checkpoint import load_run
from azllm.config import config_from_dict
from azllm.moe import load_balance_loss
from azllm.shards import TokenBatches
from azllm.train import train


def run_arm(shards: Path, work: Path, name: str, model: dict, tr: dict, args) -> dict:
    cfg = config_from_dict(
        {
            "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, **model},
            "train": {**dict(
                micro_batch=16, grad_accum=1, max_steps=args.steps, warmup_steps=args.steps // 10,
                eval_interval=args.steps, eval_batches=args.eval_batches,
                log_interval=args.steps, ckpt_interval=args.steps, keep_last=1,
                precision="fp32", device="cpu", seed=args.seed), **tr},
        }
    )  # fmt: skip
    run = work / f"run-{name.replace(' ', '_').replace(',', '')}"
    t0 = time.perf_counter()
    last = train(cfg, shards, run, progress=False)
    m, _, cfg = load_run(run)
    row = {
        "arm": name,
        "val_bpb": last["val_bpb"],
        "steps": last["step"],
        "tokens": last["tokens"],
        "tok_per_s": last["tok_per_s"],  # over the whole run: log_interval = steps
        "seconds": time.perf_counter() - t0,
        "params": m.num_params(),
        "active_params": m.num_active_params(),
    }  # fmt: skip
    if cfg.model.n_experts:
        row.update(expert_load(m, shards, cfg, args.eval_batches))
    print(json.dumps(row), flush=True)
    return row


def expert_load(model, shards: Path, cfg, batches: int) -> dict:
    """Per layer: the fraction of held-out token-slots each expert got, and the balance loss."""
    E = cfg.model.n_experts
    counts = [torch.zeros(E) for _ in model.blocks]
    losses = [[] for _ in model.blocks]

    def hook(i):
        def f(_m, _inp, out):
            counts[i] += torch.bincount(out[1].experts.flatten(), minlength=E).float()
            losses[i].append(load_balance_loss(out[1], E).item())

        return f

    hooks = [b.mlp.register_forward_hook(hook(i)) for i, b in enumerate(model.blocks)]
    data = TokenBatches(shards, cfg.model.block_size, cfg.train.seed)
    model.eval()
    with torch.no_grad():
        for i in range(batches):
            model(data.batch("val", i, cfg.train.micro_batch).inputs)
    for h in hooks:
        h.remove()
    return {
        "expert_load": [[round(x, 3) for x in (c / c.sum()).tolist()] for c in counts],
        "balance_loss": [round(sum(v) / len(v), 3) for v in losses],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--work", type=Path, help="keep shards/runs here (default: a temp folder)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--ffn", type=int, default=384, help="dense MLP width = k x expert width")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--equal-time-only", type=float, metavar="SECONDS",
                    help="run only the equal-time dense arm, for this many seconds")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="azllm-moe-"))
    shards = prepare(args.data, work, args.vocab)
    moe = {"n_experts": args.experts, "experts_per_token": args.top_k,
           "expert_ffn_hidden": args.ffn // args.top_k}  # fmt: skip
    rows = []
    if args.equal_time_only is None:
        rows.append(run_arm(shards, work, "dense", {"ffn_hidden": args.ffn}, {}, args))
        rows.append(run_arm(shards, work, f"moe {args.experts}x top-{args.top_k}", moe, {}, args))
    # the MoE run's wall time, evaluation included
    minutes = (args.equal_time_only or rows[-1]["seconds"]) / 60
    rows.append(
        run_arm(shards, work, "dense equal time", {"ffn_hidden": args.ffn},
                {"max_steps": 100 * args.steps, "max_minutes": minutes}, args)
    )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
