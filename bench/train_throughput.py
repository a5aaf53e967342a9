"""Training throughput: tokens/s and MFU per preset and precision, on this machine.

    python bench/train_throughput.py                          # tiny, baby, small x fp32, bf16
    python bench/train_throughput.py --presets baby --steps 5 --precisions bf16
    python bench/train_throughput.py --presets az-100m --steps 2 --micro-batch 1   # slow on CPU
    python bench/train_throughput.py --json results.json      # also write the rows as JSON

Each (preset, precision) pair builds the preset's model and times a few optimizer steps of the
training step in azllm/train.py -- forward under autocast, backward (through the GradScaler,
a no-op unless fp16), unscale, gradient clipping, AdamW with azllm's decay groups, zero_grad --
with gradient accumulation 1, on random token ids (no data files needed). The first --warmup
steps are not timed (optimizer state allocation, kernel selection); the step time reported is the
median of the timed ones, so one step slowed by a neighbour on a shared machine does not count.

MFU = model FLOPs per step (GPT.flops_per_token x tokens) / step time / matmul peak, where the
peak is measured by azllm.device.measure_matmul_peak in the same precision right before each
config (so a neighbour's load that slows the steps slows the peak too). MFU thus answers "how
close is training to this machine's own matmul speed", not to a data sheet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from azllm.config import PRESETS, load_config
from azllm.device import autocast, measure_matmul_peak, resolve_device, sync
from azllm.model import GPT
from azllm.train import lr_at, make_optimizer

DEFAULT_PRESETS = "tiny,baby,small"  # az-100m on request: minutes per step on a 2-core CPU


def default_precisions(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    return ["fp32", "bf16"]


def time_steps(
    preset: str,
    precision: str,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    micro_batch: int | None,
    seed: int = 0,
) -> dict:
    """Build the preset's model and time `steps` training steps after `warmup` untimed ones."""
    cfg = load_config(preset)
    tc, mc = cfg.train, cfg.model
    if micro_batch:
        tc.micro_batch = micro_batch
    tc.grad_accum = 1
    torch.manual_seed(seed)
    model = GPT(mc).to(device)
    model.gradient_checkpointing = tc.activation_checkpointing
    model.train()
    optimizer = make_optimizer(model, tc, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    g = torch.Generator().manual_seed(seed)
    batches = torch.randint(
        0, mc.vocab_size, (warmup + steps, tc.micro_batch, mc.block_size + 1), generator=g
    )
    times = []
    for i in range(warmup + steps):
        batch = batches[i].to(device)
        sync(device)
        t0 = time.perf_counter()
        # The step of azllm.train.train, with grad_accum = 1 and one process.
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i + 1, tc)
        with autocast(device, precision):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{preset}/{precision}: loss is {loss.item()}")
    step_s = statistics.median(times)
    tokens = tc.micro_batch * mc.block_size
    return {
        "preset": preset,
        "precision": precision,
        "params": model.num_params(),
        "micro_batch": tc.micro_batch,
        "block_size": mc.block_size,
        "activation_checkpointing": tc.activation_checkpointing,
        "tokens_per_step": tokens,
        "step_s": step_s,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tok_per_s": tokens / step_s,
        "flops_per_s": model.flops_per_token() * tokens / step_s,
    }


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'preset':<8} {'params':>7} {'prec':<5} {'batch':>9} {'step s':>8} "
        f"{'min-max s':>13} {'tok/s':>9} {'GFLOP/s':>8} {'peak':>8} {'MFU':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        batch = f"{r['micro_batch']}x{r['block_size']}"
        spread = f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f}"
        ckpt = " (act. ckpt)" if r["activation_checkpointing"] else ""
        lines.append(
            f"{r['preset']:<8} {r['params'] / 1e6:>6.1f}M {r['precision']:<5} {batch:>9} "
            f"{r['step_s']:>8.3f} {spread:>13} {r['tok_per_s']:>9,.0f} "
            f"{r['flops_per_s'] / 1e9:>8.1f} {r['peak_flops'] / 1e9:>8.1f} "
            f"{100 * r['mfu']:>5.1f}%{ckpt}"
        )
    return "\n".join(lines)


def speed_ratios(rows: list[dict]) -> list[dict]:
    """tokens/s of each lower precision over fp32, per preset."""
    out = []
    by = {(r["preset"], r["precision"]): r for r in rows}
    for (preset, precision), r in by.items():
        base = by.get((preset, "fp32"))
        if precision != "fp32" and base:
            out.append(
                {
                    "preset": preset,
                    "precision": precision,
                    "speedup_vs_fp32": r["tok_per_s"] / base["tok_per_s"],
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--presets",
        default=DEFAULT_PRESETS,
        help=f"comma-separated, from {', '.join(PRESETS)} (default {DEFAULT_PRESETS})",
    )
    p.add_argument(
        "--precisions",
        default=None,
        help="comma-separated fp32,bf16,fp16 (default: fp32,bf16 on CPU; fp32,bf16,fp16 on CUDA)",
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per config (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=4,
        help="sequences per step (default 4, to keep the run short on a CPU; "
        "0: each preset's own micro_batch)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--peak-seconds",
        type=float,
        default=0.5,
        help="how long to time the matmul peak before each config (default 0.5)",
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the rows as JSON to PATH ('-' for stdout)",
    )
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    unknown = [s for s in presets if s not in PRESETS]
    if unknown:
        p.error(f"--presets: unknown {unknown}; choose from {', '.join(PRESETS)}")
    precisions = (
        [s.strip() for s in args.precisions.split(",") if s.strip()]
        if args.precisions
        else default_precisions(device)
    )
    for prec in precisions:
        if prec not in ("fp32", "bf16", "fp16"):
            p.error(f"--precisions: unknown {prec!r}; use fp32, bf16, fp16")
        if prec == "fp16" and device.type != "cuda":
            p.error("--precisions fp16 needs a CUDA device (autocast fp16 + GradScaler)")
        if prec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            p.error("--precisions bf16: this GPU has no bf16; use fp16")
    if args.steps < 1 or args.warmup < 0 or args.micro_batch < 0:
        p.error("--steps must be >= 1, --warmup and --micro-batch >= 0")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {device} ({where}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads; {args.warmup} warm-up + {args.steps} timed "
        "steps per config, grad accumulation 1, random tokens",
        flush=True,
    )
    t_all = time.perf_counter()
    rows = []
    for preset in presets:
        for prec in precisions:
            peak = measure_matmul_peak(device, prec, seconds=args.peak_seconds)
            r = time_steps(
                preset,
                prec,
                device,
                steps=args.steps,
                warmup=args.warmup,
                micro_batch=args.micro_batch,
            )
            r["peak_flops"] = peak
            r["mfu"] = r["flops_per_s"] / peak
            rows.append(r)
            print(
                f"  {preset}/{prec}: {r['tok_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}% "
                f"(peak {peak / 1e9:,.1f} GFLOP/s)",
                flush=True,
            )

    print()
    print(format_table(rows))
    ratios = speed_ratios(rows)
    if ratios:
        print()
        for q in ratios:
            print(f"{q['preset']:<8} {q['precision']}/fp32 tokens/s: {q['speedup_vs_fp32']:.2f}x")
    peaks = {
        prec: statistics.median(r["peak_flops"] for r in rows if r["precision"] == prec)
        for prec in precisions
    }
    if "fp32" in peaks and len(peaks) > 1:
        print(
            "median matmul peak: "
            + ", ".join(f"{k} {v / 1e9:,.1f}" for k, v in peaks.items())
            + " GFLOP/s; "
            + ", ".join(
                f"{k}/fp32 {v / peaks['fp32']:.2f}x" for k, v in peaks.items() if k != "fp32"
            )
        )
    print(f"total {time.perf_counter() - t_all:.0f} s")

    if args.json:
        doc = {
            "device": str(device),
            "device_name": where,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "warmup": args.warmup,
            "peaks": peaks,
            "rows": rows,
            "ratios": ratios,
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
