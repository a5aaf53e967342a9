"""Quantization-aware training: a run's weights trained further with GGUF's fake quantization on.

    azllm qat --run RUN --data DATA --type q4_0 --out RUN_QAT [--steps N]

The pretraining loop does the work (precision, accumulation, checkpoints, exact resume); the new
run starts from RUN's weights, with RUN's model and training settings, and `train.qat` set, so
every forward pass sees the weights as llama.cpp will read them from the exported file
(azllm/quant.py) while the optimizer updates the full-precision weights. `azllm export gguf
--run RUN_QAT` then writes that type by default. For a chat run, `azllm sft ... --qat q4_0` does
the same during fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

from azllm.config import Config, apply_overrides, load_run_config
from azllm.errors import AzllmError
from azllm.quant import check_qat
from azllm.shards import read_meta
from azllm.tokenizer import load_tokenizer
from azllm.train import train

# A short, gentle continuation: the model already knows its task, it only has to settle into
# the quantization grid. The peak lr is this fraction of the run's own (a tenth: where the
# run's cosine ended with the default min_lr_ratio), then cosine to 0.
LR_FRACTION = 0.1
STEPS_FRACTION = 0.1  # default --steps: a tenth of the run's max_steps
QAT_DEFAULTS = {"train.min_lr_ratio": 0.0, "train.max_minutes": 0.0}


def qat_config(base: Config, kind: str, steps: int | None, overrides: dict | None) -> Config:
    """The continuation's config: the run's, train.qat = kind ("" only for a control run without
    fake quantization, bench/qat.py), steps, the QAT defaults, then the user's overrides."""
    given = overrides or {}
    tc = base.train
    n = steps if steps is not None else max(1, round(STEPS_FRACTION * tc.max_steps))
    if n < 1:
        raise AzllmError(f"--steps {n}: must be at least 1")
    derived = {
        **QAT_DEFAULTS,
        "train.qat": kind,
        "train.max_steps": n,
        "train.lr": LR_FRACTION * tc.lr,
        "train.warmup_steps": min(tc.warmup_steps, n // 10),
    }
    return apply_overrides(base, {**derived, **given})


def qat(
    base_run: Path,
    data: Path,
    out_run: Path,
    kind: str,
    *,
    steps: int | None = None,
    overrides: dict | None = None,
    resume: bool = False,
    progress: bool = True,
    task_eval=None,
) -> dict:
    """Continue base_run's weights on the token shards in `data`, fake-quantized to kind, into
    out_run; returns the last logged metrics (val_loss/val_bpb, and task scores with task_eval,
    are the quantized model's)."""
    base_run, data, out_run = Path(base_run), Path(data), Path(out_run)
    weights = base_run / "model.safetensors"
    if not weights.exists():
        raise AzllmError(f"--run {base_run}: no model.safetensors; give a run made by azllm train")
    if out_run.resolve() == base_run.resolve():
        raise AzllmError(f"--out {out_run}: is the --run itself; choose a new folder")
    cfg = qat_config(load_run_config(base_run), kind, steps, overrides)
    if kind:  # fail before any work (train() checks again)
        check_qat(cfg.model, kind)
    if not (data / "meta.json").exists():
        raise AzllmError(
            f"--data {data}: not a folder of token shards (no meta.json); azllm qat continues "
            "pretraining on shards made with the run's tokenizer (`azllm tokenize`); for a chat "
            "run use `azllm sft --run BASE --data CHAT --out OUT --qat q4_0`"
        )
    base_tok = load_tokenizer(base_run / "tokenizer.json")
    if read_meta(data).get("tokenizer_sha256") != base_tok.sha256():
        raise AzllmError(
            f"--data {data}: tokenized with another tokenizer than --run {base_run}; "
            f"re-tokenize with {base_run}/tokenizer.json"
        )
    if progress:
        tc = cfg.train
        print(
            f"qat {kind or '(off: control)'}: {tc.max_steps} steps from {weights}, "
            f"lr {tc.lr:.2e} (warmup {tc.warmup_steps}, cosine to {tc.min_lr_ratio:g}x)"
        )
    return train(
        cfg,
        data,
        out_run,
        init_weights=weights,
        resume=resume,
        progress=progress,
        task_eval=task_eval,
    )
