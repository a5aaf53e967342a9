"""Memory of LoRA / QLoRA fine-tuning (azllm/lora.py), and which open models fit a card.

The step is the dense one (memory.py's phases: the same activations, logits and backward
workspace: a frozen layer still passes gradients down) with these changes:

- weights: the frozen base in the compute precision (bf16/fp16: 2 bytes; fp32 runs: 4) and
  norms in fp32; QLoRA: the adapted matrices in NF4, 4 bits plus one fp32 absmax per 64
  weights, everything else 16-bit; the adapters (fp32) on top;
- gradients and AdamW's two moments: the adapters' only (fp32), and no V x d embedding gradient;
- autocast copies: none of a 16-bit base (already in the compute dtype), the adapters' own;
  QLoRA dequantizes one matrix at a time (a 16-bit copy of the largest);
- activations: + each adapter's rank-r intermediate A x, kept for B's backward; - the
  normalised inputs RMSNorm keeps for its gain's gradient (frozen gains have none).

No torch here, as in memory.py.
"""

from __future__ import annotations

import dataclasses

from azllm.config import Config, ModelConfig
from azllm.memory import _chunk, _phases, _totals, is_half, param_counts

NF4_BYTES = 0.5 + 4 / 64  # 4 bits + one fp32 absmax per block of 64 (no double quantization)

# Open models' shapes (their config.json), for `azllm plan --open-models`: nothing downloaded.
OPEN_MODELS = {
    "SmolLM2-360M": ModelConfig(
        n_layer=32, n_head=15, n_kv_head=5, n_embd=960, ffn_hidden=2560, vocab_size=49152
    ),
    "Qwen2.5-0.5B": ModelConfig(
        n_layer=24,
        n_head=14,
        n_kv_head=2,
        n_embd=896,
        ffn_hidden=4864,
        vocab_size=151936,
        qkv_bias=True,
    ),  # fmt: skip
    "Llama-3.2-1B": ModelConfig(
        n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, ffn_hidden=8192, vocab_size=128256
    ),
    "Qwen2.5-1.5B": ModelConfig(
        n_layer=28,
        n_head=12,
        n_kv_head=2,
        n_embd=1536,
        ffn_hidden=8960,
        vocab_size=151936,
        qkv_bias=True,
    ),  # fmt: skip
    "Llama-3.2-3B": ModelConfig(
        n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, ffn_hidden=8192, vocab_size=128256
    ),
}
CONTEXTS = (256, 512, 1024, 2048, 4096)


def _target_shapes(m: ModelConfig, targets: list[str]) -> list[tuple[int, int]]:
    """(in, out) of each adapted matrix in one block."""
    d, kv, f = m.n_embd, m.kv_heads * m.head_dim, m.ffn_dim
    shapes = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d)}
    shapes.update(gate=(d, f), up=(d, f), down=(f, d))
    return [shapes[t] for t in targets]


def lora_params(m: ModelConfig, rank: int, targets: list[str]) -> int:
    return m.n_layer * sum(rank * (i + o) for i, o in _target_shapes(m, targets))


def estimate_lora_peak(
    cfg: Config,
    micro_batch: int,
    *,
    rank: int,
    targets: list[str],
    qlora: bool = False,
    precision: str = "bf16",
    activation_checkpointing: bool = True,
    device_type: str = "cuda",
    chunked_ce: int | bool = False,
    grad_accum: int = 1,
) -> dict[str, int]:
    """estimate_peak's breakdown (memory.py) for a LoRA (qlora: QLoRA) step."""
    m = cfg.model
    half = is_half(precision, device_type)
    p = param_counts(m)
    n_lora = lora_params(m, rank, targets)
    adapted = m.n_layer * sum(i * o for i, o in _target_shapes(m, targets))
    norms = m.n_embd * (2 * m.n_layer + 1)
    matrices = p.total - norms
    if qlora:
        base = int(NF4_BYTES * adapted) + 2 * (matrices - adapted) + 4 * norms
    else:
        base = (2 if half else 4) * matrices + 4 * norms
    largest = max(i * o for i, o in _target_shapes(m, targets))
    casts = (2 * n_lora if half else 0) + (2 * largest if qlora else 0)
    n, kept = micro_batch * m.block_size, 0 if activation_checkpointing else m.n_layer
    extra_acts = (2 if half else 4) * n * rank * len(targets) * (kept or 1)
    # a frozen RMSNorm gain needs no saved normalised input for its gradient (fp32, 4 n d each)
    extra_acts -= 4 * n * m.n_embd * (1 + 2 * (kept or 1)) if m.arch == "llama" else 0
    phases = _phases(
        cfg, micro_batch, precision=precision, checkpointing=activation_checkpointing,
        device_type=device_type, optimizer_state="fp32",
        chunk=_chunk(chunked_ce, m.vocab_size), grad_accum=grad_accum, world=1,
    )  # fmt: skip
    out = []
    for name, parts in phases.items():
        parts = dict(parts, weights=base + 4 * n_lora, optimizer=8 * n_lora, ddp_buckets=0)
        parts["gradients"] = 4 * n_lora if parts.get("gradients") else 0
        parts["autocast_weights"] = casts if parts.get("autocast_weights") or qlora else 0
        parts["activations"] = parts.get("activations", 0) + extra_acts
        if half and chunked_ce and "logits_loss" in parts and name != "end of forward":
            parts["logits_loss"] -= 2 * p.head_cast  # the chunks' head is already 16-bit
        if name in ("end of backward", "optimizer step"):  # no embedding gradient; AdamW on
            parts["workspace"] = 8 * rank * max(max(s) for s in _target_shapes(m, targets))
        out.append(_totals(parts, device_type))
    return max(out, key=lambda d: d["allocated"])


def fit_table(vram_bytes: int, *, headroom: float, rank: int = 16) -> list[dict]:
    """For each open model and each way of training it (full with every saver, LoRA on a
    bf16 base, QLoRA): the longest context in CONTEXTS that fits at micro-batch 1, or 0."""
    from azllm.memory import estimate_peak

    targets = ["q", "k", "v", "o", "gate", "up", "down"]
    budget = (1 - headroom) * vram_bytes
    rows = []
    for name, shape in OPEN_MODELS.items():
        row = {"model": name, "params_b": param_counts(shape).total / 1e9}
        for mode in ("full", "lora", "qlora"):
            best = 0
            for t in CONTEXTS:
                cfg = Config(model=dataclasses.replace(shape, block_size=t))
                kw = dict(precision="bf16", activation_checkpointing=True, chunked_ce=True)
                if mode == "full":
                    est = estimate_peak(cfg, 1, optimizer_state="8bit", **kw)
                else:
                    est = estimate_lora_peak(
                        cfg, 1, rank=rank, targets=targets, qlora=mode == "qlora", **kw
                    )
                if est["total"] <= budget:
                    best = t
            row[mode] = best
        rows.append(row)
    return rows


def fit_table_text(rows: list[dict], vram: str, rank: int) -> str:
    def ctx(t: int) -> str:
        return f"{t:>7}" if t else "      -"

    lines = [
        f"longest context that fits {vram} (micro-batch 1, checkpointing, chunked CE, bf16; "
        f"LoRA rank {rank} on q,k,v,o,gate,up,down; full: 8-bit AdamW)",
        f"{'model':14} {'params':>7} {'full':>7} {'LoRA':>7} {'QLoRA':>7}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:14} {r['params_b']:6.2f}B {ctx(r['full'])} {ctx(r['lora'])} "
            f"{ctx(r['qlora'])}"
        )
    return "\n".join(lines)


def lora_plan_text(
    cfg: Config, vram_bytes: int, *, rank: int, qlora: bool, headroom: float, device_type: str
) -> tuple[str, bool]:
    """The largest micro-batch (up to the config's) whose LoRA step fits, as a few lines."""
    from azllm.memory import fmt_bytes

    targets = [t.strip() for t in cfg.train.lora_targets.split(",")]
    budget = (1 - headroom) * vram_bytes
    kind = "QLoRA (NF4 base)" if qlora else "LoRA (bf16 base)"
    best = None
    mb = 1
    while mb <= max(1, cfg.train.micro_batch):
        for ckpt, chunk in ((False, False), (True, False), (True, True)):
            est = estimate_lora_peak(
                cfg, mb, rank=rank, targets=targets, qlora=qlora, precision="bf16",
                activation_checkpointing=ckpt, device_type=device_type, chunked_ce=chunk,
            )  # fmt: skip
            if est["total"] <= budget:
                best = (mb, ckpt, chunk, est)
                break
        mb *= 2
    n = lora_params(cfg.model, rank, targets)
    head = f"{kind} rank {rank} on {','.join(targets)}: {n / 1e6:.1f}M trained parameters"
    if best is None:
        est = estimate_lora_peak(
            cfg, 1, rank=rank, targets=targets, qlora=qlora, precision="bf16",
            activation_checkpointing=True, device_type=device_type, chunked_ce=True,
        )  # fmt: skip
        return f"{head}\n  does not fit: {fmt_bytes(est['total'])} at micro-batch 1", False
    mb, ckpt, chunk, est = best
    flags = f"--lora-rank {rank}" + (" --qlora" if qlora else "") + f" --micro-batch {mb}"
    flags += " --activation-checkpointing" if ckpt else ""
    flags += f" --chunked-ce {default_chunk(cfg)}" if chunk else ""
    return (
        f"{head}\n  peak {fmt_bytes(est['total'])} of {fmt_bytes(budget)} usable: fits\n"
        f"azllm sft ... --precision bf16 {flags}",
        True,
    )


def default_chunk(cfg: Config) -> int:
    from azllm.memory import default_ce_chunk

    return default_ce_chunk(cfg.model.vocab_size)
