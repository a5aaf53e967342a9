"""Model and training configuration: plain dataclasses, presets, TOML files and overrides.

A config is resolved in three layers, each overriding the one before:
preset (or TOML file) -> command-line overrides -> facts from the data (vocab size).
This file never imports torch, so `azllm plan`/`model summary` arguments can be checked cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from azllm.errors import AzllmError

ARCHS = ("llama", "gpt2")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZER_STATES = ("fp32", "bf16", "8bit")
OPTIMIZERS = ("adamw", "muon")
# Muon orthogonalises same-shape matrices in stacks of at most this many elements (optim.Muon):
# batched products instead of one small one per matrix (baby's 42 matrices: 0.22 s a step one by
# one, 0.12 s in 3 whole stacks, on this project's CPU), in bounded memory: the step's temporaries
# are 20-22 bytes per stacked element (measured; memory.py counts them), ~22 MB at any model size.
MUON_STACK_ELEMENTS = 1 << 20
STRATEGIES = ("ddp", "fsdp")
# train.qat: the GGUF types azllm can fake-quantize exactly (azllm/quant.py); "" = off
QAT_TYPES = ("q8_0", "q4_0")


@dataclass
class ModelConfig:
    arch: str = (
        "llama"  # "llama": RoPE, RMSNorm, SwiGLU, no biases; "gpt2": learned pos, LayerNorm, GELU
    )
    vocab_size: int = 8192
    block_size: int = 192  # context length in tokens
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int = 0  # grouped-query attention: 0 means n_head (plain multi-head)
    n_embd: int = 384
    ffn_hidden: int = 0  # 0: 4*n_embd for gpt2, ~8/3*n_embd rounded to 64 for llama
    rope_theta: float = 10000.0
    # {} or Llama 3.1's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (imported models: hf_import.py)
    rope_scaling: dict = field(default_factory=dict)
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = True
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (Qwen3's layout)
    qkv_bias: bool = False  # biases on q/k/v projections (Qwen2's layout; llama only)
    logit_softcap: float = 0.0  # >0: logits = c * tanh(logits / c) (training and generation)
    # Mixture of experts (llama only, Mixtral's layout): n_experts > 0 replaces every block's
    # SwiGLU MLP by n_experts SwiGLU experts of width expert_ffn_dim, experts_per_token per token
    n_experts: int = 0
    experts_per_token: int = 2
    expert_ffn_hidden: int = 0  # 0: ffn_dim (the dense MLP's width)

    # n_kv_head and ffn_hidden keep what the user wrote (0: derive), so a config saved and read
    # back, or overridden (--set model.n_embd=512), derives again from the values it holds.
    # Everything that needs the sizes reads these properties.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.arch == "gpt2":
            return 4 * self.n_embd
        # SwiGLU has three matrices: 2/3 of 4x keeps the parameter count of a 4x MLP
        return 64 * ((8 * self.n_embd // 3 + 63) // 64)

    @property
    def expert_ffn_dim(self) -> int:
        return self.expert_ffn_hidden or self.ffn_dim

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def resolved(self) -> ModelConfig:
        """A copy with the derived sizes written out: two configs that build the same model
        compare equal (an old run's config.json holds them explicitly, a new one 0)."""
        return dataclasses.replace(self, n_kv_head=self.kv_heads, ffn_hidden=self.ffn_dim)

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise AzllmError(f"model.arch: unknown architecture {self.arch!r}; use one of {ARCHS}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise AzllmError(f"model.{name} must be a positive integer")
        if self.n_embd % self.n_head:
            raise AzllmError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.n_kv_head < 0 or self.ffn_hidden < 0:
            raise AzllmError("model.n_kv_head and model.ffn_hidden must be 0 (derive) or positive")
        if self.n_head % self.kv_heads:
            raise AzllmError(
                f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head "
                f"({self.kv_heads})"
            )
        if self.arch == "llama" and self.head_dim % 2:
            raise AzllmError("model: RoPE needs an even head size (n_embd / n_head)")
        if self.arch == "gpt2" and self.kv_heads != self.n_head:
            raise AzllmError("model.n_kv_head: grouped-query attention needs arch='llama'")
        keys = {"rope_type", "factor", "low_freq_factor", "high_freq_factor"}
        keys.add("original_max_position_embeddings")
        if self.rope_scaling and (
            self.rope_scaling.get("rope_type") != "llama3" or set(self.rope_scaling) != keys
        ):
            raise AzllmError(f"model.rope_scaling: {{}} or llama3's {sorted(keys)}")
        if self.arch == "gpt2" and self.qkv_bias:
            raise AzllmError("model.qkv_bias is for arch='llama' (gpt2 has biases everywhere)")
        if self.arch == "gpt2" and self.qk_norm:
            raise AzllmError(
                "model.qk_norm needs arch='llama' (RMSNorm heads, Qwen3's layout); the presets "
                "from baby up turn it on: add model.qk_norm=false"
            )
        if self.logit_softcap < 0:
            raise AzllmError("model.logit_softcap must be 0 (off) or positive, e.g. 15.0")
        if not 0.0 <= self.dropout < 1.0:
            raise AzllmError("model.dropout must be in [0, 1)")
        if self.n_experts < 0 or self.expert_ffn_hidden < 0 or self.experts_per_token < 1:
            raise AzllmError(
                "model.n_experts and model.expert_ffn_hidden must be 0 or positive, "
                "model.experts_per_token at least 1"
            )
        if self.n_experts and self.experts_per_token > self.n_experts:
            raise AzllmError(
                f"model.experts_per_token ({self.experts_per_token}) exceeds model.n_experts "
                f"({self.n_experts}); use at most {self.n_experts}"
            )
        if self.n_experts and self.arch != "llama":
            raise AzllmError("model.n_experts needs arch='llama' (Mixtral's SwiGLU experts)")


@dataclass
class TrainConfig:
    micro_batch: int = 8  # sequences per forward/backward on one process
    grad_accum: int = 4  # micro-batches per optimizer step
    global_batch: int = 0  # sequences per step over all processes; 0: micro_batch*grad_accum*world
    max_steps: int = 2000
    max_minutes: float = 0.0  # >0: also stop after this much training wall time (one process)
    lr: float = 0.0  # AdamW's peak lr; 0: derived from the width and optimizer (derived_lr)
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak lr (same schedule shape as lr); width-independent
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # Muon's matrices: p *= 1 - lr * this, following the schedule
    repeat_dropout: float = 0.0  # >0: dropout at this rate once the data repeats (2nd pass on)
    z_loss: float = 0.0  # >0: adds z_loss * mean(logsumexp(logits)^2) to the training loss
    moe_aux_loss: float = 0.01  # n_experts > 0: load-balancing loss coefficient (Switch's 0.01)
    moe_z_loss: float = 0.0  # n_experts > 0: router z-loss coefficient (ST-MoE: 0.001)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = -1  # -1: derived from the optimizer and beta2 (derived_warmup)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: str = "auto"  # auto (on CUDA with Triton, off on CPU) | on | off; see train.py
    activation_checkpointing: bool = False
    chunked_ce: int = 0  # >0: cross-entropy over this many tokens at a time, logits recomputed
    optimizer_state: str = "fp32"  # fp32 | bf16 (half the memory) | 8bit (bitsandbytes, CUDA)
    strategy: str = "ddp"  # under torchrun: ddp (replicate) | fsdp (shard per block, FSDP2)
    eval_interval: int = 100
    eval_batches: int = 20
    log_interval: int = 10
    ckpt_interval: int = 500
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    qat: str = ""  # q8_0 | q4_0: train with that GGUF type's fake quantization (azllm/quant.py)
    lora_rank: int = 0  # >0: LoRA adapters of this rank on frozen base weights (azllm/lora.py)
    lora_alpha: float = 16.0  # adapters' scale is lora_alpha / lora_rank
    lora_targets: str = "q,k,v,o,gate,up,down"  # the layers adapted (lora.TARGETS)
    qlora: bool = False  # LoRA on a 4-bit NF4 base (bitsandbytes, CUDA only)

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise AzllmError(f"train.precision: {self.precision!r} is not one of {PRECISIONS}")
        for name in (
            "micro_batch",
            "grad_accum",
            "max_steps",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "ckpt_interval",
            "keep_last",
        ):
            if getattr(self, name) <= 0:
                raise AzllmError(f"train.{name} must be a positive integer")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise AzllmError(
                f"train.optimizer_state: {self.optimizer_state!r} is not one of {OPTIMIZER_STATES}"
            )
        if self.compile not in ("auto", "on", "off"):
            raise AzllmError(f"train.compile: {self.compile!r} is not one of auto, on, off")
        if self.strategy not in STRATEGIES:
            raise AzllmError(f"train.strategy: {self.strategy!r} is not one of {STRATEGIES}")
        if self.chunked_ce < 0:
            raise AzllmError("train.chunked_ce must be 0 (off) or a positive number of tokens")
        if self.lr < 0 or self.muon_lr <= 0:
            raise AzllmError(
                "train.lr must be positive (or 0: derived from the model width); "
                "train.muon_lr must be positive"
            )
        if self.optimizer not in OPTIMIZERS:
            raise AzllmError(f"train.optimizer: {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.optimizer == "muon" and self.optimizer_state == "8bit":
            raise AzllmError(
                "train.optimizer_state = '8bit' is for AdamW; with muon use 'fp32' or 'bf16'"
            )
        if not 0.0 <= self.muon_momentum < 1.0 or self.z_loss < 0:
            raise AzllmError("train.muon_momentum must be in [0, 1), train.z_loss >= 0")
        if self.weight_decay < 0 or self.muon_weight_decay < 0:
            raise AzllmError(
                "train.weight_decay and train.muon_weight_decay must be 0 (off) or positive"
            )
        if not 0.0 <= self.repeat_dropout < 1.0:
            raise AzllmError("train.repeat_dropout must be in [0, 1) (0: off)")
        if self.max_minutes < 0:
            raise AzllmError("train.max_minutes must be 0 (no time limit) or positive")
        if self.moe_aux_loss < 0 or self.moe_z_loss < 0:
            raise AzllmError("train.moe_aux_loss and train.moe_z_loss must be 0 (off) or positive")
        if self.lora_rank < 0 or self.lora_alpha <= 0 or (self.qlora and not self.lora_rank):
            raise AzllmError(
                "train.lora_rank must be 0 (off) or positive, train.lora_alpha positive; "
                "train.qlora needs train.lora_rank > 0"
            )
        if self.warmup_steps < -1 or self.global_batch < 0:
            raise AzllmError(
                "train.warmup_steps must be -1 (derived), 0 or positive; "
                "train.global_batch must not be negative"
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()

    def peak_model(self) -> ModelConfig:
        """The model as it trains at its most memory-hungry: with train.repeat_dropout, dropout
        turns on part-way (CPU attention then takes the math path), so plans count it."""
        p = max(self.model.dropout, self.train.repeat_dropout)
        return dataclasses.replace(self.model, dropout=p)


# The training recipe of `baby` and up: Muon for the blocks' matrices, QK-norm, and dropout 0.1
# once the data repeats. Measured at baby's shape against nanoGPT's model.py (bench/README.md,
# "Recipe comparison", "Regularising over several passes"): held-out bpb 0.91x at equal tokens
# over 2.6 passes (0.86x over one), and ahead of AdamW at equal wall time on a CPU. `tiny` keeps
# AdamW (the tests' thresholds were measured with it); fine-tuning (sft, dpo) sets AdamW and no
# repeat dropout for itself.
RECIPE_MODEL: dict[str, Any] = dict(qk_norm=True)
RECIPE_TRAIN: dict[str, Any] = dict(optimizer="muon", repeat_dropout=0.1)

# Presets. `baby` is the course's Baby GPT shape; vocab_size is replaced by the tokenizer's.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {  # for tests: trains in seconds on a CPU
        "model": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512),
        "train": dict(
            micro_batch=4,
            grad_accum=1,
            max_steps=20,
            warmup_steps=2,
            lr=3e-3,  # set, not derived (3.8e-3): the tests' thresholds were measured with it
            eval_interval=10,
            eval_batches=2,
            log_interval=1,
            ckpt_interval=10,
        ),
    },
    "baby": {  # ~10M parameters (6 layers, 6 heads, 384 wide, context 192)
        "model": dict(
            n_layer=6, n_head=6, n_embd=384, block_size=192, vocab_size=8192, **RECIPE_MODEL
        ),
        "train": dict(micro_batch=16, grad_accum=2, **RECIPE_TRAIN),  # lr derived: 0.01, no warmup
    },
    "small": {  # ~30M parameters
        "model": dict(
            n_layer=8, n_head=8, n_embd=512, block_size=512, vocab_size=16384, **RECIPE_MODEL
        ),
        "train": dict(micro_batch=8, grad_accum=8, **RECIPE_TRAIN),  # lr derived: 0.028, no warmup
    },
    "az-100m": {  # ~100M parameters at context 1024 (the course's RTX 2050 target)
        "model": dict(
            n_layer=12,
            n_head=12,
            n_kv_head=4,
            n_embd=768,
            block_size=1024,
            vocab_size=32768,
            **RECIPE_MODEL,
        ),
        "train": dict(
            micro_batch=4,
            grad_accum=32,  # lr derived: 0.023
            activation_checkpointing=True,
            max_steps=20000,
            **RECIPE_TRAIN,
        ),
    },
    # Beyond 100M. Full training of these needs a bigger card than 4 GB (PRESET_VRAM_GB, from
    # `azllm plan`); on a 4 GB card adapt them with LoRA/QLoRA (`azllm plan --lora-rank 16`).
    "az-300m": {  # ~0.3B: 24 layers x 1024 wide, GQA 16/4 heads, context 1024
        "model": dict(
            n_layer=24,
            n_head=16,
            n_kv_head=4,
            n_embd=1024,
            block_size=1024,
            vocab_size=32768,
            **RECIPE_MODEL,
        ),
        "train": dict(
            micro_batch=4,
            grad_accum=32,
            activation_checkpointing=True,
            max_steps=40000,
            **RECIPE_TRAIN,
        ),
    },
    "az-1b": {  # ~1.0B: Llama-3.2-1B's shape (16 x 2048, GQA 32/8, SwiGLU 8192), our vocab
        "model": dict(
            n_layer=16,
            n_head=32,
            n_kv_head=8,
            n_embd=2048,
            ffn_hidden=8192,
            block_size=2048,
            vocab_size=32768,
            **RECIPE_MODEL,
        ),
        "train": dict(
            micro_batch=2,
            grad_accum=64,
            activation_checkpointing=True,
            max_steps=60000,
            **RECIPE_TRAIN,
        ),
    },
}
# The memory budget (GiB) each preset's plan is made for (`azllm plan --vram`); others: 4.
PRESET_VRAM_GB = {"az-300m": 8, "az-1b": 16}


def derived_lr(m: ModelConfig, optimizer: str = "adamw") -> float:
    """AdamW's peak learning rate for a model of this width, when train.lr is 0.

    optimizer "adamw" (every parameter): muP-style, the best Adam lr of hidden matrices falls
    with width. 1e-3 * (384 / n_embd)^0.75 reproduces the presets' former hand-set values (baby
    1e-3, small 8e-4, az-100m 6e-4, within 3%) and was the best of x0.5/x1/x2 at widths 64 and
    128 in bench/arch_options.py (bench/README.md, "Recipe options and width-aware learning
    rates").

    optimizer "muon": AdamW then trains only the token embedding (tied to the head) and the
    norms' gains, which are not hidden matrices, and their best lr is an order of magnitude
    higher: 10x the rule above (baby 0.01). Measured with `arch_options.py --only recipe` at
    widths 128 and 256 (200 steps, half a pass over the data): x10 -10.7% and -9.1% bpb against
    x1, within 0.5% of x30, the best. At baby's shape over the full comparison (370 steps, 2.6
    passes, three seeds; bench/README.md, "The AdamW lr under Muon" / "At full length"), x10 beat
    x30 on both validation and held-out text; x1 was 2% better on held-out news text there but
    3% worse on validation, and 11% / 9% worse on both at one pass (140 steps). Muon's own lr
    (train.muon_lr) does not follow the width: its updates are orthogonalised, so their size does
    not grow with it.
    """
    adamw = 1e-3 * (384 / m.n_embd) ** 0.75
    return 10 * adamw if optimizer == "muon" else adamw


def derived_warmup(tc: TrainConfig) -> int:
    """Warmup steps when train.warmup_steps is -1: none with Muon; with AdamW Adam's own rule of
    thumb, 2 / (1 - beta2) steps (40 at beta2 0.95: the time its second-moment estimate needs to
    average over enough gradients), at most a tenth of the run.

    Measured in bench/arch_options.py --only schedule (bench/README.md, "Warmup and batch"):
    with Muon, no warmup was best or within noise of the best at every width tried (0.6% ahead
    of a 10% warmup at 64 and 128 wide, within 0.2% at 256 and at baby's 384), so the warmup is
    not a function of the model's size; with AdamW the widths disagreed, so Adam's rule stays."""
    if tc.optimizer == "muon":
        return 0
    return min(round(2 / (1 - tc.beta2)), tc.max_steps // 10)


def lr_of(m: ModelConfig, tc: TrainConfig) -> float:
    """The (AdamW) lr a run uses: train.lr, or derived_lr when it is 0."""
    return tc.lr or derived_lr(m, tc.optimizer)


def warmup_of(tc: TrainConfig) -> int:
    """The warmup a run uses: train.warmup_steps, or derived_warmup when it is -1."""
    return tc.warmup_steps if tc.warmup_steps >= 0 else derived_warmup(tc)


def fill_derived(cfg: Config) -> Config:
    """Write the derived training values (train.lr = 0, train.warmup_steps = -1) into cfg, in
    place; returns cfg."""
    cfg.train.lr = lr_of(cfg.model, cfg.train)
    cfg.train.warmup_steps = warmup_of(cfg.train)
    return cfg


def _set_fields(obj: Any, values: dict[str, Any], where: str, section: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise AzllmError(
                f"{where}: unknown key {key!r} in [{section}]; known keys: "
                f"{', '.join(sorted(known))}"
            )
        default = getattr(obj, key)
        # TOML and JSON give ints where floats are meant (lr = 1); accept those, refuse the rest.
        if isinstance(default, str) and isinstance(value, bool):  # compile = true|false
            value = "on" if value else "off"
        if isinstance(default, bool) and not isinstance(value, bool):
            raise AzllmError(f"{where}: {section}.{key}: expected true/false, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, type(default)):
            raise AzllmError(
                f"{where}: {section}.{key}: expected {type(default).__name__}, got {value!r}"
            )
        setattr(obj, key, value)


def config_from_dict(d: dict[str, Any], where: str = "config") -> Config:
    """Build a Config from {"model": {...}, "train": {...}}, refusing unknown keys."""
    unknown = set(d) - {"model", "train"}
    if unknown:
        raise AzllmError(f"{where}: unknown section(s) {sorted(unknown)}; use [model] and [train]")
    model, train = ModelConfig(), TrainConfig()
    _set_fields(model, d.get("model", {}), where, "model")
    _set_fields(train, d.get("train", {}), where, "train")
    return Config(model=model, train=train)


def resolve_sizes(d: dict[str, Any]) -> dict[str, Any]:
    """A model-config dict (as recorded with weights) with n_kv_head and ffn_hidden derived."""
    keys = ("arch", "n_head", "n_embd", "n_kv_head", "ffn_hidden")
    try:
        m = ModelConfig(**{k: d[k] for k in keys if k in d})
        return {**d, "n_kv_head": m.kv_heads, "ffn_hidden": m.ffn_dim}
    except TypeError:  # damaged values: compared as they are, and reported
        return d


def load_config(name_or_path: str) -> Config:
    """A preset name (baby, small, az-100m, tiny) or a TOML file with [model]/[train] tables.

    A TOML file may start from a preset with a top-level `preset = "baby"` key.
    """
    if name_or_path in PRESETS:
        return config_from_dict(PRESETS[name_or_path], where=f"preset {name_or_path}")
    path = Path(name_or_path)
    if not path.exists():
        raise AzllmError(
            f"--config {name_or_path}: neither a preset ({', '.join(PRESETS)}) nor an existing file"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AzllmError(f"{path}: not valid TOML ({e})") from None
    base = data.pop("preset", None)
    merged: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    if base is not None:
        if base not in PRESETS:
            raise AzllmError(f"{path}: preset = {base!r} is not one of {', '.join(PRESETS)}")
        for section in merged:
            merged[section].update(PRESETS[base].get(section, {}))
    for section, values in data.items():
        if not isinstance(values, dict):
            raise AzllmError(f"{path}: top-level key {section!r} must be a [table]")
        merged.setdefault(section, {}).update(values)
    return config_from_dict(merged, where=str(path))


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Overrides as {"train.lr": 3e-4, "model.n_layer": 4} or bare train keys {"lr": 3e-4}."""
    d = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        section = section or "train"
        d.setdefault(section, {})[name] = value
    return config_from_dict(d, where="overrides")


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise AzllmError(
            f"{run_dir}: no config.json — is this a run directory made by azllm train?"
        )
    try:
        return config_from_dict(json.loads(path.read_text(encoding="utf-8")), where=str(path))
    except json.JSONDecodeError as e:
        raise AzllmError(f"{path}: corrupt JSON ({e}); restore it from a checkpoint") from None
