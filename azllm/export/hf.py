"""A run as a Hugging Face transformers folder: `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` load it with no azllm code.

    DIR/config.json                 LlamaForCausalLM (arch=llama) or GPT2LMHeadModel (arch=gpt2)
    DIR/model.safetensors           weights under HF's names, fp32
    DIR/tokenizer.json              our tokenizer, unchanged (PreTrainedTokenizerFast reads it)
    DIR/tokenizer_config.json       special tokens, chat_template, no automatic BOS/EOS
    DIR/special_tokens_map.json     for older transformers versions
    DIR/chat_template.jinja         the chat template (transformers >= 4.43 reads it from here too)
    DIR/generation_config.json      bos/eos/pad ids (eos includes <|end|>), sampling defaults

Writing it needs only safetensors: transformers is needed to *load* it, not to make it. The
mapping is a renaming for llama; GPT-2 fuses our q/k/v into c_attn and stores every matrix
transposed, because HF's GPT-2 uses Conv1D layers ([in, out] weights).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from azllm.atomic import atomic_dir, terminate_raises, writing
from azllm.config import ModelConfig
from azllm.errors import AzllmError
from azllm.export import SAMPLING, check_out_dir, load_for_export, state_tensors
from azllm.tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    AzTokenizer,
)


def refuse_unexported(cfg: ModelConfig, fmt: str) -> None:
    """Options no exported architecture computes as we do: refused, not silently dropped."""
    if cfg.logit_softcap:
        raise AzllmError(
            f"{fmt} export: model.logit_softcap has no equivalent in the {fmt} layouts we write "
            "(Gemma 2 caps logits but its block differs: sandwich norms, GeGLU); retrain with 0"
        )
    if cfg.n_experts and cfg.qk_norm:
        raise AzllmError(
            f"{fmt} export: model.n_experts with model.qk_norm has no layout we write (Mixtral "
            "has no q/k norms); retrain with one of the two"
        )


def hf_config(cfg: ModelConfig, tok: AzTokenizer) -> dict:
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if cfg.arch == "llama" and cfg.n_experts:  # Mixtral: Llama with sparse MoE MLPs
        return {
            **hf_config(dataclasses.replace(cfg, n_experts=0), tok),
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "intermediate_size": cfg.expert_ffn_dim,
            "num_local_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.experts_per_token,
            "sliding_window": None,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.0,  # a training setting; ours is in the run's config
            "router_jitter_noise": 0.0,
        }
    if cfg.arch == "llama":
        # QK-norm: Qwen3 is Llama plus per-head q_norm/k_norm before RoPE, nothing else
        qwen3 = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0}
        # q/k/v biases: Qwen2 is Llama plus those (HF Llama's attention_bias also biases o_proj)
        name = "Qwen3" if cfg.qk_norm else "Qwen2" if cfg.qkv_bias else "Llama"
        return {
            "architectures": [f"{name}ForCausalLM"],
            "model_type": name.lower(),
            **(qwen3 if cfg.qk_norm or cfg.qkv_bias else {}),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size,
            "rms_norm_eps": cfg.norm_eps,
            # transformers < 5 reads rope_theta, >= 5 reads rope_parameters (and accepts both)
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}
            | cfg.rope_scaling,  # Llama 3.1's "llama3" frequencies (imported models)
            "rope_scaling": cfg.rope_scaling or None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": "float32",
            **ids,
        }
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.ffn_dim,
        "activation_function": "gelu_new",  # tanh-approximated GELU, as our model uses
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        **ids,
    }


def hf_state_dict(model, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights under HF's names (tied lm_head left out: HF ties it on load)."""
    ours = state_tensors(model)
    out: dict[str, torch.Tensor] = {}
    if cfg.arch == "llama":
        out["model.embed_tokens.weight"] = ours["embed.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = ours[b + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = ours[b + "mlp_norm.weight"]
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[h + f"self_attn.{p}.weight"] = ours[b + f"attn.{p}.weight"]
            for p in ("q_norm", "k_norm") if cfg.qk_norm else ():
                out[h + f"self_attn.{p}.weight"] = ours[b + f"attn.{p}.weight"]
            for p in ("q_proj", "k_proj", "v_proj") if cfg.qkv_bias else ():
                out[h + f"self_attn.{p}.bias"] = ours[b + f"attn.{p}.bias"]
            for p in ("gate_proj", "up_proj", "down_proj") if not cfg.n_experts else ():
                out[h + f"mlp.{p}.weight"] = ours[b + f"mlp.{p}.weight"]
            if cfg.n_experts:  # Mixtral's checkpoint names: w1 gate, w3 up, w2 down
                moe = h + "block_sparse_moe."
                out[moe + "gate.weight"] = ours[b + "mlp.gate.weight"]
                for e in range(cfg.n_experts):
                    for p, w in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                        theirs, mine = f"experts.{e}.{w}.weight", f"mlp.experts.{e}.{p}.weight"
                        out[moe + theirs] = ours[b + mine]
        out["model.norm.weight"] = ours["norm.weight"]
    else:
        out["transformer.wte.weight"] = ours["embed.weight"]
        out["transformer.wpe.weight"] = ours["pos_embed.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours_norm, hf_norm in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                for s in ("weight", "bias"):
                    out[h + f"{hf_norm}.{s}"] = ours[b + f"{ours_norm}.{s}"]
            qkv = [b + f"attn.{p}_proj" for p in "qkv"]
            # Conv1D computes x @ W + b with W [in, out]: our Linear weights transposed
            out[h + "attn.c_attn.weight"] = torch.cat([ours[n + ".weight"] for n in qkv]).T
            out[h + "attn.c_attn.bias"] = torch.cat([ours[n + ".bias"] for n in qkv])
            out[h + "attn.c_proj.weight"] = ours[b + "attn.o_proj.weight"].T
            out[h + "attn.c_proj.bias"] = ours[b + "attn.o_proj.bias"]
            out[h + "mlp.c_fc.weight"] = ours[b + "mlp.fc.weight"].T
            out[h + "mlp.c_fc.bias"] = ours[b + "mlp.fc.bias"]
            out[h + "mlp.c_proj.weight"] = ours[b + "mlp.proj.weight"].T
            out[h + "mlp.c_proj.bias"] = ours[b + "mlp.proj.bias"]
        out["transformer.ln_f.weight"] = ours["norm.weight"]
        out["transformer.ln_f.bias"] = ours["norm.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def tokenizer_files(tok: AzTokenizer, cfg: ModelConfig) -> dict[str, str]:
    """tokenizer_config.json and friends: our tokenizer.json as a PreTrainedTokenizerFast."""
    extra = [t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)]
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    if tok.chat is not None:  # an imported tokenizer: its own tokens (hf_import.py)
        c, extra = tok.chat, []
        specials = {"bos_token": c.bos, "eos_token": c.eos, "pad_token": c.pad}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "unk_token": None,
        "additional_special_tokens": extra,
        # our tokenizer.json has no post-processor: nothing is added to encode() output, so
        # AutoTokenizer(text).input_ids equals AzTokenizer.encode(text) (for text holding special
        # strings only with split_special_tokens=True; not saved here, see README "Special tokens")
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.block_size,
        "padding_side": "left",  # batched generation pads on the left, as azllm.generate does
        "chat_template": tok.chat_template,
    }
    return {
        "tokenizer.json": tok.to_json(),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(
            {**specials, "additional_special_tokens": extra}, indent=2, ensure_ascii=False
        ),
        "chat_template.jinja": tok.chat_template,
    }


def generation_config(cfg: ModelConfig, tok: AzTokenizer) -> dict:
    return {
        "bos_token_id": tok.bos_id,
        # <|eos|> ends a document, <|end|> ends a chat turn: generation stops at either
        "eos_token_id": sorted({tok.eos_id, tok.end_id}),
        "pad_token_id": tok.pad_id,
        "do_sample": True,
        "temperature": SAMPLING.temperature,
        "top_k": SAMPLING.top_k,
        "max_length": cfg.block_size,
    }


def export_hf(
    run_dir: str | Path, out_dir: str | Path, *, weights: str = "model", force: bool = False
) -> Path:
    """Write the HF folder (atomically: it appears complete or not at all)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_out_dir(out, force)
    model, tok, cfg = load_for_export(run_dir, weights)
    refuse_unexported(cfg, "HF")
    # safetensors reports a full disk as SafetensorError(... StorageFull ...), not OSError
    with (
        terminate_raises(),
        writing(out, errors=(SafetensorError,)),
        atomic_dir(out, replace=True) as tmp,
    ):
        save_file(
            hf_state_dict(model, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, tok), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(cfg, tok), indent=2) + "\n"
        )
        for name, text in tokenizer_files(tok, cfg).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out
