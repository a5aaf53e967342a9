"""Training throughput: tokens/s and MFU per preset, precision and strategy, on this machine.

    python bench/train_throughput.py                          # tiny, baby, small x fp32, bf16
    python bench/train_throughput.py --presets baby --steps 5 --precisions bf16
    python bench/train_throughput.py --presets small --strategies single,ddp,fsdp
    python bench/train_throughput.py --presets az-100m --steps 2 --micro-batch 1   # slow on CPU
    python bench/train_throughput.py --json results.json      # also write the rows as JSON

Each (preset, precision, strategy) builds the preset's model and times a few optimizer steps of
the training step in azllm/train.py -- forward under autocast, backward (through the GradScaler,
a no-op unless fp16), unscale, gradient clipping, AdamW with azllm's decay groups, zero_grad --
with gradient accumulation 1, on random token ids (no data files needed). The first --warmup
steps are not timed (optimizer state allocation, kernel selection); the step time reported is the
median of the timed ones, so one step slowed by a neighbour on a shared machine does not count.

Strategies (--strategies, default single):
  single  the step in this process with all --threads: the baseline.
  compiled  the same with torch.compile (what `azllm train --compile` does); "first step s" is
          the compile cost, paid once per run. azllm's compile=auto leaves it off on a CPU:
          this row is the figure behind that choice.
  ddp     --nproc processes (default 2) under torchrun (`python -m torch.distributed.run
  fsdp    --standalone`; gloo on a CPU), each running this script's hidden --worker mode, which
          wraps the model as azllm.train does: DistributedDataParallel, or azllm.train.shard_fsdp
          (FSDP2 per block; autocast off, FSDP's mixed-precision policy casts). Same global batch
          as single (--micro-batch sequences split across the processes), threads / nproc threads
          each, so together they use the cores single used. The processes meet at a barrier
          before each step (off the clock); a step lasts as long as its slowest process, and rank
          0 writes the median to a JSON file this process reads. On one CPU this is the price of
          the gradient collectives and of smaller matmuls per process ("vs single"), not a speed-up.

MFU = model FLOPs per step (GPT.flops_per_token x tokens of the global batch) / step time / peak,
named for its peak as `azllm train` logs it. `mfu_vs_measured_peak` (the table's "MFU"): the
peak is measured by azllm.device.measure_matmul_peak in the same precision, in this process with
all threads, right before each (preset, precision) (so a neighbour's load that slows the steps
slows the peak too); it answers "how close is training to this machine's own matmul speed", and
for ddp/fsdp it is against the same whole-machine peak. `mfu_vs_datasheet_peak` (the table's
"MFU ds", CUDA only, a card listed in azllm.device.DATASHEET_PEAKS, half precision): against the
vendor's dense peak per GPU x processes, the figure nanoGPT and PaLM report.
Run it on a quiet machine: when a neighbour holds one of 2 cores, a 2-thread matmul runs at about
1-thread speed (it waits for its slower thread) while 2 one-thread processes lose less, so the
peak and `single` drop more than ddp/fsdp do, and MFU can even read over 100%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from azllm.atomic import atomic_write_text
from azllm.batch import Batch
from azllm.config import PRESETS, load_config
from azllm.device import DTYPES, datasheet_peak, measure_matmul_peak, resolve_device, sync
from azllm.model import GPT
from azllm.optim import lr_at, make_optimizer
from azllm.step import TrainStep
from azllm.train import Dist, setup_distributed, shard_fsdp, wrap_model

DEFAULT_PRESETS = "tiny,baby,small"  # az-100m on request: minutes per step on a 2-core CPU
STRATEGIES = ("single", "compiled", "ddp", "fsdp")


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
    strategy: str = "single",
    d: Dist | None = None,
    seed: int = 0,
) -> dict:
    """Build the preset's model and time `steps` training steps after `warmup` untimed ones.

    Under torchrun (d.world > 1) each process takes its share of the same global batch and the
    model is wrapped for `strategy` as in azllm.train.train.
    """
    d = d or Dist()
    cfg = load_config(preset)
    tc, mc = cfg.train, cfg.model
    if micro_batch:
        tc.micro_batch = micro_batch
    tc.grad_accum = 1
    torch.manual_seed(seed)
    model = GPT(mc, activation_checkpointing=tc.activation_checkpointing, ce_chunk=tc.chunked_ce)
    model = model.to(device)
    params, flops_per_token = model.num_params(), model.flops_per_token()  # before wrapping
    model.train()
    fsdp = strategy == "fsdp"
    if fsdp:  # before the optimizer: it must see the sharded parameters
        shard_fsdp(model, precision)
    optimizer = make_optimizer(model, tc, device)
    model = wrap_model(model, compile_on=strategy == "compiled", ddp=strategy == "ddp")
    per_rank = tc.micro_batch // d.world
    # azllm.train's own step object, as train() builds it (FSDP's MixedPrecisionPolicy casts).
    train_step = TrainStep(
        model,
        optimizer,
        micro_batch=per_rank,
        grad_accum=1,
        grad_clip=tc.grad_clip,
        device=device,
        precision="fp32" if fsdp else precision,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
    )
    g = torch.Generator().manual_seed(seed)  # the same batches in every process
    batches = torch.randint(
        0, mc.vocab_size, (warmup + steps, tc.micro_batch, mc.block_size + 1), generator=g
    )
    mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
    times = []
    for i in range(warmup + steps):
        batch = batches[i, mine].to(device)
        sync(device)
        if d.world > 1:
            dist.barrier()  # start together, so a step's time is not a neighbour's late start
        t0 = time.perf_counter()
        loss, _ = train_step(Batch(batch[:, :-1], batch[:, 1:]), lr_at(i + 1, tc))
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{preset}/{precision}/{strategy}: loss is {loss.item()}")
    if d.world > 1:  # a step lasts until its slowest process is done
        slowest = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = slowest.tolist()
    step_s = statistics.median(times)
    tokens = tc.micro_batch * mc.block_size
    return {
        "preset": preset,
        "precision": precision,
        "strategy": strategy,
        "processes": d.world,
        "threads_per_process": torch.get_num_threads(),
        "params": params,
        "micro_batch": tc.micro_batch,
        "block_size": mc.block_size,
        "activation_checkpointing": tc.activation_checkpointing,
        "tokens_per_step": tokens,
        "step_s": step_s,
        "first_step_s": first,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tok_per_s": tokens / step_s,
        "flops_per_s": flops_per_token * tokens / step_s,
    }


def worker(args: argparse.Namespace) -> int:
    """One torchrun process: time the step of args.strategies for one preset and precision."""
    if "RANK" not in os.environ:
        sys.exit("--worker is for processes started by torchrun (see --strategies)")
    torch.set_num_threads(args.threads)
    d, device = setup_distributed(args.device)
    try:
        kw = dict(steps=args.steps, warmup=args.warmup, micro_batch=args.micro_batch)
        r = time_steps(args.presets, args.precisions, device, **kw, strategy=args.strategies, d=d)
        if d.master:
            atomic_write_text(Path(args.worker), json.dumps(r))
    finally:
        dist.destroy_process_group()
    return 0


def run_distributed(preset: str, precision: str, strategy: str, args, threads: int) -> dict:
    """Launch args.nproc worker processes under torchrun and return rank 0's row."""
    per_process = max(1, threads // args.nproc)
    with tempfile.TemporaryDirectory(prefix="azllm-bench-") as tmp:
        out = Path(tmp) / "rank0.json"
        flags = {
            "--worker": out,
            "--presets": preset,
            "--precisions": precision,
            "--strategies": strategy,
            "--steps": args.steps,
            "--warmup": args.warmup,
            "--micro-batch": args.micro_batch,
            "--threads": per_process,
            "--device": args.device,
        }
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # = torchrun
        cmd += [f"--nproc_per_node={args.nproc}", str(Path(__file__).resolve())]
        cmd += [str(x) for flag in flags.items() for x in flag]
        env = {**os.environ, "OMP_NUM_THREADS": str(per_process)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"{preset}/{precision}/{strategy}: torchrun exited {proc.returncode}:\n"
                + (proc.stderr + proc.stdout)[-4000:]
            )
        return json.loads(out.read_text(encoding="utf-8"))


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'preset':<8} {'params':>7} {'prec':<5} {'strategy':<9} {'batch':>9} {'step s':>8} "
        f"{'min-max s':>13} {'tok/s':>9} {'GFLOP/s':>8} {'peak':>8} {'MFU':>6} {'MFU ds':>6} "
        f"{'vs single':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        batch = f"{r['micro_batch']}x{r['block_size']}"
        spread = f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f}"
        strategy = r["strategy"] + (f" x{r['processes']}" if r["processes"] > 1 else "")
        vs = f"{r['vs_single']:.2f}x" if "vs_single" in r else ""
        ckpt = " (act. ckpt)" if r["activation_checkpointing"] else ""
        ds = r.get("mfu_vs_datasheet_peak")
        ds = f"{100 * ds:>5.1f}%" if ds is not None else f"{'-':>6}"
        lines.append(
            f"{r['preset']:<8} {r['params'] / 1e6:>6.1f}M {r['precision']:<5} {strategy:<9} "
            f"{batch:>9} {r['step_s']:>8.3f} {spread:>13} {r['tok_per_s']:>9,.0f} "
            f"{r['flops_per_s'] / 1e9:>8.1f} {r['peak_flops'] / 1e9:>8.1f} "
            f"{100 * r['mfu_vs_measured_peak']:>5.1f}% {ds} {vs:>9}{ckpt}"
        )
    return "\n".join(lines)


def speed_ratios(rows: list[dict]) -> list[dict]:
    """tokens/s of each lower precision over fp32, per preset and strategy."""
    by = {(r["preset"], r["strategy"], r["precision"]): r for r in rows}
    return [
        {"preset": pr, "strategy": st, "precision": prec, "speedup_vs_fp32": r["tok_per_s"] / base}
        for (pr, st, prec), r in by.items()
        if prec != "fp32" and (base := by.get((pr, st, "fp32"), {}).get("tok_per_s"))
    ]


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--presets", default=DEFAULT_PRESETS, help=f"from {','.join(PRESETS)} ({DEFAULT_PRESETS})")
    add("--precisions", help="comma-separated fp32,bf16,fp16 (default fp32,bf16; +fp16 on CUDA)")
    add("--strategies", default="single", help=f"subset of {','.join(STRATEGIES)} (single)")
    add("--nproc", type=int, default=2, help="processes for ddp/fsdp (default 2; CUDA: 1 GPU each)")
    add("--steps", type=int, default=3, help="timed steps per config (default 3)")
    add("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    add(
        "--micro-batch",
        type=int,
        default=4,
        help="sequences per step over all processes "
        "(default 4, short on a CPU; 0: the preset's micro_batch)",
    )
    add("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add("--threads", type=int, help="torch CPU threads in all (default torch's; ddp/fsdp: /nproc)")
    add("--peak-seconds", type=float, default=0.5, help="matmul peak timing per config (0.5 s)")
    add("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-' for stdout)")
    add("--worker", help=argparse.SUPPRESS)  # rank-0 JSON path
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = resolve_device(args.device)
    presets = split_list(args.presets)
    unknown = [s for s in presets if s not in PRESETS]
    if unknown:
        p.error(f"--presets: unknown {unknown}; choose from {', '.join(PRESETS)}")
    precisions = split_list(args.precisions) if args.precisions else default_precisions(device)
    for prec in precisions:
        if prec not in DTYPES:
            p.error(f"--precisions: unknown {prec!r}; use {', '.join(DTYPES)}")
        if prec == "fp16" and device.type != "cuda":
            p.error("--precisions fp16 needs a CUDA device (autocast fp16 + GradScaler)")
        if prec == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            p.error("--precisions bf16: this GPU has no bf16; use fp16")
    strategies = split_list(args.strategies)
    if not strategies or any(s not in STRATEGIES for s in strategies):
        p.error(f"--strategies {args.strategies!r}: use a subset of {','.join(STRATEGIES)}")
    if args.steps < 1 or args.warmup < 0 or args.micro_batch < 0 or args.nproc < 2:
        p.error("--steps must be >= 1, --warmup and --micro-batch >= 0, --nproc >= 2")
    if set(strategies) - {"single", "compiled"}:
        for preset in presets:
            mb = args.micro_batch or load_config(preset).train.micro_batch
            if mb % args.nproc:
                p.error(f"--micro-batch {mb} ({preset}) does not split over --nproc {args.nproc}")
        if device.type == "cuda" and torch.cuda.device_count() < args.nproc:
            p.error(f"--nproc {args.nproc}: only {torch.cuda.device_count()} GPU(s) here")

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {device} ({where}), torch {torch.__version__}, {threads} CPU threads; "
        f"{args.warmup} warm-up + {args.steps} timed steps per config, grad accumulation 1, "
        f"random tokens; strategies {', '.join(strategies)}"
        + (f" ({args.nproc} processes)" if set(strategies) & {"ddp", "fsdp"} else ""),
        flush=True,
    )
    t_all = time.perf_counter()
    kw = dict(steps=args.steps, warmup=args.warmup, micro_batch=args.micro_batch)
    rows = []
    for preset in presets:
        for prec in precisions:
            peak = measure_matmul_peak(device, prec, seconds=args.peak_seconds)
            vendor = datasheet_peak(device, prec)  # per GPU; None on a CPU, fp32, unlisted cards
            single = None
            for strategy in strategies:
                if strategy in ("single", "compiled"):
                    r = time_steps(preset, prec, device, **kw, strategy=strategy)
                    if strategy == "single":
                        single = r
                    elif single:
                        r["vs_single"] = r["tok_per_s"] / single["tok_per_s"]
                else:
                    r = run_distributed(preset, prec, strategy, args, threads)
                    if single:
                        r["vs_single"] = r["tok_per_s"] / single["tok_per_s"]
                r["peak_flops"] = peak
                r["mfu_vs_measured_peak"] = r["flops_per_s"] / peak
                ds = ""
                if vendor:  # ddp/fsdp on CUDA: one GPU per process
                    r["datasheet_peak_flops"] = vendor * r["processes"]
                    r["mfu_vs_datasheet_peak"] = r["flops_per_s"] / r["datasheet_peak_flops"]
                    ds = f", {100 * r['mfu_vs_datasheet_peak']:.1f}% of the datasheet peak"
                rows.append(r)
                print(
                    f"  {preset}/{prec}/{strategy}: {r['tok_per_s']:,.0f} tok/s, "
                    f"MFU {100 * r['mfu_vs_measured_peak']:.1f}% (peak {peak / 1e9:,.1f} "
                    f"GFLOP/s){ds}, first step {r['first_step_s']:.1f} s",
                    flush=True,
                )

    print()
    print(format_table(rows))
    ratios = speed_ratios(rows)
    if ratios:
        print()
        for q in ratios:
            print(
                f"{q['preset']:<8} {q['strategy']:<6} {q['precision']}/fp32 tokens/s: "
                f"{q['speedup_vs_fp32']:.2f}x"
            )
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
    if any(
        r["mfu_vs_measured_peak"] > 1 for r in rows
    ):  # seen on the shared 2-core machine: see the docstring
        print("MFU over 100%: the peak was measured while a neighbour's load was heavier; rerun")
    print(f"total {time.perf_counter() - t_all:.0f} s")

    if args.json:
        doc = {
            "device": str(device),
            "device_name": where,
            "torch": torch.__version__,
            "threads": threads,
            "nproc": args.nproc,
            "strategies": strategies,
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
