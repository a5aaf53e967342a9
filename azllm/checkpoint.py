"""Checkpoints and run-directory files.

RUN/checkpoints/step-N/model.safetensors   full weights (a tied lm_head is stored once, as
                                           embed.weight)
RUN/checkpoints/step-N/state.pt            optimizer state keyed by parameter name, grad scaler,
                                           RNG states, step, best val loss: tensors and plain
                                           numbers only, so it loads with weights_only=True
Each step-N folder is written under a temporary name and renamed when complete, so a kill at any
moment leaves the previous checkpoints intact. RUN/model.safetensors (latest) and
RUN/best.safetensors (lowest validation loss) are replaced atomically the same way.

States go through torch.distributed.checkpoint.state_dict, which gathers FSDP shards into full
tensors (collective: every process calls, rank 0 writes) and works the same on a plain model. So
a checkpoint is independent of the strategy and the number of processes that wrote it: a run
saved by 2 FSDP processes resumes on 1, or on 8 under DDP. (The gather holds the full state on
rank 0's CPU — right for models up to a few billion parameters, not beyond.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from azllm.atomic import atomic_dir
from azllm.errors import AzllmError

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL = StateDictOptions(full_state_dict=True, strict=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT inside DDP/torch.compile wrappers (FSDP2 shards the GPT in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def _tied(model: torch.nn.Module) -> bool:
    return bool(getattr(unwrap(model).cfg, "tie_embeddings", False))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full weights on CPU (collective under FSDP), a tied lm_head left out."""
    sd = get_model_state_dict(unwrap(model), options=_GATHER)
    if _tied(model):
        sd.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in sd.items()}


def _write_safetensors(sd: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(sd, str(tmp))
    tmp.replace(path)


def save_weights(model: torch.nn.Module, path: Path, write: bool = True) -> None:
    """Write safetensors atomically. Under FSDP every process calls; pass write=rank==0."""
    sd = model_state(model)
    if write:
        _write_safetensors(sd, Path(path))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    path = Path(path)
    if not path.exists():
        raise AzllmError(f"{path}: weights file not found")
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AzllmError(
            f"{path}: truncated or corrupt weights ({str(e).splitlines()[0]}); "
            "use another checkpoint or retrain"
        ) from None
    if _tied(model) and "embed.weight" in sd:
        sd["lm_head.weight"] = sd["embed.weight"]
    try:
        set_model_state_dict(unwrap(model), sd, options=_FULL)
    except (RuntimeError, KeyError, ValueError) as e:
        raise AzllmError(
            f"{path}: weights do not fit this model's config ({str(e).splitlines()[0][:200]})"
        ) from None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name))
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scaler,
    best_val: float,
    keep_last: int,
    write: bool = True,
) -> Path:
    """Every process calls (the gather is collective); only write=True writes."""
    weights = model_state(model)
    state = {
        "step": step,
        "best_val_loss": best_val,
        "optimizer": get_optimizer_state_dict(unwrap(model), optimizer, options=_GATHER),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    target = Path(run_dir) / "checkpoints" / f"step-{step}"
    if not write:
        return target
    with atomic_dir(target, replace=True) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
    # RUN/model.safetensors: the latest weights, for generate/eval/export.
    _write_safetensors(weights, Path(run_dir) / "model.safetensors")
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(ckpt_dir: Path, model, optimizer, scaler) -> dict:
    """Restore model/optimizer/scaler/RNG in place; returns {"step", "best_val_loss"}."""
    ckpt_dir = Path(ckpt_dir)
    load_weights(model, ckpt_dir / "model.safetensors")
    try:
        state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AzllmError(
            f"{ckpt_dir}: state.pt is missing; delete this checkpoint folder to "
            "resume from the one before"
        ) from None
    except Exception as e:  # zip/unpickling errors for a truncated file vary by torch version
        raise AzllmError(
            f"{ckpt_dir / 'state.pt'}: truncated or corrupt ({str(e).splitlines()[0]})"
            "; delete this checkpoint folder to resume from the one before"
        ) from None
    set_optimizer_state_dict(unwrap(model), optimizer, state["optimizer"], options=_FULL)
    if scaler is not None and scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return {"step": int(state["step"]), "best_val_loss": float(state["best_val_loss"])}


def load_run(run_dir: Path, device: torch.device | str = "cpu", weights: str = "model"):
    """(model in eval mode, tokenizer, config) from a run directory; needs nothing else."""
    from azllm.config import load_run_config
    from azllm.model import GPT
    from azllm.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AzllmError(f"--run {run_dir}: no such run directory")
    cfg = load_run_config(run_dir)
    tok = load_tokenizer(run_dir / "tokenizer.json")
    if tok.vocab_size != cfg.model.vocab_size:
        raise AzllmError(
            f"{run_dir}: tokenizer.json has {tok.vocab_size} tokens but the model "
            f"was built for {cfg.model.vocab_size}; put the run's own tokenizer back"
        )
    if weights not in ("model", "best"):
        raise AzllmError(f"--weights {weights}: use 'model' (latest) or 'best'")
    model = GPT(cfg.model)
    load_weights(model, run_dir / f"{weights}.safetensors")
    return model.to(device).eval(), tok, cfg
