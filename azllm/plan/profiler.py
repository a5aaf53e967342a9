"""The profiler: one real training step (step.TrainStep) and the memory peak it reaches.

measure_peak reads the peak from the allocator (torch.cuda.max_memory_allocated on a GPU; the CPU
allocator's own accounting via the profiler on a CPU), the figure memory.py's "allocated"
estimates, so the planner can be checked against the real step.
"""

from __future__ import annotations

import dataclasses

from azllm.config import Config


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
    lora: dict | None = None,
) -> dict[str, int]:
    """Run the training step (step.TrainStep) for real and return {"allocated": peak bytes, ...}.

    A first step makes the optimizer states, then `steps` more.
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

    from azllm.batch import Batch
    from azllm.model import GPT
    from azllm.optim import make_optimizer
    from azllm.step import TrainStep

    dev = torch.device(device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train))
    cfg.train.optimizer_state = optimizer_state
    m, b, t = cfg.peak_model(), micro_batch, cfg.model.block_size
    torch.manual_seed(seed)
    model = GPT(m, activation_checkpointing=activation_checkpointing, ce_chunk=chunked_ce)
    model = model.to(dev).train()
    if lora:  # LoRA/QLoRA: apply_lora's arguments (rank, alpha, targets, base_dtype, qlora)
        from azllm.lora import apply_lora

        extra = {k: lora[k] for k in ("base_dtype", "qlora") if k in lora}
        apply_lora(model, lora["rank"], lora["alpha"], lora["targets"], **extra)
    train_step = TrainStep(
        model,
        make_optimizer(model, cfg.train, dev),
        micro_batch=b,
        grad_accum=grad_accum,
        grad_clip=cfg.train.grad_clip,
        device=dev,
        precision=precision,
    )
    g = torch.Generator().manual_seed(seed)
    shape = (steps + 1, grad_accum * b, t)
    xs = torch.randint(0, m.vocab_size, shape, generator=g).to(dev)
    ys = torch.randint(0, m.vocab_size, shape, generator=g).to(dev)

    def step(i: int) -> None:
        train_step(Batch(xs[i], ys[i]), cfg.train.lr)

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
