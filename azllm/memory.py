"""The memory model of one training process, behind `azllm plan` (plan.py).

It counts, for our GPT (model.py) and trainer (train.py), the bytes alive at each moment
of one optimizer step that can be the peak -- end of forward, start of backward, the backward of
the top and of the bottom block, the optimizer step -- and reports the largest:

- weights (fp32 master copy), gradients (fp32), AdamW's two moments (fp32, bf16 or 8-bit);
- under autocast, the half-precision copy of every matmul weight (autocast caches the casts for
  the whole forward; backward keeps those its matmuls saved);
- activations: the tensors each op of a block saves for backward, counted op by op (see
  `_block_saved`); with activation checkpointing only each block's input is kept and one block
  at a time is recomputed during backward. Attention goes through SDPA: the flash and
  memory-efficient kernels (CUDA; CPU without dropout) save q, k, v, the output and a
  logsumexp, never the T x T matrix; the math path (CPU with dropout) saves T x T in fp32;
- the logits and loss: B x T x V in half precision, its fp32 copy, log-softmax and gradient
  buffers; with train.chunked_ce only one chunk of them at a time;
- workspace: gradient buffers while one block runs backward, optimizer temporaries.

Their sum, "allocated", is comparable to torch.cuda.max_memory_allocated() (and, on a CPU, to
the allocator's peak that plan.measure_peak reads). What must fit in the card, "total", adds
the caching allocator's fragmentation and the CUDA context (driver, kernels, cuBLAS: outside
the allocator, so max_memory_allocated never shows it; nvidia-smi does). On a CPU, total adds
the Python/torch runtime and glibc's fragmentation (large: see CPU_FRAGMENTATION) instead.
Nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from azllm.config import MUON_STACK_ELEMENTS, OPTIMIZER_STATES, PRECISIONS, Config, ModelConfig
from azllm.errors import AzllmError

MiB, GiB = 1 << 20, 1 << 30
CUDA_CONTEXT = 400 * MiB  # CUDA 12 context + cuBLAS/cuDNN handles, lazy module loading on
CUBLAS_WORKSPACE = 16 * MiB  # cuBLAS workspaces come from the caching allocator (counted)
FRAGMENTATION = 0.10  # reserved / allocated - 1 of the caching allocator on a training loop
# glibc keeps freed blocks: peak RSS - runtime was 1.23-1.52x the allocated peak (baby, small,
# checkpointing on and off). With MALLOC_MMAP_THRESHOLD_=131072 (or mallopt M_MMAP_THRESHOLD)
# big blocks go back to the OS at once and it was 1.00-1.01x.
CPU_FRAGMENTATION = 0.5
CPU_RUNTIME = 330 * MiB  # peak RSS of Python + torch after a tiny training step (measured)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' states in fp32
BNB_BLOCK = 256  # one fp32 absmax per block of 8-bit state

COMPONENTS = {  # breakdown key -> label in the table
    "weights": "weights (fp32 master)",
    "gradients": "gradients (fp32)",
    "optimizer": "optimizer states",
    "autocast_weights": "half-precision weight copies",
    "activations": "activations saved for backward",
    "logits_loss": "logits and loss buffers",
    "workspace": "workspace (backward, optimizer)",
    "ddp_buckets": "DDP gradient buckets",
}


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


# ---- parameter counts (model.py's modules, tied embeddings counted once) ----------------------


@dataclass
class _Params:
    total: int  # all parameters
    block: int  # one block
    block_cast: int  # one block's Linear weights and biases: what autocast copies
    head_cast: int  # lm_head weight (V x d), cast whether tied or not
    largest: int  # the largest single tensor (the embedding): optimizer temporaries
    tensors: list[int]  # numel of every parameter tensor (bitsandbytes' per-tensor rule)
    block_matrices: int = 0  # 2D weights inside the blocks, all layers: Muon's parameters
    active: int = 0  # parameters one token uses (MoE: experts_per_token experts; else total)
    experts: int = 0  # MoE: the experts' weights, all layers
    muon_stack: int = 0  # elements of Muon's largest stack of same-size matrices (optim.Muon)


def tokens_ffn(m: ModelConfig) -> int:
    """The feed-forward width one token goes through: MoE's k experts side by side."""
    return m.experts_per_token * m.expert_ffn_dim if m.n_experts else m.ffn_dim


def param_counts(m: ModelConfig) -> _Params:
    d, kv, f, v = m.n_embd, m.kv_heads * m.head_dim, m.ffn_dim, m.vocab_size
    expert = 3 * d * m.expert_ffn_dim  # one SwiGLU expert
    if m.arch == "llama":
        linears = [d * d, d * kv, d * kv, d * d, d * f, d * f, f * d]
        if m.n_experts:  # router + experts instead of the MLP
            linears = linears[:4] + [d * m.n_experts] + [expert // 3] * 3 * m.n_experts
        matrices = linears
        norms = [d, d] + ([m.head_dim, m.head_dim] if m.qk_norm else [])
    else:  # biases on every Linear, LayerNorm has weight and bias
        linears = [d * d, d, d * kv, kv, d * kv, kv, d * d, d, d * f, f, f * d, d]
        matrices = linears[::2]
        norms = [d, d, d, d]
    block = sum(linears) + sum(norms)
    head = [v * d] + ([m.block_size * d] if m.arch == "gpt2" else [])
    head += [d] if m.arch == "llama" else [d, d]
    head += [] if m.tie_embeddings else [v * d]
    tensors = head + (linears + norms) * m.n_layer
    experts = m.n_layer * m.n_experts * expert
    idle = m.n_layer * (m.n_experts - m.experts_per_token) * expert if m.n_experts else 0
    stacks = [  # same-size matrices of all layers, MUON_STACK_ELEMENTS at most (whole matrices)
        min(max(1, MUON_STACK_ELEMENTS // n), matrices.count(n) * m.n_layer) * n for n in matrices
    ]
    return _Params(
        sum(tensors), block, sum(linears), v * d, max(tensors), tensors,
        sum(matrices) * m.n_layer, sum(tensors) - idle, experts, max(stacks),
    )  # fmt: skip


def optimizer_bytes(p: _Params, state: str, optimizer: str = "adamw") -> int:
    """AdamW: two moments per parameter. Muon (optim.Muon): one momentum buffer per block
    matrix, AdamW's two for everything else."""
    if state in ("fp32", "bf16"):
        per = 4 if state == "fp32" else 2
        muon = p.block_matrices if optimizer == "muon" else 0
        return per * (2 * (p.total - muon) + muon)
    if state == "8bit":
        return sum(
            2 * n + 8 * math.ceil(n / BNB_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 8 * n
            for n in p.tensors
        )
    raise AzllmError(f"optimizer state {state!r}: use one of {OPTIMIZER_STATES}")


def _optimizer_temp(p: _Params, state: str, device_type: str, optimizer: str = "adamw") -> int:
    """Temporaries of one optimizer step, per optimizer.py / torch.optim.AdamW."""
    if optimizer == "muon":  # optim.Muon: its AdamW one tensor at a time, then each matrix stack
        return max((12 if state == "bf16" else 8) * p.largest, 22 * p.muon_stack)
    if state == "bf16":  # AdamWBf16State: fp32 m, v and denom of one tensor at a time
        return 12 * p.largest
    if state == "8bit" or device_type == "cuda":  # bitsandbytes kernel; fused AdamW: in place
        return 0
    return 8 * p.largest  # CPU single-tensor AdamW: sqrt(v) and sqrt(v)/bc of one tensor


# ---- activations ------------------------------------------------------------------------------


def attention_path(m: ModelConfig, device_type: str) -> str:
    """Which SDPA kernel training uses: 'flash' (flash or memory-efficient: O(T) memory) or
    'math' (materialises T x T). CPU flash has no dropout; CUDA kernels need head_dim % 8 == 0
    and <= 256 (else math)."""
    if device_type == "cpu":
        return "math" if m.dropout > 0 else "flash"
    return "flash" if m.head_dim % 8 == 0 and m.head_dim <= 256 else "math"


def _block_saved(m: ModelConfig, b: int, t: int, half: bool, device_type: str) -> int:
    """Bytes one block saves for backward: every tensor an op keeps, shared storage once.

    Under autocast the residual stream and the norms stay fp32; each Linear casts its input
    to half on its own (q, k, v: three copies; gate, up: two), and saves that copy.
    """
    n, d, f, kv = b * t, m.n_embd, tokens_ffn(m), m.kv_heads * m.head_dim
    h = 2 if half else 4
    if m.arch == "llama":
        out = 2 * (8 * n * d + 4 * n)  # 2 RMSNorms: fp32 input, normalised x, rsqrt
        out += (5 if half else 2) * h * n * d  # inputs of q, k, v (and gate, up) projections
        out += 4 * h * n * f  # gate, up, silu(gate), silu(gate) * up
        if m.n_experts:  # MoE (approximate, not validated by a measurement): the k gathered
            nk = n * m.experts_per_token  # copies of each token, the experts' outputs before
            out += 4 * nk * d + (2 * h if half else 0) * nk * d + h * nk * d  # weighting and
            out += 8 * n * m.n_experts  # the router's logits and probabilities
    else:
        out = 2 * (4 * n * d + 8 * n)  # 2 LayerNorms: fp32 input, mean, rstd
        out += (4 if half else 2) * h * n * d  # inputs of q, k, v (and fc) projections
        out += 2 * h * n * f  # fc output (GELU input), GELU output
    if attention_path(m, device_type) == "flash":  # q, k, v (after RoPE), out, logsumexp
        out += h * n * (2 * d + 2 * kv) + 4 * b * m.n_head * t
    else:  # CPU math path computes in fp32: q, k, v (heads expanded), probabilities, output
        s = 4 if device_type == "cpu" else h
        tt = b * m.n_head * t * t
        out += 3 * s * n * d + s * tt * (3 if m.dropout > 0 else 1) + h * n * d
    if m.dropout > 0:  # residual-branch dropouts: a float mask on CPU, a bool mask on CUDA
        out += 2 * n * d * (h if device_type == "cpu" else 1)
    return out


def _block_backward_workspace(m: ModelConfig, b: int, t: int, half: bool) -> int:
    """Gradients in flight while a block runs backward, beyond its saved tensors and its weight
    gradients: the fp32 residual gradient coming in and going out, and the N x ffn gradients
    of the MLP (SwiGLU's product has two, GELU one). Measured: the block frees what it saved
    about as fast as it makes gradients; az-100m at micro-batch 8 needed SwiGLU's second."""
    n, f = b * t, tokens_ffn(m)
    return 8 * n * m.n_embd + (2 if m.arch == "llama" else 1) * (2 if half else 4) * n * f


def _head_saved(m: ModelConfig, b: int, t: int, half: bool, chunked: bool) -> int:
    """Final norm + lm_head input (+ RoPE tables, shared by all blocks)."""
    n, d = b * t, m.n_embd
    out = 8 * n * d if m.arch == "llama" else 4 * n * d  # final norm's saved inputs
    out += 4 * n * d if (chunked or not half) else 2 * n * d  # norm output / its half copy
    if m.arch == "llama":
        out += 8 * b * t * m.head_dim  # RoPE cos, sin [B, 1, T, head_dim] fp32
    return out


def _logits(m: ModelConfig, b: int, t: int, half: bool, chunk: int) -> tuple[int, int]:
    """(forward, backward) bytes of the logits and the loss (model.py: logits.float() ->
    cross_entropy).

    Forward makes the logits, their fp32 copy and log-softmax's output; backward needs the
    saved log-softmax output and two fp32 gradients (NLL's, log-softmax's). Nothing outlives
    the loss's backward: train.py keeps only the loss (`model(...)[1]`), not the logits.
    Chunked (model.chunked_cross_entropy): no logits returned; one chunk of rows at a time
    (its half logits die at .float()), recomputed in backward with its own half weight copy.
    """
    n, v, d = b * t, m.vocab_size, m.n_embd
    h = 2 if half else 4
    if chunk:
        rows = min(chunk, n)
        return 8 * rows * v, 12 * rows * v + (2 * v * d if half else 0) + 4 * n * d
    return (h + 8) * n * v - (0 if half else 4 * n * v), 12 * n * v


# ---- the peak ---------------------------------------------------------------------------------


def is_half(precision: str, device_type: str) -> bool:
    """Whether matmuls run in 16 bits. "auto" on CUDA: bf16 or fp16, the same memory; on a
    CPU it depends on the CPU (plan.resolve_plan_precision asks), taken here as fp32."""
    if precision not in PRECISIONS:
        raise AzllmError(f"precision {precision!r}: use auto, fp32, bf16 or fp16")
    return precision in ("bf16", "fp16") or (precision == "auto" and device_type == "cuda")


def _phases(
    cfg: Config,
    b: int,
    *,
    precision: str,
    checkpointing: bool,
    device_type: str,
    optimizer_state: str,
    chunk: int,
    grad_accum: int,
    world: int,
    strategy: str = "ddp",
) -> dict[str, dict[str, int]]:
    m, t = cfg.peak_model(), cfg.model.block_size
    half = is_half(precision, device_type)
    p = param_counts(m)
    h = 2 if half else 4
    base = {
        "weights": 4 * p.total,
        "optimizer": optimizer_bytes(p, optimizer_state, cfg.train.optimizer),
        "ddp_buckets": 4 * p.total if world > 1 else 0,  # DDP's flat copy of the gradients
    }
    g_prev = 4 * p.total if grad_accum > 1 else 0  # earlier micro-batches' gradients
    casts_all = h * (p.block_cast * m.n_layer + p.head_cast) if half else 0
    head_cast = 0 if (chunk or not half) else 2 * p.head_cast
    block = _block_saved(m, b, t, half, device_type)
    kept = 4 * b * t * m.n_embd if checkpointing else block  # per block, until its backward
    head = _head_saved(m, b, t, half, bool(chunk))
    fwd_logits, bwd_logits = _logits(m, b, t, half, chunk)
    work = _block_backward_workspace(m, b, t, half)
    block_cast = 2 * p.block_cast if half else 0
    acts = m.n_layer * kept + head
    # Backward starts at the loss. Chunked, each chunk's recompute has its own half weight copy
    # (in bwd_logits) and, after the first chunk, the lm_head gradient exists.
    bwd_casts = head_cast + (0 if checkpointing else block_cast * m.n_layer)
    bwd_grads = max(g_prev, 4 * p.head_cast if chunk else 0)
    ph = {
        "end of forward": dict(
            gradients=g_prev,
            autocast_weights=casts_all,
            activations=acts,
            logits_loss=fwd_logits,
        ),
        "start of backward": dict(
            gradients=bwd_grads,
            autocast_weights=bwd_casts,
            activations=acts,
            logits_loss=bwd_logits,
        ),
    }
    rope = 8 * b * t * m.head_dim if m.arch == "llama" else 0  # cos, sin: all blocks share
    untied = 0 if m.tie_embeddings else p.head_cast
    for name, below, grads_done in (
        ("backward, top block", m.n_layer - 1, 4 * (p.total - p.block * m.n_layer)),
        ("backward, bottom block", 0, 4 * (p.total - p.block - untied)),
    ):
        recompute = block if checkpointing else 0
        casts = block_cast if checkpointing else block_cast * (below + 1)
        ph[name] = dict(
            gradients=max(g_prev, grads_done),
            autocast_weights=casts,
            activations=kept * (below + 1) + recompute + rope,
            workspace=work,
        )
    # the embedding's backward: a dense V x d gradient, added to the tied lm_head gradient
    ph["end of backward"] = dict(gradients=4 * p.total, workspace=4 * p.head_cast)
    ph["optimizer step"] = dict(
        gradients=4 * p.total,
        workspace=_optimizer_temp(p, optimizer_state, device_type, cfg.train.optimizer),
    )
    phases = {k: {**base, **v} for k, v in ph.items()}
    if strategy == "fsdp" and world > 1:
        phases = _fsdp(phases, p, m, h, world)
    return phases


def _fsdp(phases, p: _Params, m: ModelConfig, h: int, world: int) -> dict[str, dict[str, int]]:
    """FSDP2 as train.shard_fsdp does it (approximate, not validated by a measurement): fp32
    weights, gradients and optimizer states sharded over the processes; parameters gathered in
    the compute precision for the root (embeddings, head) and two blocks (one prefetched); a
    block's gradients unsharded (compute precision, then fp32 to reduce) during its backward.
    Activations are taken as under autocast (FSDP's pure half precision saves a little less)."""
    gathered = h * (p.total - p.block * m.n_layer + 2 * p.block)
    out = {}
    for name, parts in phases.items():
        parts = dict(parts, ddp_buckets=0, autocast_weights=gathered)
        for k in ("weights", "gradients", "optimizer"):
            parts[k] = math.ceil(parts.get(k, 0) / world)
        if name.startswith("backward"):
            parts["workspace"] = parts.get("workspace", 0) + (h + 4) * p.block
        out[name] = parts
    return out


def _totals(parts: dict[str, int], device_type: str) -> dict[str, int]:
    out = {k: int(parts.get(k, 0)) for k in COMPONENTS}
    if device_type == "cuda":
        out["workspace"] += CUBLAS_WORKSPACE
    out["allocated"] = sum(out.values())
    frag = FRAGMENTATION if device_type == "cuda" else CPU_FRAGMENTATION
    out["allocator_overhead"] = int(frag * out["allocated"])
    out["runtime"] = CUDA_CONTEXT if device_type == "cuda" else CPU_RUNTIME
    out["total"] = out["allocated"] + out["allocator_overhead"] + out["runtime"]
    return out


def _chunk(chunked_ce: int | bool, vocab: int) -> int:
    if chunked_ce is True:
        return default_ce_chunk(vocab)
    return int(chunked_ce or 0)


def default_ce_chunk(vocab: int) -> int:
    """Rows per chunk so one chunk's fp32 logits are ~32 MiB: a power of two in [64, 4096]."""
    rows = 64
    while rows * 2 <= 4096 and rows * 2 * vocab * 4 <= 32 * MiB:
        rows *= 2
    return rows


def estimate_peak(
    cfg: Config,
    micro_batch: int,
    *,
    precision: str,
    activation_checkpointing: bool,
    device_type: str = "cuda",
    optimizer_state: str = "fp32",
    chunked_ce: int | bool = False,
    grad_accum: int = 1,
    world: int = 1,
    strategy: str = "ddp",
) -> dict[str, int]:
    """Bytes per component at the peak of a training step, plus:

    "allocated": their sum, comparable to torch.cuda.max_memory_allocated();
    "allocator_overhead", "runtime" (CUDA context / CPU runtime) and "total" = what the
    process needs (nvidia-smi's figure). chunked_ce: 0/False, rows per chunk, or True (default).
    grad_accum > 1: gradients exist during every forward; world > 1: DDP buckets, or FSDP shards.
    """
    if micro_batch < 1:
        raise AzllmError(f"micro-batch {micro_batch}: must be at least 1")
    if optimizer_state not in OPTIMIZER_STATES:
        raise AzllmError(f"optimizer state {optimizer_state!r}: use one of {OPTIMIZER_STATES}")
    phases = _phases(
        cfg,
        micro_batch,
        precision=precision,
        checkpointing=activation_checkpointing,
        device_type=device_type,
        optimizer_state=optimizer_state,
        chunk=_chunk(chunked_ce, cfg.model.vocab_size),
        grad_accum=grad_accum,
        world=world,
        strategy=strategy,
    )
    return max((_totals(v, device_type) for v in phases.values()), key=lambda d: d["allocated"])


def peak_phase(cfg: Config, micro_batch: int, **kw) -> str:
    """The moment of the step where the estimated peak falls (same arguments as estimate_peak)."""
    kw["checkpointing"] = kw.pop("activation_checkpointing")
    kw["chunk"] = _chunk(kw.pop("chunked_ce", 0), cfg.model.vocab_size)
    kw.setdefault("device_type", "cuda")
    kw.setdefault("optimizer_state", "fp32")
    kw.setdefault("grad_accum", 1)
    kw.setdefault("world", 1)
    kw.setdefault("strategy", "ddp")
    phases = _phases(cfg, micro_batch, **kw)
    return max(phases, key=lambda k: sum(phases[k].values()))
