"""Supervised fine-tuning: a pretrained run + dialogues -> a chat run.

The pretraining loop does the work (precision, accumulation, checkpoints, exact resume); only the
data differs: conversations whose targets are the assistant's tokens alone, packed several to a
row (each attending only to itself) so short dialogues do not train on mostly padding.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from azllm.chat.data import ChatBatches, load_conversations
from azllm.config import apply_overrides, load_run_config
from azllm.errors import AzllmError
from azllm.tokenizer import load_tokenizer
from azllm.train import train

# Fine-tuning defaults: short, gentle, no weight decay (the base is already regularised).
SFT_DEFAULTS = {
    "train.optimizer": "adamw",  # whatever the base used: these lrs are AdamW's
    "train.repeat_dropout": 0.0,  # a base recipe's; chat data does not count tokens
    "train.lr": 3e-4,
    "train.warmup_steps": 20,
    "train.min_lr_ratio": 0.0,
    "train.weight_decay": 0.0,
    "train.micro_batch": 8,
    "train.grad_accum": 1,
    "train.eval_interval": 50,
    "train.eval_batches": 8,
    "train.ckpt_interval": 100,
    "train.log_interval": 10,
}


def set_length_from_epochs(tc, rows: int, epochs: float, fit_warmup: bool = True) -> None:
    """max_steps for `epochs` passes over `rows` rows (and warmup at most a tenth of that)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun
    per_step = tc.global_batch or tc.micro_batch * tc.grad_accum * world
    tc.max_steps = max(1, math.ceil(epochs * rows / per_step))
    if fit_warmup:
        tc.warmup_steps = min(tc.warmup_steps, tc.max_steps // 10)


def sft(
    base_run: Path,
    data_paths: list,
    out_run: Path,
    *,
    overrides: dict | None = None,
    resume: bool = False,
    val_fraction: float = 0.1,
    progress: bool = True,
    pack: bool = True,
    epochs: float = 3.0,
    task_eval=None,
) -> dict:
    """Fine-tune base_run's weights on the dialogues in data_paths into out_run.

    Training length: `epochs` passes over the training rows (packed rows when pack), unless
    overrides set train.max_steps. Small chat sets overfit quickly, so a count of passes is a
    better default than a count of steps, which would mean more passes the fewer rows there are.
    """
    if epochs <= 0:
        raise AzllmError(f"--epochs {epochs}: must be positive")
    base_run = Path(base_run)
    weights = base_run / "model.safetensors"
    if not weights.exists():
        raise AzllmError(f"--run {base_run}: no model.safetensors; give a run made by azllm train")
    cfg = apply_overrides(load_run_config(base_run), {**SFT_DEFAULTS, **(overrides or {})})
    tok = load_tokenizer(base_run / "tokenizer.json")
    conversations = load_conversations(data_paths)
    data = ChatBatches(
        conversations,
        tok,
        base_run / "tokenizer.json",
        cfg.model.block_size,
        cfg.train.seed,
        val_fraction,
        label=", ".join(map(str, data_paths)),
        pack=pack,
    )
    if progress:
        block, n = cfg.model.block_size, data.count("train")
        print(
            f"chat data: {n} train / {data.count('val')} held-out "
            f"conversations ({data.trained_tokens('train'):,} trained tokens); "
            f"{data.truncated} cut to the context of {block}"
        )
        if pack:
            unpacked = 1 - data.input_tokens("train") / (n * block)
            print(
                f"packing: {n} rows -> {len(data.rows['train'])} rows of {block} tokens, "
                f"padding {unpacked:.0%} -> {data.padding_fraction('train'):.0%}"
            )
    given = overrides or {}
    if "train.max_steps" not in given:
        fit_warmup = "train.warmup_steps" not in given
        set_length_from_epochs(cfg.train, len(data.rows["train"]), epochs, fit_warmup)
        if progress:
            rows = len(data.rows["train"])
            print(f"{epochs:g} epochs of {rows} rows: {cfg.train.max_steps} steps")
    return train(
        cfg,
        data,
        out_run,
        init_weights=weights,
        resume=resume,
        progress=progress,
        task_eval=task_eval,  # --eval-tasks: accuracy in chat form while fine-tuning
    )
