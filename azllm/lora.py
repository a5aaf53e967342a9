"""LoRA (and QLoRA) on the model's linear layers: frozen base weights, small trained adapters.

    y = W x + (alpha / r) * B (A x)        A: [r, in] (Kaiming init), B: [out, r] (zeros)

Adapters are attached to the model's own nn.Linear modules (a forward hook and two submodules,
lora_A and lora_B), so the base keeps its parameter names and loads/saves as before; the one
training step and loop (step.py, train.py) train whatever has requires_grad. A LoRA run
holds the adapters alone, in PEFT's layout, so `PeftModel.from_pretrained(hf_model, RUN)` loads
them onto our HF export (export/hf.py):

    RUN/adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    RUN/adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, base run path
    RUN/best/                      the same for the best validation loss

`azllm merge` folds them into the base weights (W += alpha/r * B A): a plain run again, for
export to HF/GGUF/Ollama. QLoRA keeps the frozen base in bitsandbytes' 4-bit NF4 (CUDA only).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from azllm.errors import AzllmError

# --lora-targets names -> (our module path in a block, HF's/PEFT's)
TARGETS = {
    "q": ("attn.q_proj", "self_attn.q_proj"),
    "k": ("attn.k_proj", "self_attn.k_proj"),
    "v": ("attn.v_proj", "self_attn.v_proj"),
    "o": ("attn.o_proj", "self_attn.o_proj"),
    "gate": ("mlp.gate_proj", "mlp.gate_proj"),
    "up": ("mlp.up_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj", "mlp.down_proj"),
}
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise AzllmError(
            f"--lora-targets {text!r}: {bad[0] if bad else 'empty'} is not a layer; choose from "
            f"{','.join(TARGETS)}"
        )
    return list(dict.fromkeys(names))


def _hook(module: nn.Linear, args, out: torch.Tensor) -> torch.Tensor:
    return out + module.lora_B(module.lora_A(args[0])) * module.lora_scaling


def _targets(model: nn.Module, targets: list[str]):
    """(our name, HF name, module) of every adapted layer; a missing one is refused."""
    found = []
    for i, block in enumerate(model.blocks):
        for t in targets:
            ours, hf = TARGETS[t]
            m = block.get_submodule(ours) if _has(block, ours) else None
            if m is None or not hasattr(m, "weight") or m.weight.dim() != 2:
                raise AzllmError(
                    f"--lora-targets: {t} ({ours}) does not exist in this model "
                    f"(arch={model.cfg.arch}, n_experts={getattr(model.cfg, 'n_experts', 0)})"
                )
            found.append((f"blocks.{i}.{ours}", f"model.layers.{i}.{hf}", m))
    return found


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def quantize_4bit(model: nn.Module, targets: list[str], device: torch.device) -> None:
    """QLoRA: the targeted base layers as bitsandbytes NF4 Linear4bit (CUDA only)."""
    if device.type != "cuda":
        raise AzllmError(
            f"--qlora: 4-bit base weights need a CUDA GPU (bitsandbytes); on {device} use LoRA"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise AzllmError("--qlora needs bitsandbytes: pip install bitsandbytes") from None
    for name, _, m in _targets(model, targets):
        q = bnb.nn.Linear4bit(
            m.in_features,
            m.out_features,
            bias=m.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(
            m.weight.data.to("cpu"), requires_grad=False, quant_type="nf4"
        ).to(device)
        if m.bias is not None:
            q.bias = nn.Parameter(m.bias.data.to(device), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str],
    *,
    base: str = "",
    base_dtype: torch.dtype | None = None,
    qlora: bool = False,
) -> None:
    """Freeze every weight of `model` and attach rank-`rank` adapters to `targets` (in place).

    base_dtype: keep the frozen matrices in this dtype (bf16/fp16 halve their memory; the
    norms and adapters stay fp32). base: the base run's path, recorded for merge and PEFT."""
    if rank <= 0 or alpha <= 0:
        raise AzllmError(f"--lora-rank {rank} / --lora-alpha {alpha}: both must be positive")
    device = model.embed.weight.device
    for p in model.parameters():
        p.requires_grad_(False)
        if base_dtype is not None and p.dim() >= 2:
            p.data = p.data.to(base_dtype)
    if qlora:
        quantize_4bit(model, targets, device)
    for _, _, m in _targets(model, targets):
        m.lora_A = nn.Linear(m.in_features, rank, bias=False, device=device)
        m.lora_B = nn.Linear(rank, m.out_features, bias=False, device=device)
        nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(m.lora_B.weight)  # the adapted model starts as the base
        m.lora_scaling = alpha / rank
        m.lora_handle = m.register_forward_hook(_hook)
    model.lora_settings = {"r": rank, "lora_alpha": alpha, "targets": targets, "base": base}


def start_lora(model: nn.Module, tc, init_weights, precision: str, fsdp: bool = False) -> None:
    """train()'s LoRA set-up: the base run's weights in, then frozen under new adapters (on
    resume the checkpoint then restores the adapters and their optimizer state alone)."""
    from azllm.checkpoint import load_weights

    if init_weights is None:
        raise AzllmError("train.lora_rank: LoRA adapts a base run; use azllm sft --run BASE")
    if tc.qat or fsdp:
        raise AzllmError("train.lora_rank: not with train.qat or strategy fsdp; use one of them")
    load_weights(model, init_weights)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    base = str(Path(init_weights).parent.resolve())
    targets = parse_targets(tc.lora_targets)
    apply_lora(
        model, tc.lora_rank, tc.lora_alpha, targets, base=base, base_dtype=half, qlora=tc.qlora
    )


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's names (fp32, contiguous)."""
    out = {}
    for _, hf, m in _targets(model, model.lora_settings["targets"]):
        for ab in ("lora_A", "lora_B"):
            w = getattr(m, ab).weight.detach().float().cpu().contiguous()
            out[f"base_model.model.{hf}.{ab}.weight"] = w
    return out


def peft_config(settings: dict) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": settings["r"],
        "lora_alpha": settings["lora_alpha"],
        "lora_dropout": 0.0,
        "target_modules": [TARGETS[t][1].split(".")[-1] for t in settings["targets"]],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": settings["base"],
    }


def save_adapters(model: nn.Module, folder: Path) -> None:
    """adapter_model.safetensors + adapter_config.json into folder, each replaced atomically."""
    from safetensors.torch import save_file

    from azllm.atomic import atomic_write_text, temp_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with temp_path(folder / ADAPTER_FILE) as tmp:
        save_file(adapter_state(model), str(tmp), metadata={"format": "pt"})
        tmp.replace(folder / ADAPTER_FILE)
    text = json.dumps(peft_config(model.lora_settings), indent=2)
    atomic_write_text(folder / ADAPTER_CONFIG, text)


def load_adapters(model: nn.Module, folder: Path) -> None:
    """Adapter weights from folder into a model with apply_lora's adapters, strictly."""
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.exists():
        raise AzllmError(f"{folder}: no {ADAPTER_FILE}; give a run made by azllm sft --lora-rank")
    sd = load_file(str(path))
    want = adapter_state(model)
    wrong = [k for k in want if k not in sd or sd[k].shape != want[k].shape]
    extra = sorted(set(sd) - set(want))
    if wrong or extra:
        raise AzllmError(
            f"{path}: adapters do not fit this model ({(wrong or extra)[0]}); the base run or "
            "the LoRA settings in config.json differ from those they were trained with"
        )
    for _, hf, m in _targets(model, model.lora_settings["targets"]):
        for ab in ("lora_A", "lora_B"):
            getattr(m, ab).weight.data.copy_(sd[f"base_model.model.{hf}.{ab}.weight"])


def merge_lora(model: nn.Module) -> None:
    """W += alpha/r * B A in every adapted layer, adapters removed: a plain model again."""
    for _, _, m in _targets(model, model.lora_settings["targets"]):
        delta = m.lora_B.weight.float() @ m.lora_A.weight.float() * m.lora_scaling
        m.weight.data = (m.weight.data.float() + delta).to(m.weight.dtype)
        m.lora_handle.remove()
        del m.lora_A, m.lora_B, m.lora_scaling, m.lora_handle
    del model.lora_settings
    for p in model.parameters():
        p.requires_grad_(True)


def read_lora_run(run_dir: Path, weights: str = "model") -> tuple[dict, Path]:
    """(adapter_config, base run) of a LoRA run; weights="best": its best/ adapters."""
    run_dir = Path(run_dir)
    folder = run_dir / "best" if weights == "best" else run_dir
    path = folder / ADAPTER_CONFIG
    try:
        acfg = json.loads(path.read_text(encoding="utf-8"))
        base = Path(acfg["base_model_name_or_path"])
        return acfg, base
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AzllmError(f"{path}: unreadable ({str(e)[:100]}); is this a LoRA run?") from None


def load_merged(run_dir: Path, device="cpu", weights: str = "model", base: Path | None = None):
    """(model with the adapters merged, tokenizer, config) of a LoRA run, as load_run returns:
    generate/chat/eval/export work on a LoRA run directly. base: another copy of the base run.
    A base of another model (config or tokenizer) is refused in one line."""
    import dataclasses

    from azllm.checkpoint import load_weights
    from azllm.config import load_run_config
    from azllm.model import GPT
    from azllm.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    acfg, recorded = read_lora_run(run_dir, weights)
    base = Path(base) if base is not None else recorded
    if not (base / "config.json").exists():
        raise AzllmError(
            f"{run_dir}: its base run {base} is gone; pass --base with a copy of that run"
        )
    cfg, base_cfg = load_run_config(run_dir), load_run_config(base)
    a, b = (
        dataclasses.replace(c.model.resolved(), dropout=0.0, block_size=0) for c in (cfg, base_cfg)
    )
    if a != b:
        diff = [f"{k}={v!r}" for k, v in dataclasses.asdict(b).items() if getattr(a, k) != v]
        raise AzllmError(
            f"--base {base}: a run of another model than the one {run_dir} was trained on "
            f"({', '.join(diff[:3])}); give the base run its adapters were trained on"
        )
    tok = load_tokenizer(run_dir / "tokenizer.json")
    if tok.sha256() != load_tokenizer(base / "tokenizer.json").sha256():
        raise AzllmError(
            f"--base {base}: its tokenizer differs from {run_dir}'s; give the base run its "
            "adapters were trained on"
        )
    model = GPT(cfg.model)
    load_weights(model, base / "model.safetensors", tokenizer_sha256=tok.sha256())
    rank, alpha = int(acfg.get("r", 0)), float(acfg.get("lora_alpha", 0))
    names = {v[1].split(".")[-1]: k for k, v in TARGETS.items()}
    targets = [names.get(t, t) for t in acfg.get("target_modules", [])]
    apply_lora(model, rank, alpha, parse_targets(",".join(targets)), base=str(base))
    load_adapters(model, run_dir / "best" if weights == "best" else run_dir)
    merge_lora(model)
    return model.to(device).eval(), tok, cfg


def merge_run(run_dir: Path, out: Path, *, base: Path | None = None, force: bool = False) -> Path:
    """`azllm merge`: a LoRA run's adapters folded into its base's weights, as a plain run."""
    from azllm.atomic import atomic_dir, atomic_write_text
    from azllm.checkpoint import save_weights
    from azllm.export import check_out_dir

    out = Path(out)
    check_out_dir(out, force)
    model, tok, cfg = load_merged(run_dir, "cpu", base=base)
    cfg.train.lora_rank = 0  # the merged run is a plain one
    with atomic_dir(out, replace=True) as tmp:
        atomic_write_text(tmp / "config.json", json.dumps(cfg.to_dict(), indent=2))
        tok.save(tmp / "tokenizer.json")
        save_weights(model, tmp / "model.safetensors")
    return out
