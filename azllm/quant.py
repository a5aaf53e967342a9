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
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class QATLinear(nn.Linear):
    """nn.Linear whose forward uses its weight fake-quantized to `qat_kind`."""

    qat_kind: str

    def fake_quantized_weight(self) -> torch.Tensor:
        return fake_quant(self.weight, self.qat_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    tied = model.cfg.tie_embeddings
    out = {}
    for name, m in model.named_modules():
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
    for field, width in (("model.n_embd", cfg.n_embd), ("model.ffn_hidden", cfg.ffn_dim)):
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
