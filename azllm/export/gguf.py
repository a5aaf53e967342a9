"""A run as one GGUF file for llama.cpp (and everything built on it: Ollama, LM Studio, ...).

    azllm export gguf --run RUN --out model.gguf --type f32|f16|q8_0|q4_0|q4_k_m|q5_k_m

F32/F16/Q8_0/Q4_0 are written here with gguf-py's GGUFWriter. The K-quants (Q4_K_M, Q5_K_M) mix
block types per tensor by importance, which only llama.cpp's own quantizer does, so they go
through `llama_model_quantize` (llama-cpp-python) from a temporary F32 file.

Layout notes (the same as llama.cpp's convert_hf_to_gguf.py for HF checkpoints):
- arch=llama: GGUF "llama" rotates consecutive pairs of each head (RoPE "normal" type) while our
  model, like HF, rotates the two halves (rotate_half). Permuting the rows of Q and K per head,
  half-split -> interleaved, makes the two compute the same attention scores.
- arch=gpt2: GGUF "gpt2" wants q/k/v fused into one attn_qkv matrix.
- 1-D tensors (norms, biases) and GPT-2's position table stay F32, as llama.cpp expects.
- The tokenizer is written as llama.cpp's "gpt2" (byte-level BPE) model: tokens in id order,
  merges, token types (our special tokens CONTROL), and the pre-tokenizer name for our split
  pattern, so llama.cpp splits text as we do. llama.cpp does not NFC-normalise; text typed in
  decomposed form (e + combining mark) tokenizes differently there than in azllm.
  A SentencePiece-BPE tokenizer (`--kind sentencepiece-bpe`) is written as llama.cpp's "llama"
  (SentencePiece) vocabulary instead: pieces, scores, token types (CONTROL, UNKNOWN, BYTE), no
  space prefix. A SentencePiece unigram is refused: llama.cpp's unigram has no byte fallback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from azllm.atomic import temp_path, terminate_raises, writing
from azllm.config import ModelConfig
from azllm.errors import AzllmError
from azllm.export import SAMPLING, check_out_file, load_for_export, state_tensors
from azllm.export.hf import refuse_unexported
from azllm.tokenizer import SPLIT_PATTERN, AzTokenizer

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q5_k_m")
# Qwen2's split (its tokenizer.json): Llama 3's with single digits; llama.cpp's "qwen2"
QWEN2_PATTERN = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
LLAMA_CPP_TYPES = {"q4_k_m": 15, "q5_k_m": 17}  # LLAMA_FTYPE_MOSTLY_Q4_K_M / _Q5_K_M
EXTRA_HINT = "pip install 'azllm[gguf]'"


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise AzllmError(f"GGUF export needs the gguf package: {EXTRA_HINT}") from None
    return gguf


def require_llama_cpp(what: str):
    try:
        import llama_cpp
    except ImportError:
        raise AzllmError(f"{what} needs llama-cpp-python: {EXTRA_HINT}") from None
    return llama_cpp


# ---- tensors ---------------------------------------------------------------------------------


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Q/K projection, per head, from half-split to interleaved RoPE pairs.

    Within a head, output row j of the first half and row j of the second half form RoPE pair j;
    llama.cpp expects pair j at rows 2j and 2j+1 (convert_hf_to_gguf.py's LlamaModel.permute).
    """
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_tensors(model, cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """(GGUF tensor name, fp32 array in PyTorch [out, in] order) for every weight."""
    t = {k: v.numpy() for k, v in state_tensors(model).items()}
    out = [("token_embd.weight", t["embed.weight"])]
    if cfg.arch == "gpt2":
        out.append(("position_embd.weight", t["pos_embed.weight"]))
    for i in range(cfg.n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        if cfg.arch == "llama":
            # GGUF "qwen3" (our QK-norm layout) rotates the halves of each head, as we do; only
            # GGUF "llama" needs the permutation
            rope = (lambda w, _heads: w) if cfg.qk_norm or cfg.qkv_bias else permute_rope
            for p in "qkv" if cfg.qkv_bias else ():  # GGUF "qwen2" also rotates the halves
                out.append((g + f"attn_{p}.bias", t[b + f"attn.{p}_proj.bias"]))
            if cfg.qk_norm:
                out += [
                    (g + "attn_q_norm.weight", t[b + "attn.q_norm.weight"]),
                    (g + "attn_k_norm.weight", t[b + "attn.k_norm.weight"]),
                ]
            out += [
                (g + "attn_norm.weight", t[b + "attn_norm.weight"]),
                (g + "attn_q.weight", rope(t[b + "attn.q_proj.weight"], cfg.n_head)),
                (g + "attn_k.weight", rope(t[b + "attn.k_proj.weight"], cfg.kv_heads)),
                (g + "attn_v.weight", t[b + "attn.v_proj.weight"]),
                (g + "attn_output.weight", t[b + "attn.o_proj.weight"]),
                (g + "ffn_norm.weight", t[b + "mlp_norm.weight"]),
            ]
            out += _ffn_tensors(t, cfg, b, g)
        else:
            qkv = [b + f"attn.{p}_proj" for p in "qkv"]
            for s in ("weight", "bias"):
                out += [
                    (g + f"attn_norm.{s}", t[b + f"attn_norm.{s}"]),
                    (g + f"attn_qkv.{s}", np.concatenate([t[f"{n}.{s}"] for n in qkv])),
                    (g + f"attn_output.{s}", t[b + f"attn.o_proj.{s}"]),
                    (g + f"ffn_norm.{s}", t[b + f"mlp_norm.{s}"]),
                    (g + f"ffn_up.{s}", t[b + f"mlp.fc.{s}"]),
                    (g + f"ffn_down.{s}", t[b + f"mlp.proj.{s}"]),
                ]
    if cfg.rope_scaling:  # llama3 RoPE: llama.cpp divides each frequency by its factor
        import torch

        from azllm.model import llama3_inv_freq

        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        out.append(("rope_freqs.weight", (inv / llama3_inv_freq(inv, cfg.rope_scaling)).numpy()))
    out.append(("output_norm.weight", t["norm.weight"]))
    if cfg.arch == "gpt2":
        out.append(("output_norm.bias", t["norm.bias"]))
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd as the output layer
        out.append(("output.weight", t["lm_head.weight"]))
    return out


def _ffn_tensors(t: dict, cfg: ModelConfig, b: str, g: str) -> list[tuple[str, np.ndarray]]:
    """A llama block's SwiGLU MLP, or its MoE as llama.cpp's Mixtral layout: the router
    (ffn_gate_inp [E, d]) and each projection of all experts stacked ([E, out, in])."""
    parts = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
    if not cfg.n_experts:
        return [(g + f"ffn_{p}.weight", t[b + f"mlp.{ours}.weight"]) for p, ours in parts]
    out = [(g + "ffn_gate_inp.weight", t[b + "mlp.gate.weight"])]
    for p, ours in parts:
        experts = [t[b + f"mlp.experts.{e}.{ours}.weight"] for e in range(cfg.n_experts)]
        out.append((g + f"ffn_{p}_exps.weight", np.stack(experts)))
    return out


def tensor_type(name: str, arr: np.ndarray, kind: str, tied: bool):
    """The GGML type one tensor is stored in, for kind f32|f16|q8_0|q4_0."""
    gguf = require_gguf()
    q = gguf.GGMLQuantizationType
    if arr.ndim <= 1 or name.endswith("_norm.weight") or name == "position_embd.weight":
        return q.F32
    if name.endswith("ffn_gate_inp.weight"):  # the MoE router: F32 (llama.cpp never quantizes it)
        return q.F32
    if kind == "f32":
        return q.F32
    if kind == "f16":
        return q.F16
    if kind == "q8_0":
        return q.Q8_0
    # Q4_0: the output layer (token_embd when tied) stays Q8_0; llama.cpp's own Q4_0 keeps it
    # at Q6_K for the same reason (4 bits there costs far more quality than anywhere else).
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return q.Q8_0
    return q.Q4_0


# ---- metadata --------------------------------------------------------------------------------


def pre_tokenizer_name(tok: AzTokenizer) -> str:
    """llama.cpp's name for our split pattern.

    "llama-bpe" is the Llama-3 pattern *with* Llama-3's ignore_merges (a piece that is a whole
    vocabulary entry becomes that token without BPE); "smaug-bpe" is the same pattern with plain
    BPE. Which one matches depends on the tokenizer's own ignore_merges flag.
    """
    spec = json.loads(tok.to_json())
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    patterns = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if patterns == [QWEN2_PATTERN] and not spec["model"].get("ignore_merges"):
        return "qwen2"  # an imported Qwen2 tokenizer (hf_import.py)
    if patterns != [SPLIT_PATTERN]:
        raise AzllmError(
            f"{tok.path or 'tokenizer'}: its split pattern is not azllm's Llama-3 pattern, which "
            "llama.cpp needs to tokenize the same; retrain it with `azllm tokenizer train`"
        )
    return "llama-bpe" if spec["model"].get("ignore_merges") else "smaug-bpe"


def vocab_tables(tok: AzTokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, token types, merges as "a b")."""
    gguf = require_gguf()
    spec = json.loads(tok.to_json())
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    if "" in tokens:
        raise AzllmError(f"{tok.path or 'tokenizer'}: token ids are not contiguous")
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    types = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def gguf_arch(cfg: ModelConfig) -> str:
    """llama.cpp's architecture: QK-norm is its "qwen3" (Llama plus per-head q/k norms)."""
    if cfg.arch == "llama" and cfg.qkv_bias and not cfg.qk_norm:
        return "qwen2"  # Llama plus q/k/v biases (imported Qwen2 models)
    return "qwen3" if cfg.arch == "llama" and cfg.qk_norm else cfg.arch


def add_metadata(w, cfg: ModelConfig, tok: AzTokenizer, name: str, file_type: int) -> None:
    gguf = require_gguf()
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.expert_ffn_dim if cfg.n_experts else cfg.ffn_dim)
    if cfg.n_experts:  # Mixtral: softmax gating, top-k weights renormalised (llama's default)
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.experts_per_token)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    if cfg.arch == "llama":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    if tok.kind == "sentencepiece-bpe":  # llama.cpp's "llama" vocabulary: SentencePiece BPE
        from azllm.tokenizer_spm import UNK, spm_vocab

        tokens, scores, types = spm_vocab(tok.tok)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)  # specials CONTROL, <unk> UNKNOWN, <0x..> BYTE
        w.add_unk_token_id(tok.tok.token_to_id(UNK))
        w.add_add_space_prefix(False)  # trained without SentencePiece's dummy-prefix space
    else:
        tokens, types, merges = vocab_tables(tok)
        pad = cfg.vocab_size - len(tokens)  # imported Qwen2: embedding rows past the tokenizer
        tokens += [f"[PAD{i}]" for i in range(pad)]
        types += [int(gguf.TokenType.UNUSED)] * pad
        w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        w.add_tokenizer_pre(pre_tokenizer_name(tok))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_eot_token_id(tok.end_id)  # end of a chat turn: also stops generation
    w.add_pad_token_id(tok.pad_id)
    # Nothing is added to plain text (as in azllm); the chat template writes BOS itself.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(tok.chat_template)  # an imported tokenizer's own (hf_import.py)
    w.add_sampling_temp(SAMPLING.temperature)
    w.add_sampling_top_k(SAMPLING.top_k)


# ---- writing ---------------------------------------------------------------------------------


def write_gguf(
    model, tok: AzTokenizer, cfg: ModelConfig, path: Path, kind: str, name: str = "azllm"
) -> None:
    """Write kind f32|f16|q8_0|q4_0 to `path` (not atomic: callers write to a temp name)."""
    gguf = require_gguf()
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }
    refuse_unexported(cfg, "GGUF")
    if tok.kind == "sentencepiece-unigram":
        raise AzllmError(
            f"GGUF export: {tok.path or 'the tokenizer'} is a SentencePiece unigram, which "
            "llama.cpp cannot tokenize as we do (its unigram tokenizer has no byte fallback: "
            "newlines and rare characters become <unk>); use `azllm export hf`, or train with "
            "--kind sentencepiece-bpe"
        )
    w = gguf.GGUFWriter(str(path), gguf_arch(cfg))
    add_metadata(w, cfg, tok, name, int(file_types[kind]))
    for tname, arr in gguf_tensors(model, cfg):
        qtype = tensor_type(tname, arr, kind, cfg.tie_embeddings)
        try:
            data = gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qtype)
        except gguf.QuantError:  # rows not a multiple of the block size (32): keep 16 bits
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(arr.astype(np.float32), qtype)
        w.add_tensor(tname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@contextmanager
def quiet_llama_cpp() -> Iterator[None]:
    """Silence llama.cpp's log: llama-cpp-python's Python log callback (which also chokes on
    log lines that cut a UTF-8 character in two) and anything written to fd 2 directly."""
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.CRITICAL)
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        log.setLevel(level)


def quantize_gguf(src: Path, dst: Path, kind: str, threads: int = 0) -> None:
    """llama.cpp's quantizer: an F32/F16 GGUF -> a K-quant GGUF."""
    llama_cpp = require_llama_cpp(f"--type {kind} (llama.cpp's K-quant quantizer)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_CPP_TYPES[kind]
    params.nthread = threads
    # llama.cpp writes a line per tensor to fd 2 (fallback_note summarises what matters)
    with quiet_llama_cpp():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise AzllmError(f"llama.cpp could not quantize {src} to {kind} (code {rc})")


def fallback_note(path: Path) -> str | None:
    """For a K-quant file: which matrices llama.cpp could not store as K-quants, if any.

    K-quant blocks span 256 values of a row; narrower rows (n_embd 384, say) get Q5_0/Q5_1/Q8_0.
    """
    gguf = require_gguf()
    q = gguf.GGMLQuantizationType
    k_types = {q.Q2_K, q.Q3_K, q.Q4_K, q.Q5_K, q.Q6_K}
    mats = [t for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2]  # MoE: 3-D stacks
    other = [t for t in mats if t.tensor_type not in k_types]
    if not other:
        return None
    kinds = ", ".join(sorted({t.tensor_type.name for t in other}))
    return (
        f"{len(other)} of {len(mats)} matrices have rows that are not a multiple of 256 "
        f"wide, so llama.cpp stored them as {kinds} instead of K-quants (a model with "
        "n_embd and ffn_hidden multiples of 256 avoids this)"
    )


def check_kind(kind: str) -> str:
    """The --type, lower-cased, with what it needs installed (before any work is done)."""
    kind = kind.lower()
    if kind not in TYPES:
        raise AzllmError(f"--type {kind}: not one of {', '.join(TYPES)}")
    require_gguf()
    if kind in LLAMA_CPP_TYPES:
        require_llama_cpp(f"--type {kind} (llama.cpp's K-quant quantizer; or use --type q8_0)")
    return kind


def trained_kind(run_dir: str | Path) -> str:
    """The GGUF type a run was trained for with quantization-aware training (train.qat in its
    config.json: `azllm qat`, `--qat`), or "" for an ordinary run."""
    from azllm.config import load_run_config

    return load_run_config(Path(run_dir)).train.qat


def write_gguf_file(model, tok: AzTokenizer, cfg: ModelConfig, out: Path, kind: str, name: str):
    """Any kind to `out`, atomically: written under temporary names (.NAME.PID.tmp and, for
    K-quants, .NAME.PID.f32.tmp) that are removed on every exit, then renamed."""
    with temp_path(out) as tmp, temp_path(out, "f32") as src:
        if kind in LLAMA_CPP_TYPES:
            write_gguf(model, tok, cfg, src, "f32", name)
            quantize_gguf(src, tmp, kind)
        else:
            write_gguf(model, tok, cfg, tmp, kind, name)
        os.replace(tmp, out)


def export_gguf(
    run_dir: str | Path,
    out: str | Path,
    kind: str | None = None,
    *,
    weights: str = "model",
    force: bool = False,
) -> Path:
    """Write RUN as a GGUF of the given kind; the file appears complete or not at all.

    kind None: the type a QAT run was trained for (its weights then equal the trained
    fake-quantized ones bit for bit), else f16."""
    kind = check_kind(kind or trained_kind(run_dir) or "f16")
    out = Path(out)
    check_out_file(out, force)
    with writing(out):  # fail before the work, not after it
        out.parent.mkdir(parents=True, exist_ok=True)
    model, tok, cfg = load_for_export(run_dir, weights)
    with terminate_raises(), writing(out):  # SIGTERM too removes the temporary files
        write_gguf_file(model, tok, cfg, out, kind, Path(run_dir).resolve().name)
    return out


def gguf_eval(gguf_path: str | Path, text_path: str | Path, *, threads: int | None = None) -> dict:
    """Bits per byte of a text under a GGUF model, computed by llama.cpp (see llamacpp.py)."""
    from azllm.export.llamacpp import evaluate_gguf

    return evaluate_gguf(gguf_path, text_path, threads=threads)
