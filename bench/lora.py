"""Full SFT vs LoRA (vs QLoRA where CUDA and bitsandbytes are here) on one small Llama.

    python bench/lora.py --chat ../shared/data/az/chat [--steps 60] [--json lora.json]

1. A byte-level BPE on the bundled corpus and a random-init Llama run of the given shape (the
   bench compares ways of fine-tuning, so the same base for all; no pretraining).
2. `azllm sft` (azllm.chat.sft) on the chat files, the same steps, batch and seed for each arm:
   full (every weight, lr --full-lr), LoRA on q,k,v,o,gate,up,down (base frozen, lr --lora-lr),
   QLoRA (4-bit NF4 base; CUDA + bitsandbytes only, else reported as skipped).
3. Per arm: trainable parameters, peak memory of one training step (plan.measure_peak: the CPU
   allocator's peak through the profiler, or torch.cuda.max_memory_allocated), and the held-out
   chat loss after the last step (the SFT run's own validation split).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def base_run(root: Path, args) -> Path:
    from azllm.checkpoint import save_weights
    from azllm.config import Config, ModelConfig
    from azllm.documents import iter_all_documents
    from azllm.model import GPT
    from azllm.tokenizer import AzTokenizer, train_tokenizer

    run = root / "base"
    run.mkdir(parents=True)
    tok = AzTokenizer(train_tokenizer(iter_all_documents([REPO / "azllm/data/sample"]), 2048))
    cfg = Config(
        model=ModelConfig(
            vocab_size=tok.vocab_size, block_size=256, n_layer=args.layers, n_head=4,
            n_kv_head=2, n_embd=args.width,
        )
    )  # fmt: skip
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    save_weights(GPT(cfg.model), run / "model.safetensors")
    return run


def arm(name: str, base: Path, root: Path, args, device: str) -> dict:
    from azllm.chat.sft import sft
    from azllm.config import load_run_config
    from azllm.plan import measure_peak

    lora = name != "full"
    over = {
        "train.max_steps": args.steps, "train.micro_batch": 8, "train.seed": 1,
        "train.lr": args.lora_lr if lora else args.full_lr, "train.eval_interval": args.steps,
        "train.eval_batches": 8, "train.ckpt_interval": args.steps, "train.device": device,
        "train.precision": "bf16" if device == "cuda" else "fp32", "train.compile": "off",
    }  # fmt: skip
    if lora:
        over.update({"train.lora_rank": args.rank, "train.lora_alpha": 2.0 * args.rank})
        over["train.qlora"] = name == "qlora"
    t0 = time.perf_counter()
    last = sft(base, [args.chat], root / name, overrides=over, progress=False)
    minutes = (time.perf_counter() - t0) / 60
    cfg = load_run_config(root / name)
    targets = cfg.train.lora_targets.split(",")
    prec = cfg.train.precision
    spec = None
    if lora:
        spec = dict(rank=args.rank, alpha=2.0 * args.rank, targets=targets, qlora=name == "qlora")
        spec["base_dtype"] = torch.bfloat16 if prec == "bf16" else None
    peak = measure_peak(
        cfg, 8, precision=prec, activation_checkpointing=False, device=device, steps=1, lora=spec
    )["allocated"]
    model_params = _trainable(cfg, spec)
    return {
        "arm": name,
        "trainable": model_params,
        "peak_mib": peak / 2**20,
        "val_loss": last["val_loss"],
        "minutes": minutes,
    }


def _trainable(cfg, spec) -> int:
    from azllm.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model)
    if spec is None:
        return model.num_params()
    from azllm.plan.lora_plan import lora_params

    return lora_params(cfg.model, spec["rank"], spec["targets"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chat", default=str(REPO.parent / "shared/data/az/chat"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--full-lr", type=float, default=3e-4)  # SFT's default
    ap.add_argument("--lora-lr", type=float, default=2e-3)  # LoRA's usual ~10x
    ap.add_argument("--json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes  # noqa: F401

        qlora = device == "cuda"
    except ImportError:
        qlora = False
    rows = []
    with tempfile.TemporaryDirectory(prefix="azllm-lora-bench-") as tmp:
        root = Path(tmp)
        base = base_run(root, args)
        for name in ("full", "lora", "qlora"):
            if name == "qlora" and not qlora:
                print("qlora: skipped (needs CUDA and bitsandbytes)")
                continue
            rows.append(arm(name, base, root, args, device))
            r = rows[-1]
            print(
                f"{r['arm']:6} trainable {r['trainable']:>10,}  peak {r['peak_mib']:7.1f} MiB  "
                f"held-out chat loss {r['val_loss']:.4f}  ({r['minutes']:.1f} min)",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
