"""The pretraining loop: one script for a CPU, one small GPU, or many GPUs under torchrun.

    azllm train --config baby --data DATA --out RUN            # one process
    torchrun --nproc_per_node=4 -m azllm.cli train ...          # DDP, same arguments

Read top to bottom: set up processes and device -> data -> model/optimizer -> (resume) -> loop of
{the training step (step.TrainStep), log, eval, checkpoint}.
Every step's batch is a function of the step number (see azllm.batch), so a resumed run
continues exactly where the killed one was, and K processes see the same global batch as one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from azllm.atomic import atomic_write_text
from azllm.batch import BatchSource
from azllm.checkpoint import (
    checkpoint_dirs,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    unwrap,
)
from azllm.config import Config, fill_derived, load_run_config
from azllm.device import (
    DTYPES,
    autocast,
    datasheet_peak,
    measure_matmul_peak,
    resolve_device,
    resolve_precision,
)
from azllm.errors import AzllmError
from azllm.loader import Prefetcher
from azllm.metrics import MetricsLog, plot_loss
from azllm.model import GPT
from azllm.optim import lr_at, make_optimizer
from azllm.quant import apply_qat, check_qat
from azllm.shards import TokenBatches
from azllm.step import TrainStep
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


def shard_fsdp(model: GPT, precision: str) -> None:
    """FSDP2: each block its own shard group, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision != "fp32":  # compute in half precision, reduce gradients in fp32
        mp = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def wrap_model(model: GPT, *, compile_on: bool, ddp: bool) -> torch.nn.Module:
    """What the training step calls: the model compiled and/or under DDP (after the optimizer
    was made on the plain parameters)."""
    if compile_on:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        device = next(model.parameters()).device
        # Gradients live in DDP's all-reduce buckets: no second copy of them.
        model = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    return model


def prepare_run(cfg: Config, meta: dict, label: str, run_dir: Path, resume: bool) -> Config:
    """Take the vocab from the data, check it against an existing run, return the final config."""
    if resume:
        saved = load_run_config(run_dir)
        given = dataclasses.replace(cfg.model, vocab_size=saved.model.vocab_size)
        if given.resolved() != saved.model.resolved():
            raise AzllmError(
                f"{run_dir}/config.json: the model config given differs from the "
                "run's; resume with the same --config and model overrides"
            )
        cfg.model = saved.model
        run_tok = load_tokenizer(run_dir / "tokenizer.json")
        if run_tok.sha256() != meta["tokenizer_sha256"]:
            raise AzllmError(
                f"{label}: tokenized with a different tokenizer than the run "
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


def open_source(data: BatchSource | str | Path, cfg: Config) -> BatchSource:
    """A batch source as given, or the token shards in a data folder."""
    if isinstance(data, str | Path):
        return TokenBatches(Path(data), cfg.model.block_size, cfg.train.seed)
    return data


class _Clock:
    """Training time: wall time minus the pauses for evaluation and checkpoints, so tokens/s and
    MFU measure training alone; `since_start` (pauses included) is what a time budget counts."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.paused = 0.0

    def since_start(self) -> float:
        return time.perf_counter() - self.start

    @contextmanager
    def pause(self):
        """Time spent inside is left out of the next lap."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def lap(self) -> float:
        """Training seconds since the last lap."""
        now = time.perf_counter()
        dt = now - self.mark - self.paused
        self.mark, self.paused = now, 0.0
        return dt


def dropout_at(step: int, tokens_per_step: int, train_tokens: int, cfg: Config) -> float:
    """The dropout rate of `step`: model.dropout, then train.repeat_dropout from the first step
    whose batch repeats data, i.e. once the steps before it drew as many tokens as the training
    split holds. Dropout costs a little over one pass and pays once the data repeats
    (bench/README.md, "Regularising over several passes"); a function of the step resumes
    exactly."""
    repeats = (step - 1) * tokens_per_step >= train_tokens
    return cfg.train.repeat_dropout if cfg.train.repeat_dropout and repeats else cfg.model.dropout


def train(
    cfg: Config,
    data: BatchSource | str | Path,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    init_weights: Path | None = None,
    task_eval=None,
    loss_fn=None,
) -> dict:
    """Train (or resume) on `data` and return the last logged metrics.

    data: a batch.BatchSource (chat data, ...), or a folder of token shards. init_weights starts
    a new run from another run's weights. task_eval (azllm.evaluate.training.TaskEval) logs task
    accuracy at its own interval (--eval-tasks). loss_fn: TrainStep's loss hook (chat.dpo);
    its statistics on the held-out data are logged as val_NAME.
    """
    cfg.validate()
    tc = cfg.train
    if tc.qat:  # before anything is written: a type we can fake-quantize, rows in its blocks
        check_qat(cfg.model, tc.qat)
    d, device = setup_distributed(tc.device)
    precision = resolve_precision(tc.precision, device)
    run_dir = Path(run_dir)
    if resume and not checkpoint_dirs(run_dir):
        raise AzllmError(f"{run_dir}: no checkpoint to resume from")
    if tc.max_minutes and d.world > 1:
        raise AzllmError(
            "train.max_minutes: a time budget is for one process (each process's clock would "
            "stop it at a different step); use train.max_steps under torchrun"
        )
    data = open_source(data, cfg)
    cfg = fill_derived(prepare_run(cfg, data.meta, data.label, run_dir, resume))  # train.lr=0

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

    train_tokens = data.tokens("train") if hasattr(data, "tokens") else 0
    if tc.repeat_dropout and not train_tokens:
        raise AzllmError(
            f"train.repeat_dropout: {data.label} does not say how many tokens one pass holds; "
            "set it to 0 and use model.dropout"
        )

    torch.manual_seed(tc.seed)
    if d.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
        load_tokenizer(data.tokenizer_path).save(run_dir / "tokenizer.json")

    model = GPT(
        cfg.model,
        activation_checkpointing=tc.activation_checkpointing,
        ce_chunk=tc.chunked_ce,
        z_loss=tc.z_loss,
        moe_aux_loss=tc.moe_aux_loss,
        moe_z_loss=tc.moe_z_loss,
    ).to(device)
    if tc.lora_rank:  # base weights in, then frozen under adapters (resume: adapters only)
        from azllm.lora import start_lora

        start_lora(model, tc, init_weights, precision, fsdp=d.world > 1 and tc.strategy == "fsdp")
    if tc.qat:  # GGUF's fake quantization, on the plain modules before FSDP/compile wrap them
        apply_qat(model, tc.qat)
    fsdp = d.world > 1 and tc.strategy == "fsdp"
    if fsdp:  # before the optimizer: it must see the sharded parameters
        shard_fsdp(model, precision)
    optimizer = make_optimizer(model, tc, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start, best_val = 0, float("inf")
    if init_weights is not None and not resume and not tc.lora_rank:
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
    measured_peak = measure_matmul_peak(device, precision)
    vendor_peak = datasheet_peak(device, precision)
    compile_fallback = use_compile(tc.compile, device, fsdp) and tc.compile == "auto"
    model = wrap_model(
        model, compile_on=use_compile(tc.compile, device, fsdp), ddp=d.world > 1 and not fsdp
    )
    # FSDP's mixed-precision policy casts parameters itself; autocast is for the other paths.
    amp_precision = "fp32" if fsdp else precision
    step_fn = TrainStep(
        model,  # as wrapped (compiled, DDP): the step calls what training must call
        optimizer,
        micro_batch=tc.micro_batch,
        grad_accum=tc.grad_accum,
        grad_clip=tc.grad_clip,
        device=device,
        precision=amp_precision,
        scaler=scaler,
        loss_fn=loss_fn,
    )

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
        + (f" | stops after {tc.max_minutes:.1f} min" if tc.max_minutes else "")
    )
    per_rank = tc.micro_batch * tc.grad_accum
    rows = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
    bpt = data.bytes_per_token("val")
    has_val = data.has_split("val")
    if d.master and not has_val:
        print(f"note: {data.label} has no validation data; validation loss is skipped")

    def evaluate() -> tuple[float, dict]:
        model.eval()
        total = torch.zeros((), device=device)
        stats: dict = {}
        mine = slice(d.rank * tc.micro_batch, (d.rank + 1) * tc.micro_batch)
        with torch.no_grad():
            for i in range(tc.eval_batches):
                b = data.batch("val", i, tc.micro_batch * d.world, mine).to(device)
                with autocast(device, amp_precision):
                    if loss_fn is None:
                        total += model(b.inputs, b.targets, segments=b.segments)[1].float()
                    else:
                        loss, got = loss_fn(model, b)
                        total += loss.float()
                        for k, v in got.items():
                            stats[k] = stats.get(k, 0) + v.float()
        for t in (total, *stats.values()) if d.world > 1 else ():
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
        model.train()
        return total.item() / tc.eval_batches, {
            f"val_{k}": v.item() / tc.eval_batches for k, v in stats.items()
        }

    if task_eval is not None:  # tasks are read (and bad files refused) before the first step
        task_eval.load()
        eval_tok = load_tokenizer(run_dir / "tokenizer.json")

    last: dict = {}
    # The batch of step s is batch s-1 of the source (its rows k*n.. for k = 0, 1, ...).
    batches = Prefetcher(
        lambda step: data.batch("train", step - 1, global_batch, rows),
        range(start + 1, tc.max_steps + 1),
        device,
    )
    loss_sum = torch.zeros((), device=device)
    steps_since_log = 0
    clock = _Clock()
    model.train()
    step = start
    rate = cfg.model.dropout  # the model's dropout as built
    suppress = torch._dynamo.config.suppress_errors
    try:
        if compile_fallback:  # chosen for the user: a compiler failure falls back to eager
            torch._dynamo.config.suppress_errors = True
        for step in range(start + 1, tc.max_steps + 1):
            out_of_time = bool(tc.max_minutes) and clock.since_start() >= 60 * tc.max_minutes
            final = step == tc.max_steps or out_of_time
            lr = lr_at(step, tc, clock.since_start())
            if (p := dropout_at(step, tokens_per_step, train_tokens, cfg)) != rate:
                unwrap(model).set_dropout(p)  # compiled: one recompile, at the switch
                rate = p
                if log:
                    log.write(step=step, dropout=p)
                say(f"step {step}: the training data repeats from here; dropout {p:g}")
            loss, grad_norm = step_fn(batches.get(step), lr)
            loss_sum += loss
            steps_since_log += 1

            if step % tc.log_interval == 0 or final:
                # The only host-device sync of the step, every log_interval steps.
                if d.world > 1:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                train_loss = loss_sum.item() / steps_since_log
                gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                dt = clock.lap()  # training time only: evaluation and checkpoints excluded
                flops_s = flops_per_step * steps_since_log / dt
                last = {
                    "step": step,
                    "loss": train_loss,
                    "lr": lr,
                    "grad_norm": float(gn),
                    "tokens": step * tokens_per_step,
                    "tok_per_s": tokens_per_step * steps_since_log / dt,
                    # MFU against the matmul peak measured on this machine at start ...
                    "mfu_vs_measured_peak": flops_s / (measured_peak * d.world),
                }
                if vendor_peak:  # ... and, on a listed GPU, against the datasheet peak
                    last["mfu_vs_datasheet_peak"] = flops_s / (vendor_peak * d.world)
                moe = unwrap(model).moe_aux  # MoE: the last micro-batch's router losses
                if moe is not None:
                    last["moe_balance_loss"], last["moe_router_z"] = moe.tolist()
                if log:
                    log.write(**last)
                if not bar.disable:
                    bar.set_postfix(
                        loss=f"{train_loss:.3f}",
                        tok_s=f"{last['tok_per_s']:,.0f}",
                        mfu_meas=f"{100 * last['mfu_vs_measured_peak']:.0f}%",
                    )
                loss_sum.zero_()
                steps_since_log = 0

            if has_val and (step % tc.eval_interval == 0 or final):
                with clock.pause():
                    val, val_stats = evaluate()
                    val_log = {"val_loss": val, **val_stats}
                    if loss_fn is None:  # a loss hook's loss is not a text loss: no bpb of it
                        val_log["val_bpb"] = val / math.log(2) / bpt
                    last.update(val_log)
                    if val < best_val:  # the same on every process (val is all-reduced)
                        best_val = val
                        save_weights(model, run_dir / "best.safetensors", write=d.master)
                    if d.master:
                        log.write(step=step, **val_log)
                        plot_loss(run_dir)
                        trained = f"train loss {last['loss']:.4f}, " if "loss" in last else ""
                        speed = f", {last['tok_per_s']:,.0f} tok/s" if "tok_per_s" in last else ""
                        bpb = f", {val_log['val_bpb']:.3f} bpb" if "val_bpb" in val_log else ""
                        bpb += "".join(f", {k[4:]} {v:.3f}" for k, v in val_stats.items())
                        say(f"step {step}: {trained}val loss {val:.4f}{bpb}{speed}")

            if task_eval is not None and task_eval.due(step, final) and not fsdp:
                with clock.pause():  # the main process scores; FSDP shards would need all
                    if d.master:
                        scores = task_eval.scores(unwrap(model), eval_tok, amp_precision)
                        log.write(step=step, tasks=scores)
                        plot_loss(run_dir)
                        say(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))

            if step % tc.ckpt_interval == 0 or final:
                with clock.pause():
                    save_checkpoint(
                        run_dir,
                        step,
                        model,
                        optimizer,
                        scaler,
                        best_val,
                        tc.keep_last,
                        d.master,
                    )
                    if d.world > 1:
                        dist.barrier()
            bar.update(1)
            if out_of_time:
                say(f"time budget of {tc.max_minutes:.1f} min reached at step {step}")
                break
    except KeyboardInterrupt:
        # Steps after the last checkpoint are redone on --resume; the files on disk stay whole.
        say(
            f"interrupted at step {step}; `azllm train ... --resume` continues from the "
            "last checkpoint"
        )
        raise
    finally:
        torch._dynamo.config.suppress_errors = suppress
        batches.close()
        bar.close()
        if log:
            log.close()
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return last
