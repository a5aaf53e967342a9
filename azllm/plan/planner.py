"""The planner: the settings that make training fit a memory budget, from memory.py's model.

make_plan tries settings from the fastest to the most frugal (see _levels) and returns the first
that fits with a good micro-batch; when nothing fits it says so, with the smallest budget that
would. No torch here: planning is arithmetic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from azllm.config import Config
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
    optimizer: str = "adamw"

    def train_flags(self) -> list[str]:
        """The `azllm train` flags that apply this plan."""
        return [
            "--micro-batch", str(self.micro_batch),
            "--grad-accum", str(self.grad_accum),
            "--activation-checkpointing" if self.activation_checkpointing
            else "--no-activation-checkpointing",
            "--chunked-ce", str(self.chunked_ce),
            "--optimizer", self.optimizer,
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
        model=f"{cfg.model.arch}, {p.total / 1e6:.1f}M parameters, {cfg.model.n_layer} layers"
        + (f", MoE {p.active / 1e6:.1f}M active per token" if cfg.model.n_experts else ""),
        optimizer=cfg.train.optimizer,
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
        f"{plan.device_type}; checkpointing {ckpt}; chunked CE {ce}; {plan.optimizer} states "
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
