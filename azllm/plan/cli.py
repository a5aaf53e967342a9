"""`azllm plan`: print the plan for a config and a budget, optionally checked by a real step.

azllm plan --config az-100m --vram 4GB                 # what to pass to azllm train
azllm plan --config baby --vram 2GB --device cpu       # RAM of a CPU run
azllm plan --config baby --vram 2GB --device cpu --measure   # and check it: one real step
"""

from __future__ import annotations

import dataclasses
import json

from azllm.config import (
    OPTIMIZERS,
    PRECISIONS,
    STRATEGIES,
    Config,
    apply_overrides,
    load_config,
)
from azllm.errors import AzllmError
from azllm.memory import fmt_bytes
from azllm.plan.planner import HEADROOM, make_plan, parse_vram, plan_table
from azllm.plan.profiler import measure_peak


def cmd_plan(args) -> int:
    from azllm.plan import lora_plan

    if args.open_models:  # which open models fit this budget, fully or with (Q)LoRA
        rank = args.lora_rank or 16
        rows = lora_plan.fit_table(parse_vram(args.vram), headroom=HEADROOM, rank=rank)
        print(lora_plan.fit_table_text(rows, args.vram, rank))
        return 0
    if not args.config:
        raise AzllmError("--config: give a preset, a TOML file or an open model (--open-models)")
    if args.config in lora_plan.OPEN_MODELS:
        cfg = Config(model=dataclasses.replace(lora_plan.OPEN_MODELS[args.config]))
    else:
        cfg = load_config(args.config)
    overrides = {
        "model.block_size": args.context,
        "model.vocab_size": args.vocab_size,
        "train.optimizer": args.optimizer,
    }
    cfg = apply_overrides(cfg, overrides)
    plan = make_plan(
        cfg, parse_vram(args.vram), target_global_batch=args.global_batch,
        precision=args.precision, device_type=args.device, world=args.world,
        strategy=args.strategy,
    )  # fmt: skip
    if args.lora_rank or args.qlora:  # fine-tuning with adapters instead
        text, fits = lora_plan.lora_plan_text(
            cfg, parse_vram(args.vram), rank=args.lora_rank or 16, qlora=bool(args.qlora),
            headroom=HEADROOM, device_type=args.device,
        )  # fmt: skip
        print(text)
        if not fits:
            raise AzllmError(f"{args.config} with adapters does not fit in {args.vram}")
        return 0
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=2))
    else:
        print(plan_table(plan))
    if args.measure:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise AzllmError("--measure: no CUDA GPU here to measure on; use --device cpu")
        got = measure_peak(
            cfg, plan.micro_batch, precision=plan.precision,
            activation_checkpointing=plan.activation_checkpointing, device=args.device,
            optimizer_state=plan.optimizer_state, chunked_ce=plan.chunked_ce,
            grad_accum=min(plan.grad_accum, 2),
        )  # fmt: skip
        est = plan.breakdown["allocated"]
        print(
            f"measured: allocated peak {fmt_bytes(got['allocated'])} (estimate "
            f"{fmt_bytes(est)}, ratio {est / got['allocated']:.3f})"
            + (f"; device used {fmt_bytes(got['device_used'])}" if "device_used" in got else "")
        )
    if not plan.fits:
        raise AzllmError(
            f"{args.config} at context {plan.context} does not fit in {args.vram}: the smallest "
            f"budget that fits is {fmt_bytes(plan.min_vram_bytes)} (micro-batch 1, every saver)"
        )
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="memory needed to train a config, and the settings that fit a budget"
    )
    p.add_argument("--config", help="preset (tiny ... az-1b), TOML, or an open model's name")
    p.add_argument("--vram", required=True, help="memory budget: 4GB, 3.5GiB, 4096MB")
    p.add_argument("--context", type=int, help="tokens per sequence (default: the config's)")
    p.add_argument("--vocab-size", type=int, help="the tokenizer's (default: the config's)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--world", type=int, default=1, help="processes (GPUs) under torchrun")
    p.add_argument("--strategy", default="ddp", choices=STRATEGIES)
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, help="muon keeps one state per block matrix, not two"
    )
    p.add_argument("--lora-rank", type=int, help="plan LoRA fine-tuning at this rank instead")
    p.add_argument("--qlora", action="store_true", help="plan QLoRA (4-bit base, CUDA)")
    p.add_argument(
        "--open-models", action="store_true", help="which open models fit --vram, and how"
    )
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.add_argument(
        "--measure", action="store_true", help="also run two training steps here and compare"
    )
    p.set_defaults(func=cmd_plan)
