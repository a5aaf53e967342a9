"""The decoder-only transformer, in plain PyTorch. Two architectures from one file:

- arch="llama" (default): RoPE, RMSNorm, SwiGLU MLP, optional grouped-query attention, no biases;
- arch="gpt2" (the course's Baby GPT): learned positions, LayerNorm, GELU MLP, biases.

Module and parameter names follow Hugging Face's LlamaForCausalLM / GPT2LMHeadModel closely so
export is a renaming (plus GPT-2's fused QKV), not a conversion. Attention goes through
scaled_dot_product_attention (flash / memory-efficient kernels on CUDA). For generation a KVCache
holds keys and values; prompts of different lengths share a batch by left padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from azllm.config import ModelConfig
from azllm.moe import MoE, moe_losses


class RMSNorm(nn.Module):
    """As in LlamaRMSNorm: normalise in fp32 whatever the autocast dtype, then scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel (one pass instead of pow, mean, rsqrt, mul: 20% less time for the
        # norm forward and backward on a CPU), the same numbers as the written-out formula; the
        # gain is applied after the cast back, as HF does.
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), None, self.eps).to(x.dtype)


def rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] in the half-split layout HF Llama uses (rotate_half)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    if cfg.rope_scaling:  # Llama 3.1+ (imported models): long-context frequencies
        inv_freq = llama3_inv_freq(inv_freq, cfg.rope_scaling)
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """rope_type "llama3" (transformers' _compute_llama3_parameters): wavelengths longer than
    the original context / low_freq_factor slowed by `factor`, shorter than original /
    high_freq_factor kept, a linear blend between."""
    lo, hi, old = s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    smooth = ((old * inv_freq / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)
    return (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, written on the two halves (the tables repeat in their
    second half): the same numbers as HF's form without its negated copy and second product,
    1.7x faster forward and backward on a CPU. x: [B, H, T, D]; cos/sin: [B, 1, T, D]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., :half], sin[..., :half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class KVCache:
    """Keys/values of every layer for a batch of sequences, preallocated to max_len.

    Sequences are left-padded to a common length; `valid` marks real tokens so padding is never
    attended to, and `next_pos` keeps each sequence's own position counter.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len = 0
        self.max_len = max_len


def _attention_mask(valid_keys: torch.Tensor, offset: int, t: int) -> torch.Tensor:
    """Bool mask [B, 1, t, S]: query i (at slot offset+i) sees real keys at slots <= its own.

    A query always sees itself, so a padding query has one key and softmax stays finite.
    """
    s = valid_keys.shape[1]
    q_slot = torch.arange(offset, offset + t, device=valid_keys.device)[:, None]
    k_slot = torch.arange(s, device=valid_keys.device)[None, :]
    causal = k_slot <= q_slot
    mask = causal[None] & valid_keys[:, None, :]
    mask = mask | (k_slot == q_slot)[None]
    return mask[:, None]


def _segment_positions_and_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [B, T] restarting at each segment start, and a bool mask [B, 1, T, T]: causal
    and within the same segment. Segments must be contiguous runs (0,0,1,1,1,2,...).

    A dense mask costs T*T bools per row and moves SDPA off the flash kernel (onto the
    memory-efficient one on CUDA), a fair price for rows that are no longer mostly padding.
    """
    t = segments.shape[1]
    ar = torch.arange(t, device=segments.device)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, ar, 0).cummax(dim=1).values  # index of each token's segment start
    same = segments[:, :, None] == segments[:, None, :]
    return ar - first, (same & (ar[None, :] <= ar[:, None]))[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bias = cfg.arch == "gpt2"
        qkv_bias = bias or cfg.qkv_bias  # Qwen2: biases on q/k/v only
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=bias)
        self.o_proj.residual = True  # depth-scaled init (see GPT._init_weights)
        self.dropout = cfg.dropout
        if cfg.qk_norm:  # Qwen3's q_norm/k_norm: one gain vector per head_dim, shared by heads
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, rope, layer: int, cache: KVCache | None, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_head, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):  # before RoPE, as in Qwen3
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            end = cache.len + t
            cache.k[layer, :, :, cache.len : end] = k
            cache.v[layer, :, :, cache.len : end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.llama = cfg.arch == "llama"
        if self.llama:  # SwiGLU
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
            self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_dim, bias=False)
            self.down_proj = nn.Linear(cfg.ffn_dim, cfg.n_embd, bias=False)
            self.down_proj.residual = True
        else:
            self.fc = nn.Linear(cfg.n_embd, cfg.ffn_dim)
            self.proj = nn.Linear(cfg.ffn_dim, cfg.n_embd)
            self.proj.residual = True

    def forward(self, x):
        if self.llama:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        norm = (
            (lambda: RMSNorm(cfg.n_embd, cfg.norm_eps))
            if cfg.arch == "llama"
            else (lambda: nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps))
        )
        self.attn_norm, self.attn = norm(), Attention(cfg)
        self.mlp_norm, self.mlp = norm(), (MoE(cfg) if cfg.n_experts else MLP(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, layer, cache, mask):
        """-> (x, aux): aux is None, or in training an MoE block's [load balance, router z]
        losses, returned (not stored) so activation checkpointing recomputes them correctly."""
        x = x + self.drop(self.attn(self.attn_norm(x), rope, layer, cache, mask))
        h, aux = self.mlp(self.mlp_norm(x)), None
        if isinstance(h, tuple):  # MoE: (output, routing)
            h, routing = h
            aux = moe_losses(routing, self.mlp.n_experts) if self.training else None
        return x + self.drop(h), aux


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap): logits bounded by +-cap, unchanged near 0 (Gemma 2's)."""
    return cap * torch.tanh(logits / cap) if cap else logits


def _ce_sum(
    logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0, cap: float = 0.0
) -> torch.Tensor:
    """Summed cross-entropy (fp32) of logits [N, V] against targets [N] (-1: no loss), plus
    z_loss * logsumexp(logits)^2 per counted token (PaLM's z-loss: keeps the softmax
    normaliser near 1, so logits do not drift)."""
    logits = softcap(logits.float(), cap)
    ce = F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        ce = ce + z_loss * (lse.square() * (targets != -1)).sum()
    return ce


def _head_ce_sum(x, weight, targets, z_loss: float, cap: float) -> torch.Tensor:
    return _ce_sum(F.linear(x, weight), targets, z_loss, cap)


def chunked_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    z_loss: float = 0.0,
    cap: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of lm_head(x) without ever holding all (tokens x vocab) logits.

    Each chunk's logits are made, reduced to a sum and dropped; backward recomputes them
    (activation checkpointing), so peak memory is one chunk's logits instead of the batch's.
    """
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    total = x.new_zeros((), dtype=torch.float32)
    for i in range(0, targets.numel(), chunk):
        total = total + checkpoint(
            _head_ce_sum,
            x[i : i + chunk],
            weight,
            targets[i : i + chunk],
            z_loss,
            cap,
            use_reentrant=False,
        )
    return total / (targets != -1).sum().clamp(min=1)


class GPT(nn.Module):
    """The model. Training-only memory savers are fixed at construction, never set from outside:
    activation_checkpointing recomputes each block in backward instead of keeping its
    activations; ce_chunk > 0 computes the loss over that many tokens at a time (no logits
    returned), so the full batch x context x vocab logits never exist. z_loss > 0 adds the
    z-loss term to the loss in training mode (model.train()) only: evaluation stays pure CE."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        activation_checkpointing: bool = False,
        ce_chunk: int = 0,
        z_loss: float = 0.0,
        moe_aux_loss: float = 0.0,
        moe_z_loss: float = 0.0,
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.arch == "gpt2":
            self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            cos, sin = rope_tables(cfg, cfg.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = (
            RMSNorm(cfg.n_embd, cfg.norm_eps)
            if cfg.arch == "llama"
            else nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = activation_checkpointing
        self.ce_chunk = ce_chunk
        self.z_loss = z_loss
        self.moe_coefs = (moe_aux_loss, moe_z_loss)  # MoE: weights of the two router losses
        self.moe_aux = None  # MoE, training: the last forward's mean [balance, z] (detached)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            std = 0.02
            if getattr(m, "residual", False):  # GPT-2 paper: scale residual writes by depth
                std /= math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        real: torch.Tensor | None = None,
        last_only: bool = False,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] -> (logits [B, T or 1, V], mean loss or None).

        targets: next-token ids, -1 where no loss is wanted. cache: continue the sequences in
        it. real: bool [B, T], False for left padding (generation only). segments: int [B, T],
        one id per packed sequence in a row (training/eval): each restarts at position 0 and
        attends only within itself, so packing gives the same logits as one sequence per row.
        """
        b, t = idx.shape
        offset = cache.len if cache is not None else 0
        if offset + t > self.cfg.block_size:
            raise ValueError(
                f"sequence of {offset + t} tokens exceeds the context ({self.cfg.block_size})"
            )
        pos, mask = self._positions_and_mask(idx, cache, real, segments)
        x = self.embed(idx)
        rope = None
        if self.cfg.arch == "gpt2":
            x = x + self.pos_embed(pos)
        else:
            rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])
        x = self.drop(x)
        aux = []
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training:
                x, a = checkpoint(block, x, rope, i, cache, mask, use_reentrant=False)
            else:
                x, a = block(x, rope, i, cache, mask)
            aux += [] if a is None else [a]
        x = self.norm(x)
        if cache is not None:
            cache.len += t
            cache.next_pos += real.long().sum(1) if real is not None else t
        if last_only:
            x = x[:, -1:]
        aux = torch.stack(aux).mean(0) if aux else None  # MoE, training: mean over layers
        if targets is not None and self.ce_chunk:
            return None, self._plus_router_losses(self.loss(x, targets), aux)
        logits = softcap(self.lm_head(x), self.cfg.logit_softcap)
        if targets is None:
            return logits, None
        return logits, self._plus_router_losses(self.loss(x, targets, logits), aux)

    def _plus_router_losses(self, loss: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        if aux is None:
            return loss
        self.moe_aux = aux.detach()  # train.py logs it
        return loss + self.moe_coefs[0] * aux[0] + self.moe_coefs[1] * aux[1]

    def loss(
        self, x: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of final hidden states x [B, T, C] (targets -1: none).

        In fp32 whatever the autocast dtype; in chunks when ce_chunk is set (logits ignored).
        logits, when given, are already soft-capped (forward)."""
        z = self.z_loss if self.training else 0.0
        cap = self.cfg.logit_softcap
        if self.ce_chunk:
            # the weight lm_head's forward uses (fake-quantized under QAT: azllm/quant.py)
            head = getattr(self.lm_head, "fake_quantized_weight", None)
            w = head() if head is not None else self.lm_head.weight
            return chunked_cross_entropy(x, w, targets, self.ce_chunk, z, cap)
        if logits is None:
            logits = softcap(self.lm_head(x), cap)
        logits, targets = logits.float().view(-1, logits.size(-1)), targets.reshape(-1)
        if not z:
            return F.cross_entropy(logits, targets, ignore_index=-1)
        return _ce_sum(logits, targets, z) / (targets != -1).sum().clamp(min=1)

    def _positions_and_mask(
        self,
        idx: torch.Tensor,
        cache: KVCache | None,
        real: torch.Tensor | None,
        segments: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each token's position [B, T] and the attention mask (None: plain causal).

        Three cases: packed training rows (segments), generation (cache and/or left padding
        `real`; marks the new slots valid in the cache), or plain training/eval rows."""
        b, t = idx.shape
        if segments is not None:
            if cache is not None or real is not None:
                raise ValueError(
                    "segments (packed training rows) cannot be combined with cache/real"
                )
            return _segment_positions_and_mask(segments)
        if cache is None and real is None:
            return torch.arange(t, device=idx.device)[None].expand(b, t), None
        real = real if real is not None else torch.ones_like(idx, dtype=torch.bool)
        base = cache.next_pos[:, None] if cache is not None else 0
        pos = (base + real.long().cumsum(1) - 1).clamp(min=0)
        if cache is None:
            return pos, _attention_mask(real, 0, t)
        cache.valid[:, cache.len : cache.len + t] = real
        return pos, _attention_mask(cache.valid[:, : cache.len + t], cache.len, t)

    # ---- bookkeeping -------------------------------------------------------------------------

    def set_dropout(self, p: float) -> None:
        """Change the dropout rate of every layer in place (train.repeat_dropout switches it on
        when the data starts to repeat); the weights and what inference computes are unchanged."""
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, Attention):
                m.dropout = p

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def num_active_params(self) -> int:
        """Parameters one token uses: MoE counts experts_per_token of the n_experts."""
        cfg = self.cfg
        idle = cfg.n_layer * (cfg.n_experts - cfg.experts_per_token) * 3 * cfg.n_embd
        return self.num_params() - (idle * cfg.expert_ffn_dim if cfg.n_experts else 0)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 per matmul weight + attention (PaLM appendix B); an MoE
        counts the weights a token uses (its experts_per_token experts and the router)."""
        cfg = self.cfg
        matmul = self.num_active_params() - (0 if cfg.tie_embeddings else self.embed.weight.numel())
        if cfg.arch == "gpt2":
            matmul -= self.pos_embed.weight.numel()
        return 6 * matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size

    def summary_rows(self) -> list[tuple[str, str, int]]:
        """(name, shape, parameters) per tensor; tied weights appear once."""
        rows, seen = [], set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            rows.append((name, "x".join(map(str, p.shape)), p.numel()))
        return rows
