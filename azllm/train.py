"""The pretraining loop: one script for a CPU, one small GPU, or many GPUs under torchrun.

    azllm train --config baby --data DATA --out RUN            # one process
    torchrun --nproc_per_node=4 -m azllm.cli train ...          # DDP, same arguments

Read top to bottom: set up processes and device -> data -> model/optimizer -> (resume) -> loop of
{lr, accumulate gradients over micro-batches, clip, step, log, eval, checkpoint}.
Every step's batch is a function of the step number (see shards.TokenBatches), so a resumed run
continues exactly where the killed one was, and K processes see the same global batch as one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from azllm.atomic import atomic_write_text
from azllm.checkpoint import (
    checkpoint_dirs,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    unwrap,
)
from azllm.config import Config, load_run_config
from azllm.device import (
    DTYPES,
    autocast,
    measure_matmul_peak,
    resolve_device,
    resolve_precision,
)
from azllm.errors import AzllmError
from azllm.loader import Prefetcher
from azllm.metrics import MetricsLog, plot_loss
from azllm.model import GPT
from azllm.optim import make_adamw
from azllm.shards import TokenBatches, read_meta
from azllm.tokenizer import load_tokenizer


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    if "RANK" not in os.environ:
        return Dist(), resolve_device(device_name)
    d = Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    device = resolve_device(device_name, d.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return d, device


def lr_at(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps (step counts from 1)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def use_compile(setting: str, device: torch.device, fsdp: bool) -> bool:
    """torch.compile: "on", "off", or "auto" = on where it pays.

    On CUDA, compiling (about a minute) fuses the norms, RoPE and activations and pays back within
    a few hundred steps; it needs Triton (missing on Windows builds, for one). On a CPU it buys
    little where bf16 is the default (bench/train_throughput.py --strategies single,compiled:
    baby bf16 1.02x after a 42 s compile; fp32 1.25x after 36 s), and under FSDP graph breaks at
    every shard boundary eat most of the gain, so auto leaves both to an explicit "on".
    """
    if setting != "auto":
        return setting == "on"
    import importlib.util

    return device.type == "cuda" and not fsdp and importlib.util.find_spec("triton") is not None


def make_optimizer(model: GPT, cfg, device: torch.device) -> torch.optim.Optimizer:
    # Matrices decay; biases and norm gains do not (decaying them only hurts).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return make_adamw(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), state=cfg.optimizer_state, device=device
    )


def shard_fsdp(model: GPT, precision: str) -> None:
    """FSDP2: each block its own shard group, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision != "fp32":  # compute in half precision, reduce gradients in fp32
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def prepare_run(cfg: Config, meta: dict, data_dir: Path, run_dir: Path, resume: bool) -> Config:
    """Take the vocab from the data, check it against an existing run, return the final config."""
    if resume:
        saved = load_run_config(run_dir)
        if dataclasses.replace(cfg.model, vocab_size=saved.model.vocab_size) != saved.model:
            raise AzllmError(
                f"{run_dir}/config.json: the model config given differs from the "
                "run's; resume with the same --config and model overrides"
            )
        cfg.model = saved.model
        run_tok = load_tokenizer(run_dir / "tokenizer.json")
        if run_tok.sha256() != meta["tokenizer_sha256"]:
            raise AzllmError(
                f"{data_dir}: tokenized with a different tokenizer than the run "
                f"{run_dir} (vocab {meta['vocab_size']} vs {run_tok.vocab_size}); "
                "re-tokenize with the run's tokenizer.json"
            )
    else:
        if checkpoint_dirs(run_dir) or (run_dir / "model.safetensors").exists():
            raise AzllmError(
                f"{run_dir}: already holds a run; pass --resume to continue it or "
                "choose another --out"
            )
        cfg.model.vocab_size = meta["vocab_size"]
    return cfg


def train(
    cfg: Config,
    data_dir: Path | None,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    data=None,
    init_weights: Path | None = None,
) -> dict:
    """Train (or resume) and return the last logged metrics.

    Pretraining reads token shards from data_dir. Other sources (chat fine-tuning) pass `data`:
    any object with .meta (tokenizer_sha256, vocab_size), .dir, .tokenizer_path, .has_split(),
    .bytes_per_token(split) and .batch(split, key, n, rows) -> (inputs, targets with -1 where no
    loss is taken). init_weights starts a new run from another run's weights.
    """
    cfg.validate()
    tc = cfg.train
    d, device = setup_distributed(tc.device)
    precision = resolve_precision(tc.precision, device)
    run_dir = Path(run_dir)
    if resume and not checkpoint_dirs(run_dir):
        raise AzllmError(f"{run_dir}: no checkpoint to resume from")
    meta = data.meta if data is not None else read_meta(data_dir)
    cfg = prepare_run(cfg, meta, data.dir if data is not None else Path(data_dir), run_dir, resume)

    # Global batch: sequences per optimizer step over all processes.
    if tc.global_batch:
        per_step = tc.micro_batch * d.world
        if tc.global_batch % per_step:
            raise AzllmError(
                f"train.global_batch {tc.global_batch} is not a multiple of "
                f"micro_batch x processes = {per_step}"
            )
        tc.grad_accum = tc.global_batch // per_step
    global_batch = tc.micro_batch * tc.grad_accum * d.world
    tokens_per_step = global_batch * cfg.model.block_size

    torch.manual_seed(tc.seed)
    if data is None:
        data = TokenBatches(data_dir, cfg.model.block_size, tc.seed)
    if d.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        load_tokenizer(data.tokenizer_path).save(run_dir / "tokenizer.json")

    model = GPT(cfg.model).to(device)
    model.gradient_checkpointing = tc.activation_checkpointing
    model.ce_chunk = tc.chunked_ce
    fsdp = d.world > 1 and tc.strategy == "fsdp"
    if fsdp:  # before the optimizer: it must see the sharded parameters
        shard_fsdp(model, precision)
    optimizer = make_optimizer(model, tc, device)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    start, best_val = 0, float("inf")
    if init_weights is not None and not resume:
        load_weights(model, init_weights)
    if resume:
        state = load_checkpoint(checkpoint_dirs(run_dir)[-1], model, optimizer, scaler)
        start, best_val = state["step"], state["best_val_loss"]
        if start >= tc.max_steps:
            raise AzllmError(
                f"{run_dir}: already at step {start} of --max-steps {tc.max_steps}; "
                "raise --max-steps to train further"
            )
    flops_per_step = unwrap(model).flops_per_token() * tokens_per_step
    peak = measure_matmul_peak(device, precision)
    if use_compile(tc.compile, device, fsdp):
        if tc.compile == "auto":  # chosen for the user: a compiler failure falls back to eager
            torch._dynamo.config.suppress_errors = True
        model = torch.compile(model)
    if d.world > 1 and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Gradients live in DDP's all-reduce buckets: no second copy of them.
        model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    # FSDP's mixed-precision policy casts parameters itself; autocast is for the other paths.
    amp_precision = "fp32" if fsdp else precision

    def amp():
        return autocast(device, amp_precision)

    log = MetricsLog(run_dir, resume_step=start) if d.master else None
    # A progress bar on a terminal; on a pipe or in CI (no TTY) plain lines at each evaluation.
    from tqdm import tqdm

    bar = tqdm(
        total=tc.max_steps,
        initial=start,
        unit="step",
        dynamic_ncols=True,
        disable=None if d.master and progress else True,
    )
    say = tqdm.write if d.master and progress else (lambda _msg: None)
    say(
        f"model {unwrap(model).num_params() / 1e6:.1f}M params | {precision} on {device} "
        f"x{d.world} | batch {global_batch}x{cfg.model.block_size} tokens"
    )
    per_rank = tc.micro_batch * tc.grad_accum
    rows = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
    bpt = data.bytes_per_token("val")
    has_val = data.has_split("val")
    if d.master and not has_val:
        print(f"note: {data.dir} has no validation data; validation loss is skipped")

    def evaluate() -> float:
        model.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for i in range(tc.eval_batches):
                mine = slice(d.rank * tc.micro_batch, (d.rank + 1) * tc.micro_batch)
                x, y, *seg = (
                    t.to(device) for t in data.batch("val", i, tc.micro_batch * d.world, mine)
                )
                with amp():
                    loss = model(x, y, segments=seg[0] if seg else None)[1]
                total += loss.float()
        if d.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
        model.train()
        return total.item() / tc.eval_batches

    last: dict = {}
    batches = Prefetcher(
        lambda step: data.batch("train", step, global_batch, rows),
        range(start + 1, tc.max_steps + 1),
        device,
    )
    loss_sum = torch.zeros((), device=device)
    t_log, steps_since_log = time.perf_counter(), 0
    model.train()
    step = start
    try:
        for step in range(start + 1, tc.max_steps + 1):
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            xs, ys, *seg = batches.get(step)  # seg: [segment ids] for packed rows, else []
            for micro in range(tc.grad_accum):
                part = slice(micro * tc.micro_batch, (micro + 1) * tc.micro_batch)
                # Under DDP/FSDP, reduce gradients only on the last micro-batch.
                last_micro = micro == tc.grad_accum - 1
                sync_ctx = nullcontext()
                if fsdp:
                    model.set_requires_gradient_sync(last_micro)
                elif d.world > 1 and not last_micro:
                    sync_ctx = model.no_sync()
                with sync_ctx, amp():
                    # Only the loss is kept: holding the returned logits would keep B*T*V
                    # numbers alive through backward for nothing.
                    loss = model(xs[part], ys[part], segments=seg[0][part] if seg else None)[1]
                    loss = loss / tc.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            steps_since_log += 1

            if step % tc.log_interval == 0 or step == tc.max_steps:
                # The only host-device sync of the step, every log_interval steps.
                if d.world > 1:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                train_loss = loss_sum.item() / steps_since_log
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                dt = time.perf_counter() - t_log
                tok_s = tokens_per_step * steps_since_log / dt
                mfu = flops_per_step * steps_since_log / dt / (peak * d.world)
                last = {
                    "step": step,
                    "loss": train_loss,
                    "lr": lr,
                    "grad_norm": float(gn),
                    "tokens": step * tokens_per_step,
                    "tok_per_s": tok_s,
                    "mfu": mfu,
                }
                if log:
                    log.write(**last)
                if not bar.disable:
                    bar.set_postfix(
                        loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", mfu=f"{100 * mfu:.0f}%"
                    )
                loss_sum.zero_()
                t_log, steps_since_log = time.perf_counter(), 0

            if has_val and (step % tc.eval_interval == 0 or step == tc.max_steps):
                val = evaluate()
                last.update(val_loss=val, val_bpb=val / math.log(2) / bpt)
                if val < best_val:  # the same on every process (val is all-reduced)
                    best_val = val
                    save_weights(model, run_dir / "best.safetensors", write=d.master)
                if d.master:
                    log.write(step=step, val_loss=val, val_bpb=last["val_bpb"])
                    plot_loss(run_dir)
                    say(
                        f"step {step}: train loss {last['loss']:.4f}, val loss {val:.4f}, "
                        f"{last['val_bpb']:.3f} bpb, {last['tok_per_s']:,.0f} tok/s"
                    )
                t_log = time.perf_counter()  # keep eval time out of tokens/s

            if step % tc.ckpt_interval == 0 or step == tc.max_steps:
                save_checkpoint(
                    run_dir, step, model, optimizer, scaler, best_val, tc.keep_last, d.master
                )
                if d.world > 1:
                    dist.barrier()
            bar.update(1)
    except KeyboardInterrupt:
        # Steps after the last checkpoint are redone on --resume; the files on disk stay whole.
        say(
            f"interrupted at step {step}; `azllm train ... --resume` continues from the "
            "last checkpoint"
        )
        raise
    finally:
        batches.close()
        bar.close()
        if log:
            log.close()
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return last
