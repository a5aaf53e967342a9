"""`azllm plan`: the settings that make training fit a memory budget, from memory.py's model.

    azllm plan --config az-100m --vram 4GB                 # what to pass to azllm train
    azllm plan --config baby --vram 2GB --device cpu       # RAM of a CPU run
    azllm plan --config baby --vram 2GB --device cpu --measure   # and check it: one real step

make_plan tries settings from the fastest to the most frugal (see _levels) and returns the first
that fits with a good micro-batch; when nothing fits it says so, with the smallest budget that
would. measure_peak runs one real training step and reads the peak from the allocator
(torch.cuda.max_memory_allocated on a GPU; the CPU allocator's own accounting via the profiler
on a CPU), the figure memory.py's "allocated" estimates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

from azllm.config import Config, apply_overrides, load_config
from azllm.errors import AzllmError
from azllm.memory import (
    COMPONENTS,
    CPU_FRAGMENTATION,
    FRAGMENTATION,
    GiB,
    MiB,
    default_ce_chunk,
    estimate_peak,
    fmt_bytes,
    is_half,
    param_counts,
    peak_phase,
)

__all__ = ["Plan", "estimate_peak", "make_plan", "measure_peak", "parse_vram", "plan_table"]

HEADROOM = 0.12  # of the budget left free: a desktop on the GPU, CUDA figures not measured here
EFFICIENT_TOKENS = 4096  # a micro-batch of this many tokens keeps a GPU's matmuls busy


def parse_vram(text: str) -> int:
    """'4GB', '4GiB', '3.5G', '4096MB', '512M' -> bytes. Binary units throughout: a "4 GB" card
    has 4 GiB (nvidia-smi shows 4096MiB), so GB and GiB both mean 2**30 here."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise AzllmError(f"--vram {text!r}: expected a size such as 4GB, 3.5GiB or 4096MB")
    unit = {"": GiB, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()]
    if not m.group(2) and float(m.group(1)) > 1024:
        raise AzllmError(f"--vram {text!r}: give a unit (4GB, 4096MB); a bare number means GiB")
    return int(float(m.group(1)) * unit)


# ---- the plan ---------------------------------------------------------------------------------


@dataclass
class Plan:
    micro_batch: int
    grad_accum: int
    activation_checkpointing: bool
    precision: str  # "auto" only when planning for a GPU that is not here (bf16 and fp16 alike)
    optimizer_state: str
    chunked_ce: int  # tokens per cross-entropy chunk, 0: off
    estimated_peak_bytes: int  # breakdown["total"]: what the process needs
    breakdown: dict[str, int]
    fits: bool
    min_vram_bytes: int | None  # when it does not fit: the smallest budget that would
    notes: list[str] = field(default_factory=list)
    vram_bytes: int = 0
    device_type: str = "cuda"
    world: int = 1
    context: int = 0
    global_batch: int = 0
    phase: str = ""  # where in the step the peak falls
    model: str = ""  # one-line description for the table

    def train_flags(self) -> list[str]:
        """The `azllm train` flags that apply this plan."""
        return [
            "--micro-batch", str(self.micro_batch),
            "--grad-accum", str(self.grad_accum),
            "--activation-checkpointing" if self.activation_checkpointing
            else "--no-activation-checkpointing",
            "--chunked-ce", str(self.chunked_ce),
            "--optimizer-state", self.optimizer_state,
            "--precision", self.precision,
            "--block-size", str(self.context),
        ]  # fmt: skip


def resolve_plan_precision(precision: str, device_type: str) -> tuple[str, str | None]:
    """(precision, note). 'auto' is resolved as `azllm train` would, from the hardware here."""
    if device_type not in ("cuda", "cpu"):
        raise AzllmError(f"--device {device_type}: plan for cuda or cpu")
    is_half(precision, device_type)  # validates the name
    if device_type == "cpu" and precision == "fp16":
        raise AzllmError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
    if precision != "auto":
        return precision, None
    if device_type == "cpu":
        from azllm.device import cpu_has_fast_bf16

        return ("bf16" if cpu_has_fast_bf16() else "fp32"), None
    import torch

    if torch.cuda.is_available():
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
    return "auto", (
        "no GPU here: half precision assumed; train's auto picks bf16 on Ampere or newer (the "
        "RTX 2050 is Ampere, GA107), fp16 before -- the same memory"
    )


def _levels(device_type: str, chunk: int) -> list[tuple[bool, int, str]]:
    """Settings from fastest to most frugal: (checkpointing, chunked_ce, optimizer_state).
    Chunked CE recomputes only lm_head; checkpointing recomputes every block (~+30% compute);
    smaller optimizer states round the moments. 8-bit needs bitsandbytes on CUDA."""
    out = [(False, 0, "fp32"), (False, chunk, "fp32"), (True, 0, "fp32"), (True, chunk, "fp32")]
    out += [(True, chunk, "bf16")] + ([(True, chunk, "8bit")] if device_type == "cuda" else [])
    return out


def make_plan(
    cfg: Config,
    vram_bytes: int,
    *,
    target_global_batch: int | None = None,
    precision: str = "auto",
    device_type: str = "cuda",
    world: int = 1,
    strategy: str = "ddp",
) -> Plan:
    """The fastest settings whose estimated process peak fits in vram_bytes (minus HEADROOM).

    Within the fastest level of settings (see _levels) that allows a micro-batch of at least
    EFFICIENT_TOKENS tokens (or the whole per-process batch), the largest micro-batch that
    divides the per-process batch; if no level reaches that, the level with the largest.
    """
    cfg.model.validate()
    if world < 1:
        raise AzllmError("--world must be at least 1")
    tc, t = cfg.train, cfg.model.block_size
    target = target_global_batch or tc.global_batch or tc.micro_batch * tc.grad_accum * world
    if target < 1 or target % world:
        raise AzllmError(
            f"--global-batch {target}: must be a positive multiple of the {world} process(es)"
        )
    per_rank = target // world
    precision, note = resolve_plan_precision(precision, device_type)
    chunk = default_ce_chunk(cfg.model.vocab_size)
    budget = int(vram_bytes * (1 - HEADROOM))
    divisors = [mb for mb in range(per_rank, 0, -1) if per_rank % mb == 0]
    want = min(per_rank, math.ceil(EFFICIENT_TOKENS / t))

    def estimate(level, mb):
        ckpt, ce, state = level
        return estimate_peak(
            cfg, mb, precision=precision, activation_checkpointing=ckpt,
            device_type=device_type, optimizer_state=state, chunked_ce=ce,
            grad_accum=per_rank // mb, world=world, strategy=strategy,
        )  # fmt: skip

    best = None  # (level, micro_batch, estimate)
    for level in _levels(device_type, chunk):
        mb = next((mb for mb in divisors if estimate(level, mb)["total"] <= budget), None)
        if mb is not None and (best is None or mb > best[1]):
            best = (level, mb, estimate(level, mb))
        if best is not None and best[1] >= want:
            break
    fits = best is not None
    notes = [note] if note else []
    min_vram = None
    if not fits:  # the most frugal settings at micro-batch 1, and the budget they need
        best = min(
            ((lv, 1, estimate(lv, 1)) for lv in _levels(device_type, chunk)),
            key=lambda b: b[2]["total"],
        )
        min_vram = math.ceil((best[2]["total"] + 1) / (1 - HEADROOM))
    (ckpt, ce, state), mb, est = best
    if world > 1 and strategy == "ddp":
        notes.append("DDP keeps a second copy of the gradients in its buckets (ddp_buckets)")
    if strategy == "fsdp" and world > 1:
        notes.append("FSDP figures are approximate (not validated against a measurement)")
    p = param_counts(cfg.model)
    kw = dict(
        precision=precision, activation_checkpointing=ckpt, device_type=device_type,
        optimizer_state=state, chunked_ce=ce, grad_accum=per_rank // mb, world=world,
        strategy=strategy,
    )  # fmt: skip
    return Plan(
        micro_batch=mb, grad_accum=per_rank // mb, activation_checkpointing=ckpt,
        precision=precision, optimizer_state=state, chunked_ce=ce,
        estimated_peak_bytes=est["total"], breakdown=est, fits=fits, min_vram_bytes=min_vram,
        notes=notes, vram_bytes=vram_bytes, device_type=device_type, world=world, context=t,
        global_batch=target, phase=peak_phase(cfg, mb, **kw),
        model=f"{cfg.model.arch}, {p.total / 1e6:.1f}M parameters, {cfg.model.n_layer} layers",
    )  # fmt: skip


def plan_table(plan: Plan) -> str:
    b = plan.breakdown
    gpu = plan.device_type == "cuda"
    rows = [(label, b[k]) for k, label in COMPONENTS.items() if b.get(k)]
    measured_as = "torch.cuda.max_memory_allocated" if gpu else "the allocator's peak"
    frag = FRAGMENTATION if gpu else CPU_FRAGMENTATION
    rows += [
        (f"= allocated at the peak (~ {measured_as})", b["allocated"]),
        (f"allocator fragmentation (+{frag:.0%})", b["allocator_overhead"]),
        ("CUDA context (outside the allocator)" if gpu else "Python + torch", b["runtime"]),
        ("= process peak" + (" (what nvidia-smi shows)" if gpu else " (RSS)"), b["total"]),
    ]
    ckpt = "on" if plan.activation_checkpointing else "off"
    ce = f"{plan.chunked_ce} tokens" if plan.chunked_ce else "off"
    lines = [
        f"model: {plan.model}, context {plan.context}",
        f"global batch {plan.global_batch} = micro-batch {plan.micro_batch} x {plan.grad_accum}"
        f" accumulation x {plan.world} process(es); precision {plan.precision} on "
        f"{plan.device_type}; checkpointing {ckpt}; chunked CE {ce}; AdamW states "
        f"{plan.optimizer_state}",
        "",
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines += [f"  {label:<{width}}{fmt_bytes(n):>12}" for label, n in rows]
    budget = int(plan.vram_bytes * (1 - HEADROOM))
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += [
        f"  peak at: {plan.phase}",
        f"  budget {fmt_bytes(plan.vram_bytes)}, {HEADROOM:.0%} kept free -> "
        f"{fmt_bytes(budget)}: {verdict}",
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    if plan.fits:
        lines += ["", "azllm train ... " + " ".join(plan.train_flags())]
    else:
        lines += [
            "",
            f"cannot fit in {fmt_bytes(plan.vram_bytes)} even at micro-batch 1 with every saver;"
            f" the smallest budget that fits is {fmt_bytes(plan.min_vram_bytes)}",
        ]
    return "\n".join(lines)


# ---- measurement ------------------------------------------------------------------------------


def measure_peak(
    cfg: Config,
    micro_batch: int,
    *,
    precision: str,
    activation_checkpointing: bool,
    device: str = "cpu",
    optimizer_state: str = "fp32",
    chunked_ce: int = 0,
    grad_accum: int = 1,
    steps: int = 2,
    seed: int = 0,
    profile: bool = True,
) -> dict[str, int]:
    """Run train.py's step for real and return {"allocated": peak bytes, ...}.

    The step as in azllm.train: per micro-batch an autocast forward of which only the loss is
    kept (train.py's `model(...)[1]`), a (scaled) backward; then unscale, clip, optimizer
    step, zero_grad(set_to_none). A first step makes the optimizer states, then `steps` more.
    On CUDA: torch.cuda.max_memory_allocated after the first step (+ "reserved" and
    "device_used", nvidia-smi's figure). On a CPU, torch's CPU allocator reports each
    allocation and free to the profiler (profile_memory=True): the peak of the running sum
    over the steps, plus the bytes alive before (weights, buffers, batches), is the same
    quantity, exactly, without glibc's fragmentation. (The first step peaks no higher than the
    later ones: its optimizer step holds what theirs do, its forward and backward have no
    optimizer states yet.)
    profile=False (CPU): no profiler, only "rss", the process's peak resident set (VmHWM:
    meaningful in a fresh process; it includes Python, torch and glibc's fragmentation).
    """
    import torch

    from azllm.device import autocast
    from azllm.model import GPT
    from azllm.train import make_optimizer

    dev = torch.device(device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train))
    cfg.train.optimizer_state = optimizer_state
    m, b, t = cfg.model, micro_batch, cfg.model.block_size
    torch.manual_seed(seed)
    model = GPT(m).to(dev)
    model.train()
    model.gradient_checkpointing = activation_checkpointing
    model.ce_chunk = chunked_ce
    optimizer = make_optimizer(model, cfg.train, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    g = torch.Generator().manual_seed(seed)
    shape = (steps + 1, grad_accum, b, t)
    xs = torch.randint(0, m.vocab_size, shape, generator=g).to(dev)
    ys = torch.randint(0, m.vocab_size, shape, generator=g).to(dev)

    def step(i: int) -> None:
        for micro in range(grad_accum):
            with autocast(dev, precision):
                loss = model(xs[i, micro], ys[i, micro])[1]
                loss = loss / grad_accum
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if dev.type == "cuda":
        step(0)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        for i in range(1, steps + 1):
            step(i)
        torch.cuda.synchronize(dev)
        free, total = torch.cuda.mem_get_info(dev)
        return {
            "allocated": torch.cuda.max_memory_allocated(dev),
            "reserved": torch.cuda.max_memory_reserved(dev),
            "device_used": total - free,
        }
    if not profile:
        for i in range(steps + 1):
            step(i)
        return {"rss": _peak_rss()}
    # The profiler reports allocations made while it runs and the frees of those (also in a
    # later window), never frees of older blocks: so every step from the first is profiled,
    # one window per step (smaller traces), and the running count carries over.
    alive = {}
    for x in [*model.parameters(), *model.buffers(), xs, ys]:
        alive[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    live = peak = sum(alive.values())
    for i in range(steps + 1):
        top, end = _profiled(lambda i=i: step(i))
        peak, live = max(peak, live + top), live + end
    return {"allocated": peak}


def _peak_rss() -> int:
    """This process's peak resident set: VmHWM (ru_maxrss would also count the parent's pages
    copied at fork, before exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
        return int(kb) * 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _profiled(fn) -> tuple[int, int]:
    """(peak, final) of bytes allocated minus freed by torch's CPU allocator while fn runs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak, live


# ---- command line -----------------------------------------------------------------------------


def cmd_plan(args) -> int:
    cfg = load_config(args.config)
    overrides = {"model.block_size": args.context, "model.vocab_size": args.vocab_size}
    cfg = apply_overrides(cfg, overrides)
    plan = make_plan(
        cfg, parse_vram(args.vram), target_global_batch=args.global_batch,
        precision=args.precision, device_type=args.device, world=args.world,
        strategy=args.strategy,
    )  # fmt: skip
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
    p.add_argument("--config", required=True, help="preset (tiny, baby, small, az-100m) or TOML")
    p.add_argument("--vram", required=True, help="memory budget: 4GB, 3.5GiB, 4096MB")
    p.add_argument("--context", type=int, help="tokens per sequence (default: the config's)")
    p.add_argument("--vocab-size", type=int, help="the tokenizer's (default: the config's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--world", type=int, default=1, help="processes (GPUs) under torchrun")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--json", action="store_true", help="the plan as JSON")
    p.add_argument(
        "--measure", action="store_true", help="also run two training steps here and compare"
    )
    p.set_defaults(func=cmd_plan)
