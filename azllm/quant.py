"""Fake quantization that is exactly GGUF's Q8_0 and Q4_0, for quantization-aware training.

Both formats cut each row of a matrix into blocks of 32 values with one fp16 scale per block:
- Q8_0: d = max|x| / 127, q = round(x / d) (half away from zero), value = q * fp16(d);
- Q4_0: d = (the x of largest |x|, sign kept) / -8, q = trunc(x / d + 8.5) clipped to 0..15,
  value = (q - 8) * fp16(d).
`fake_quantize` is gguf-py's reference quantizer (gguf.quants, what `azllm export gguf` writes)
followed by its dequantizer, op for op in float32: the scale is rounded with the fp32 scale, its
inverse is 1/d, and only the stored scale is fp16. So a weight fake-quantized here is bit for bit
the weight llama.cpp reads back from the exported file (tests/test_qat.py checks every tensor).

Which tensors (the rule of export/gguf.py's tensor_type): every matrix of the blocks and the token
embedding at the chosen type; the output layer at Q8_0 (for Q4_0 too: llama.cpp's own Q4_0 keeps it
at more bits), and so the token embedding when it is tied to the output layer. Norms, biases and
GPT-2's position table stay F32 and are not touched.

Training sees the quantized weight in the forward pass and passes the gradient straight through to
the full-precision master weight (the straight-through estimator). The modules keep their class's
parameter names (only `forward` changes), so checkpoints, safetensors and exports of a QAT run are
those of any run. The quantizer is a torch custom op: torch.compile calls it as one opaque kernel
rather than fusing it (a fused multiply-add in `x / d + 8.5` would round differently).

llama.cpp CPU emulation (`llama_cpp_cpu`, for tests and evaluation, never training): llama.cpp's
CPU backend rounds more than the weights. A matmul with Q8_0/Q4_0 weights first quantizes its input
rows to Q8_0 blocks (the weight type's vec_dot_type: ggml-cpu's quantize_row_q8_0 / the repacked
kernels' quantize_mat_q8_0, x86 AVX2 rule: d = amax / 127 stored as fp16, q = round-half-even(
x * (127 / amax))), then sums exact integer block dots times fp16(d_w) * fp16(d_x). With the default
F16 KV cache and no flash attention (open_gguf's settings), keys and values are stored as fp16, and
the attention's two matmuls convert their other operand to fp16 too: the queries, and the softmax
probabilities. Inside `llama_cpp_cpu` our model does all of that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from azllm.config import QAT_TYPES, ModelConfig
from azllm.errors import AzllmError

BLOCK = 32  # values per scale in Q8_0 and Q4_0 (ggml's QK8_0, QK4_0)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero exactly as gguf-py's np_roundf (floor(|x| + 0.5) differs at
    0.49999997, where the addition itself rounds up); +0.0 turns -0 into 0, as int8 storage does."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor()) + 0.0


def fake_quantize(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w quantized to kind (q8_0 | q4_0) and dequantized, in float32, blocks of 32 along the last
    dimension (whose size must be a multiple of 32). No gradient; see fake_quant for training."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {w.shape[-1]} is not a multiple of {BLOCK}")
    b = w.detach().float().reshape(-1, BLOCK)
    if kind == "q8_0":
        d = b.abs().amax(dim=-1, keepdim=True) / 127
        q = _roundf(b * torch.where(d == 0, 0.0, torch.ones_like(d) / d))
    elif kind == "q4_0":
        m = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))  # first of equal |x|, sign kept
        d = m / -8
        q = torch.trunc(b * torch.where(d == 0, 0.0, torch.ones_like(d) / d) + 8.5)
        q = q.clamp(0, 15) - 8
    else:
        raise ValueError(f"no fake quantizer for {kind!r}; one of {QAT_TYPES}")
    return (q * d.half().float()).reshape(w.shape)


# The training op: the quantized weight forward, the gradient unchanged backward.
@torch.library.custom_op("azllm::fake_quant", mutates_args=())
def _fake_quant_op(w: torch.Tensor, kind: str) -> torch.Tensor:
    # Under FSDP's bf16 parameters the weight arrives in bf16: quantized from those values, so
    # within bf16 rounding of the export rather than bit for bit (one process and DDP: exact).
    return fake_quantize(w, kind).to(w.dtype)


@_fake_quant_op.register_fake
def _(w: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.empty_like(w)


def _straight_through(ctx, grad: torch.Tensor):
    return grad, None


_fake_quant_op.register_autograd(_straight_through)


def fake_quant(w: torch.Tensor, kind: str) -> torch.Tensor:
    """fake_quantize in the forward pass, identity in the backward pass (straight-through)."""
    return _fake_quant_op(w, kind)


def quantize_act_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x rounded as llama.cpp's CPU backend rounds the input of a Q8_0/Q4_0 matmul: Q8_0 blocks of
    32 along the last dimension, d = amax / 127 kept as fp16, q = x * (127 / amax) rounded half to
    even (x86 AVX/AVX2's _mm256_round_ps; ARM multiplies by 1 / d instead, and ggml's scalar
    reference also rounds half away from zero: a last-bit difference now and then), returned
    dequantized in float32, no gradient."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {BLOCK}")
    b = x.detach().float().reshape(-1, BLOCK)
    amax = b.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax == 0, 0.0, 127 / amax)  # 127 / amax, not 1 / (amax / 127)
    return (torch.round(b * inv) * (amax / 127).half().float()).reshape(x.shape)


def llama_cpp_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear as llama.cpp computes it with a quantized weight w (already fake-quantized): x
    rounded to Q8_0, then the products summed in float64. Each product of two dequantized values
    is exact there, as llama.cpp's integer block dot is, so only the final rounding to float32
    remains (llama.cpp rounds once per block of 32 instead: a few float32 ulps apart).
    Straight-through: the gradient is F.linear's."""
    xq = x + (quantize_act_q8_0(x).to(x.dtype) - x).detach()
    y = F.linear(xq.double(), w.double()).to(x.dtype)
    return y if bias is None else y + bias


class QATLinear(nn.Linear):
    """nn.Linear whose forward uses its weight fake-quantized to `qat_kind`; with `act_q8_0` set
    (llama_cpp_cpu sets it) the matmul is llama.cpp's: its input rounded to Q8_0 too."""

    qat_kind: str
    act_q8_0: bool = False  # llama.cpp CPU emulation; off in training

    def fake_quantized_weight(self) -> torch.Tensor:
        return fake_quant(self.weight, self.qat_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_q8_0:
            return llama_cpp_linear(x, self.fake_quantized_weight(), self.bias)
        return F.linear(x, self.fake_quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_kind}"


class QATEmbedding(nn.Embedding):
    """nn.Embedding whose lookups read rows of its weight fake-quantized to `qat_kind` (llama.cpp
    dequantizes the rows it looks up from the quantized token_embd)."""

    qat_kind: str

    def fake_quantized_weight(self) -> torch.Tensor:
        return fake_quant(self.weight, self.qat_kind)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            idx,
            self.fake_quantized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qat={self.qat_kind}"


def block_types(model: nn.Module, kind: str) -> dict[str, str]:
    """Module name -> the GGUF type its weight is stored in by `azllm export gguf --type kind`,
    for the modules whose weights are quantized (everything else stays F32)."""
    from azllm.moe import MoE

    tied = model.cfg.tie_embeddings
    # An MoE router's weight stays F32 in the GGUF (ffn_gate_inp), as llama.cpp's converter keeps it
    routers = {f"{n}.gate" for n, m in model.named_modules() if isinstance(m, MoE)}
    out = {}
    for name, m in model.named_modules():
        if name in routers:
            continue
        if name == "lm_head":
            out[name] = "q8_0"  # the output layer: Q8_0 for q4_0 too
        elif name == "embed":
            out[name] = "q8_0" if tied else kind  # tied: it is the output layer
        elif name.startswith("blocks.") and isinstance(m, nn.Linear):
            out[name] = kind
    return out


def check_qat(cfg: ModelConfig, kind: str) -> None:
    """User errors of train.qat, before anything is written: a type without a fake quantizer, or
    rows that do not split into blocks of 32 (the exporter would keep those matrices in F16)."""
    if kind not in QAT_TYPES:
        raise AzllmError(
            f"train.qat {kind!r}: no fake quantizer for it; azllm's QAT matches llama.cpp's "
            f"{' and '.join(QAT_TYPES)} exactly (the K-quants choose scales by a search it does "
            "not reproduce); use --qat q4_0 or q8_0"
        )
    ffn = ("model.expert_ffn_hidden", cfg.expert_ffn_dim) if cfg.n_experts else None
    ffn = ffn or ("model.ffn_hidden", cfg.ffn_dim)
    for field, width in (("model.n_embd", cfg.n_embd), ffn):
        if width % BLOCK:
            raise AzllmError(
                f"train.qat {kind}: {field} is {width}, not a multiple of {BLOCK} ({kind}'s block "
                f"of values per scale; the export would keep those matrices in F16); choose a "
                f"{field} that is a multiple of {BLOCK}"
            )


def apply_qat(model: nn.Module, kind: str) -> nn.Module:
    """Turn fake quantization on for every weight `azllm export gguf --type kind` quantizes, in
    place (before DDP/FSDP/compile wrap the model); returns the model."""
    check_qat(model.cfg, kind)
    modules = dict(model.named_modules())
    for name, t in block_types(model, kind).items():
        m = modules[name]
        if m.weight.shape[-1] % BLOCK:  # a matrix check_qat does not know of: refuse, not skip
            raise AzllmError(
                f"train.qat {kind}: {name}.weight rows are {m.weight.shape[-1]} wide, not a "
                f"multiple of {BLOCK}; choose model sizes that are multiples of {BLOCK}"
            )
        m.__class__ = QATEmbedding if isinstance(m, nn.Embedding) else QATLinear
        m.qat_kind = t
    return model


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.half().to(t.dtype)


def _f16_attention(
    q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """scaled_dot_product_attention as llama.cpp computes it on the CPU without flash attention:
    k and v read from the F16 cache, q converted to F16 for K*Q, the softmax (float32) converted
    to F16 for V*softmax; products exact, sums float32."""
    q, k, v = _f16(q), _f16(k), _f16(v)
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    t, n = s.shape[-2:]
    if is_causal:
        attn_mask = torch.ones(t, n, dtype=torch.bool, device=s.device).tril(n - t)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        s = s.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        s = s + attn_mask
    return _f16(torch.softmax(s, dim=-1)) @ v


def _f16_gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU as ggml's CPU backend computes it (GGML_GELU_FP16): the input rounded to f16 and
    looked up in a table of f16 results of the tanh formula; the input itself past +-10."""
    y = _f16(F.gelu(_f16(x), approximate="tanh"))
    return torch.where(x >= 10, x, torch.where(x <= -10, 0.0, y))


class _LlamaCppOps(TorchFunctionMode):
    """Inside it, scaled_dot_product_attention and gelu compute as llama.cpp's CPU backend."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _f16_attention(*args, **(kwargs or {}))
        if func is F.gelu:
            return _f16_gelu(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def llama_cpp_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, a model prepared by apply_qat computes its logits as llama.cpp's CPU backend does on
    the exported GGUF (see the module docstring): Q8_0 inputs to every quantized matmul, float64
    sums, F16 keys, values, queries and attention probabilities, GPT-2's GELU from an f16 table.
    For tests and evaluation."""
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    for m in layers:
        m.act_q8_0 = True
    try:
        with _LlamaCppOps():
            yield model
    finally:
        for m in layers:
            del m.act_q8_0  # back to the class's False
