"""Checkpoints and run-directory files.

RUN/checkpoints/step-N/            one checkpoint, for --resume:
    .metadata, __R_0.distcp        model and optimizer state in torch.distributed.checkpoint (DCP)
                                   format: every process writes only the shards it owns
    trainer.pt                     step, best val loss, grad scaler, RNG states, who wrote it
                                   (tensors and plain values only: loads with weights_only=True)
RUN/model.safetensors              the latest full weights, for generate/eval/export/sft
RUN/best.safetensors               the weights with the lowest validation loss

A checkpoint is written into .step-N.tmp and renamed when every process has finished its part,
so a kill at any moment leaves the earlier checkpoints intact; the .safetensors files are
replaced atomically the same way.

Why DCP: under FSDP nobody holds the whole optimizer state (2x the weights in fp32), and DCP
lets each process write its own piece in parallel. On load DCP reads whatever pieces the
current layout needs, so a checkpoint is independent of the strategy and process count that
wrote it: saved by 2 FSDP processes, it resumes on 1, or on 8 under DDP. Replicated (DDP)
tensors are written once. For a multi-node run, RUN must be on a filesystem every node sees.
DCP files are for resuming with the same PyTorch release; the .safetensors weights are the
portable artefact.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from azllm.atomic import move_dir_into_place, short_write, temp_path, write_error, writing
from azllm.config import resolve_sizes
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


# What a weights file records about the model it belongs to (safetensors metadata, strings):
# the model config it was trained with and the sha256 of its run's tokenizer. A config.json or
# tokenizer.json edited or swapped afterwards is then caught even where every tensor shape
# still fits (n_head 6 -> 4 keeps q_proj n_embd x n_embd; a same-size tokenizer keeps the
# embedding's shape).
CONFIG_KEY = "azllm_model_config"
TOKENIZER_KEY = "tokenizer_sha256"
# Fields that do not change what the weights compute: SFT may raise dropout, and a llama run
# may be given a longer context (gpt2's position table is shape-checked anyway).
_FREE_FIELDS = {"dropout", "block_size"}


def _model_config_json(model: torch.nn.Module) -> str:
    return json.dumps(dataclasses.asdict(unwrap(model).cfg), sort_keys=True)


def _tokenizer_sha256(path: Path) -> str | None:
    from azllm.tokenizer import load_tokenizer

    return load_tokenizer(path).sha256() if path.exists() else None


def _weights_metadata(model: torch.nn.Module, run_dir: Path) -> dict[str, str]:
    """Metadata for a run's weights file; the run's tokenizer.json is written before any
    weights (train.py), so it is the tokenizer these weights were trained with."""
    meta = {"format": "pt", CONFIG_KEY: _model_config_json(model)}
    try:
        sha = _tokenizer_sha256(Path(run_dir) / "tokenizer.json")
    except AzllmError:  # damaged meanwhile: save the weights all the same, unrecorded
        sha = None
    if sha:
        meta[TOKENIZER_KEY] = sha
    return meta


def _write_safetensors(sd: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    # a full disk is SafetensorError (StorageFull), not OSError: one line, the temporary removed
    with writing(path, errors=(SafetensorError,)), temp_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
        tmp.replace(path)


def save_weights(model: torch.nn.Module, path: Path, write: bool = True) -> None:
    """Write safetensors atomically. Under FSDP every process calls; pass write=rank==0."""
    if _lora(model):  # a LoRA run keeps its adapters alone: RUN/ (model) or RUN/best/
        if write:
            _save_lora(model, Path(path))
        return
    sd = model_state(model)
    if write:
        path = Path(path)
        _write_safetensors(sd, path, _weights_metadata(model, path.parent))


def _lora(model: torch.nn.Module) -> bool:
    return hasattr(unwrap(model), "lora_settings")  # set by azllm.lora.apply_lora


def _save_lora(model: torch.nn.Module, path: Path) -> None:
    from azllm.lora import save_adapters

    with writing(path, errors=(SafetensorError,)):
        save_adapters(unwrap(model), path.parent / "best" if path.stem == "best" else path.parent)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise AzllmError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise AzllmError(
            f"{path}: truncated or corrupt weights ({str(e).splitlines()[0]}); "
            "use another checkpoint or retrain"
        ) from None


def _short(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_model_config(recorded: str | None, model: torch.nn.Module, where: Path) -> None:
    """The model config recorded with the weights must be the one the model is built from."""
    if not recorded:
        return  # weights written before azllm recorded it: the shape check still applies
    try:
        saved = json.loads(recorded)
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict):
        raise AzllmError(f"{where}: corrupt {CONFIG_KEY} metadata; retrain or re-save")
    saved, now = resolve_sizes(saved), dataclasses.asdict(unwrap(model).cfg.resolved())
    diff = [
        f"{k}={now[k]!r} (weights: {saved[k]!r})"
        for k in sorted(set(saved) & set(now) - _FREE_FIELDS)
        if saved[k] != now[k]
    ]
    if diff:
        raise AzllmError(
            f"{where}: config.json does not match the config these weights were trained with: "
            f"{_short(diff)}; put the run's own config.json back"
        )


def check_tensors(sd: dict[str, torch.Tensor], model: torch.nn.Module, where: Path) -> None:
    """Every tensor the model needs, of the right shape, and nothing else (a config with more
    layers, or an untied lm_head, would otherwise leave those weights at random init)."""
    inner = unwrap(model)
    # DTensor.shape (FSDP2) is the full shape, so this holds on a sharded model too
    want = {k: tuple(v.shape) for k, v in inner.state_dict().items()}
    if _tied(model):
        want.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {want[k]}"
        for k in sorted(set(want) & set(sd))
        if tuple(sd[k].shape) != want[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {_short(missing)}")
    if extra:
        problems.append(f"not in the model {_short(extra)}")
    if wrong:
        problems.append(f"wrong shape {_short(wrong)}")
    if problems:
        raise AzllmError(
            f"{where}: weights do not fit the model config.json describes "
            f"({'; '.join(problems)}); put the run's own config.json back"
        )


def load_weights(model: torch.nn.Module, path: Path, tokenizer_sha256: str | None = None) -> None:
    """Load a weights file strictly: the one check every command that builds a model from
    files goes through (generate, chat, serve, eval, export via load_run; SFT init).

    tokenizer_sha256: the tokenizer the weights will be used with; by default the
    tokenizer.json beside the weights file, when there is one."""
    path = Path(path)
    sd, meta = _read_safetensors(path)
    check_model_config(meta.get(CONFIG_KEY), model, path)
    check_tensors(sd, model, path)
    recorded = meta.get(TOKENIZER_KEY)
    if recorded:
        if tokenizer_sha256 is None:
            tokenizer_sha256 = _tokenizer_sha256(path.parent / "tokenizer.json")
        if tokenizer_sha256 is not None and tokenizer_sha256 != recorded:
            raise AzllmError(
                f"{path}: trained with a different tokenizer than {path.parent}/tokenizer.json "
                f"(sha256 {recorded[:12]}, that file {tokenizer_sha256[:12]}); put the run's "
                "own tokenizer.json back"
            )
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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dcp(fn, state: dict, path: Path, **kw) -> None:
    """dcp.save/dcp.load; without a process group DCP warns each time that it assumes a single
    process, which is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        fn(state, checkpoint_id=path, no_dist=not _distributed(), **kw)


# DCP reads two things with plain pickle: .metadata, and non-tensor values (the optimizer's
# hyper-parameters) with torch.load(weights_only=False). A checkpoint can come from someone else
# ("continue from my step-5000"), so both are first read with an allow-list that only builds
# data, and a file that asks for anything else is refused before pickle runs it.
_METADATA_CLASSES = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


def _is_metadata_class(module: str, name: str) -> bool:
    """A class defined in DCP's metadata module (not a function, nor a module it imports)."""
    if module != "torch.distributed.checkpoint.metadata" or "." in name:
        return False
    obj = getattr(importlib.import_module(module), name, None)
    return isinstance(obj, type) and obj.__module__ == module


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (
            (module, name) in _METADATA_CLASSES
            or _is_metadata_class(module, name)
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


def _check_metadata(ckpt_dir: Path) -> None:
    """Read .metadata with the allow-list before DCP reads it with plain pickle."""
    try:
        with open(ckpt_dir / ".metadata", "rb") as f:
            _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise AzllmError(
            f"{ckpt_dir}: .metadata is missing; delete this checkpoint folder to resume from the "
            "one before"
        ) from None
    except Exception as e:  # truncated, or asks for something it may not
        raise _corrupt(ckpt_dir / ".metadata", e) from None


class _CheckedPlanner(dcp.DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        torch.load(value, weights_only=True)  # raises on anything but plain data
        value.seek(0)
        super().load_bytes(read_item, value)


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
    """Every process calls and writes its own shards; write=True (rank 0) finishes the folder."""
    run_dir = Path(run_dir)
    target = run_dir / "checkpoints" / f"step-{step}"
    tmp = target.with_name(f".{target.name}.tmp")
    if write:
        # left by runs killed mid-save (one writer per run: none of these is being written)
        for stale in tmp.parent.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        with writing(target):
            tmp.mkdir(parents=True)
    if _distributed():
        dist.barrier()  # the folder exists before anyone writes into it
    try:
        weights = _write_checkpoint(tmp, target, step, model, optimizer, scaler, best_val, write)
    except BaseException as e:
        failure = _write_failure(e)
        if write:  # nothing half-written stays (a killed process's is swept by the next save)
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is None:
            raise
        raise write_error(target, failure) from None
    if not write:
        return target
    final = run_dir / "model.safetensors"
    if weights is None:
        _save_lora(model, final)
    else:
        _write_safetensors(weights, final, _weights_metadata(model, run_dir))
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _write_checkpoint(
    tmp: Path, target: Path, step: int, model, optimizer, scaler, best_val: float, write: bool
) -> dict | None:
    """The checkpoint's files into `tmp`, renamed to `target` (rank 0); returns the full weights
    for RUN/model.safetensors (None for LoRA, whose adapters are written instead)."""
    msd, osd = get_state_dict(unwrap(model), optimizer, options=_frozen_out(model))
    # Returns on rank 0 only after every process has written its files and rank 0 the metadata.
    _dcp(dcp.save, {"model": msd, "optimizer": osd}, tmp)
    # full weights for RUN/model.safetensors (collective); LoRA: the adapters, written later
    weights = None if _lora(model) else model_state(model)
    if not write:
        return weights
    trainer = {
        "step": step,
        "best_val_loss": best_val,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "world_size": dist.get_world_size() if _distributed() else 1,
        "model_config": _model_config_json(model),
    }
    torch.save(trainer, tmp / "trainer.pt")
    move_dir_into_place(tmp, target)  # a re-run of the same step replaces it only now
    return weights


def _write_failure(e: BaseException) -> BaseException | None:
    """The filesystem's refusal behind a failed checkpoint write (a full disk...), or None for
    anything else. DCP wraps each process's error in a CheckpointException (a BaseException)."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError) or (isinstance(e, RuntimeError) and short_write(e)):
        return e
    return None


def _frozen_out(model) -> StateDictOptions | None:
    """LoRA: checkpoints hold the trained adapters only, not the frozen base (its own run)."""
    return StateDictOptions(ignore_frozen_params=True, strict=False) if _lora(model) else None


def _corrupt(path: Path, e: Exception) -> AzllmError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
    return AzllmError(
        f"{path}: truncated or corrupt ({first}); delete this checkpoint folder to resume from "
        "the one before"
    )


def load_checkpoint(ckpt_dir: Path, model, optimizer, scaler) -> dict:
    """Restore model/optimizer/scaler/RNG in place (every process calls); returns
    {"step", "best_val_loss"}. DCP reshards to the current strategy and process count."""
    ckpt_dir = Path(ckpt_dir)
    trainer = _load_trainer(ckpt_dir / "trainer.pt")
    check_model_config(trainer.get("model_config"), model, ckpt_dir)
    _check_metadata(ckpt_dir)
    msd, osd = get_state_dict(unwrap(model), optimizer, options=_frozen_out(model))
    state = {"model": msd, "optimizer": osd}
    try:
        _dcp(dcp.load, state, ckpt_dir, planner=_CheckedPlanner())
    except CheckpointException as e:  # per-rank failures (a BaseException): show the first
        raise _corrupt(ckpt_dir, next(iter(e.failures.values()))[0]) from None
    except Exception as e:
        raise _corrupt(ckpt_dir, e) from None
    set_state_dict(
        unwrap(model),
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=_frozen_out(model),
    )
    if scaler is not None and scaler.is_enabled() and trainer["scaler"]:
        scaler.load_state_dict(trainer["scaler"])
    torch.set_rng_state(trainer["rng_cpu"])
    if trainer["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng_cuda"])
    return {"step": int(trainer["step"]), "best_val_loss": float(trainer["best_val_loss"])}


def _load_trainer(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AzllmError(
            f"{path.parent}: {path.name} is missing; delete this checkpoint folder to "
            "resume from the one before"
        ) from None
    except Exception as e:  # zip/unpickling errors for a truncated file vary by torch version
        raise _corrupt(path, e) from None


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
    # an imported model (tok.chat) may pad its embedding past the tokenizer (Qwen2: to x128)
    padded = tok.chat is not None and tok.vocab_size < cfg.model.vocab_size
    if tok.vocab_size != cfg.model.vocab_size and not padded:
        raise AzllmError(
            f"{run_dir}: tokenizer.json has {tok.vocab_size} tokens but the model "
            f"was built for {cfg.model.vocab_size}; put the run's own tokenizer back"
        )
    if weights not in ("model", "best"):
        raise AzllmError(f"--weights {weights}: use 'model' (latest) or 'best'")
    if (run_dir / "adapter_config.json").exists():  # a LoRA run: its base + its adapters
        from azllm.lora import load_merged

        return load_merged(run_dir, device, weights)
    model = GPT(cfg.model)
    load_weights(model, run_dir / f"{weights}.safetensors", tokenizer_sha256=tok.sha256())
    return model.to(device).eval(), tok, cfg
