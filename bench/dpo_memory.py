"""Peak memory of a DPO training step against an SFT step at the same batch.

    python bench/dpo_memory.py                          # baby, context 192, 2 pairs, CPU
    python bench/dpo_memory.py --preset small --pairs 1
    python bench/dpo_memory.py --device cuda --preset az-100m --context 1024 --precision fp16

Every variant runs the real step (step.TrainStep) on random tokens -- a warm-up step that makes
the optimizer states, then two more -- and reports the allocator's peak: on a CPU torch's own
count of bytes allocated minus freed, read through the profiler (azllm.plan.profiler, the
figure `azllm plan --measure` compares with its estimate; not RSS, not tracemalloc, which does
not see torch's allocations); on CUDA torch.cuda.max_memory_allocated.

Variants, each with P pairs per micro-batch (a pair = a chosen and a rejected sequence):
- sft 2P rows: the LM loss on the same 2P sequences ("the same batch" in tokens);
- sft P rows: the LM loss at the same micro_batch setting (half the tokens);
- dpo stored reference: chat.dpo's step, reference log-probs read from the batch;
- dpo live reference: a second, frozen copy of the model computes them inside the step (what
  storing them avoids).
Then what azllm.memory (the `azllm plan` estimate) says for a DPO step: an SFT step of 2P rows
without chunked cross-entropy (DPO needs each sequence's log-prob, so full logits), and, as
the issue asks, az-100m at context 1024 in fp16 on the 4 GB card.
"""

from __future__ import annotations

import argparse
import copy

import torch

from azllm.batch import Batch
from azllm.chat.dpo import DPOLoss, DPOSettings, sequence_logps
from azllm.config import apply_overrides, load_config
from azllm.memory import GiB, estimate_peak, fmt_bytes
from azllm.model import GPT
from azllm.optim import make_optimizer
from azllm.plan.planner import HEADROOM
from azllm.plan.profiler import _profiled
from azllm.step import TrainStep


def batches(steps: int, pairs: int, t: int, vocab: int) -> list[Batch]:
    """Pair batches [pairs, 2, t]: the first half of each sequence is prompt (no loss)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (pairs, 2, t), generator=g)
        y = torch.randint(0, vocab, (pairs, 2, t), generator=g)
        y[..., : t // 2] = -1
        out.append(Batch(x, y, ref_logps=-torch.rand(pairs, 2, generator=g) * 100))
    return out


def live_reference_loss(model: torch.nn.Module, settings: DPOSettings):
    """A loss hook that runs a frozen copy of the model for the reference in every step."""
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    loss = DPOLoss(settings)

    def fn(m, b: Batch):
        with torch.no_grad():
            ref = sequence_logps(ref_model, b)[0]
        return loss(m, Batch(b.inputs, b.targets, ref_logps=ref))

    return fn, ref_model


def measure(cfg, variant: str, pairs: int, device: torch.device, precision: str) -> int:
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device).train()
    data = [b.to(device) for b in batches(3, pairs, cfg.model.block_size, cfg.model.vocab_size)]
    loss_fn, frozen = None, []
    if variant.startswith("sft"):
        rows = 2 if variant == "sft 2P rows" else 1
        flat = []
        for b in data:  # the same tokens as sequences in rows
            x, y = (
                b.inputs.reshape(-1, b.inputs.shape[-1]),
                b.targets.reshape(-1, b.inputs.shape[-1]),
            )
            flat.append(Batch(x[: rows * pairs], y[: rows * pairs]))
        data = flat
    elif variant == "dpo stored reference":
        loss_fn = DPOLoss(DPOSettings())
    else:
        loss_fn, ref_model = live_reference_loss(model, DPOSettings())
        frozen = list(ref_model.parameters())
    step = TrainStep(
        model,
        make_optimizer(model, cfg.train, device),
        micro_batch=len(data[0]),
        grad_accum=1,
        grad_clip=1.0,
        device=device,
        precision=precision,
        loss_fn=loss_fn,
    )
    if device.type == "cuda":
        step(data[0], 1e-4)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for b in data[1:]:
            step(b, 1e-4)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for b in data for t in b.tensors()] + frozen
    alive = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in tensors}
    live = peak = sum(alive.values())
    for b in data:
        top, end = _profiled(lambda b=b: step(b, 1e-4))
        peak, live = max(peak, live + top), live + end
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--context", type=int, default=0, help="default: the preset's")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per micro-batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    over = {"model.block_size": args.context} if args.context else {}
    cfg = apply_overrides(load_config(args.preset), over)
    dev = torch.device(args.device)
    t = cfg.model.block_size
    print(f"{args.preset}, context {t}, {args.pairs} pair(s) per micro-batch, {args.precision}")
    print(f"on {dev}: peak allocated over a warm-up step and two more\n")
    got = {}
    for v in ("sft 2P rows", "sft P rows", "dpo stored reference", "dpo live reference"):
        got[v] = measure(cfg, v, args.pairs, dev, args.precision)
        ratio = got[v] / got["sft 2P rows"]
        print(f"  {v:22s} {fmt_bytes(got[v]):>11s}   {ratio:.2f}x sft 2P rows")
    kw = dict(precision=args.precision, activation_checkpointing=False, device_type=dev.type)
    est = estimate_peak(cfg, 2 * args.pairs, chunked_ce=0, **kw)["allocated"]
    print(
        f"\nazllm.memory (azllm plan) for a DPO step = SFT of {2 * args.pairs} rows, full "
        f"logits: {fmt_bytes(est)} allocated ({est / got['dpo stored reference']:.2f}x measured)"
    )
    big = apply_overrides(load_config("az-100m"), {"model.block_size": 1024})
    print("az-100m, context 1024, fp16 on CUDA, 1 pair (2 sequences), estimated process total:")
    for ckpt in (False, True):
        for state in ("fp32", "8bit"):
            e = estimate_peak(
                big, 2, precision="fp16", activation_checkpointing=ckpt, device_type="cuda",
                optimizer_state=state, chunked_ce=0,
            )["total"]  # fmt: skip
            fits = "fits" if e <= 4 * GiB * (1 - HEADROOM) else "does not fit"
            print(f"  checkpointing {ckpt!s:5s} optimizer {state:4s}: {fmt_bytes(e)} ({fits} 4 GB)")


if __name__ == "__main__":
    main()
