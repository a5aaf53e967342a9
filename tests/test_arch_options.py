"""Architecture options and what the exports make of them.

model.qk_norm: Qwen3's per-head RMSNorm on q and k; exported as Qwen3ForCausalLM (transformers)
and GGUF "qwen3" (llama.cpp), both computing our logits. model.logit_softcap: no exported
layout computes it, so both exports refuse it in one line. train.z_loss: a training-only loss
term. (model.tie_embeddings=false is covered by the untied runs of test_export_hf/gguf.)
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_fixtures import (
    PARAGRAPH,
    PROMPTS,
    _data_dir,
    _workdir,
    both_logits,
    held_out_text,
)

from azllm.checkpoint import load_run, save_weights
from azllm.config import Config, ModelConfig
from azllm.errors import AzllmError
from azllm.model import GPT
from azllm.tokenizer import load_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _small(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)
    return GPT(cfg).eval()


def _option_run(name: str, **model_kw):
    """A run written by hand with random weights scaled up (logits far from uniform) and norm
    gains that are not all ones, so a gain that is dropped or misplaced shows."""
    run = _workdir() / f"option-{name}"
    if not (run / "model.safetensors").exists():
        tok = load_tokenizer(_data_dir(_workdir()) / "tokenizer.json")
        cfg = Config(
            model=ModelConfig(
                vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=1,
                n_embd=128, **model_kw,
            )
        )  # fmt: skip
        torch.manual_seed(11)
        model = GPT(cfg.model)
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.mul_(4.0) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        tok.save(run / "tokenizer.json")
        save_weights(model, run / "model.safetensors")
    return run


# ---- the model ----------------------------------------------------------------------------


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    x = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(5))
    for qk_norm in (True, False):
        model = _small(qk_norm=qk_norm, norm_eps=1e-12)  # eps would blur it by ~1e-4
        with torch.no_grad():
            before = model(x)[0]
            for block in model.blocks:
                block.attn.q_proj.weight.mul_(7.0)
                block.attn.k_proj.weight.mul_(3.0)
            after = model(x)[0]
        moved = (after - before).abs().max().item()
        assert (moved < 1e-4) if qk_norm else (moved > 1e-2), (qk_norm, moved)
    names = [n for n, _ in _small(qk_norm=True).named_parameters()]
    assert "blocks.0.attn.q_norm.weight" in names and "blocks.1.attn.k_norm.weight" in names


def test_logit_softcap_bounds_logits_and_the_loss_uses_them():
    x, y = torch.randint(0, 97, (2, 2, 20), generator=torch.Generator().manual_seed(6))
    plain, capped = _small(), _small(logit_softcap=2.0)
    with torch.no_grad():
        for m in (plain, capped):
            m.lm_head.weight.mul_(50.0)  # raw logits far beyond the cap
        raw, _ = plain(x)
        logits, loss = capped(x, y)
    assert raw.abs().max() > 10 and logits.abs().max() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), y.view(-1)))
    chunked = _small(logit_softcap=2.0)
    chunked.load_state_dict(capped.state_dict())
    chunked.ce_chunk = 7
    torch.testing.assert_close(chunked(x, y)[1], loss)


def test_z_loss_in_training_only():
    x, y = torch.randint(0, 97, (2, 2, 20), generator=torch.Generator().manual_seed(7))
    y[0, :5] = -1  # no loss taken there: no z-loss either
    model = _small()
    zl = GPT(model.cfg, z_loss=1e-2)
    zl.load_state_dict(model.state_dict())
    logits, ce = model(x, y)
    keep = y.view(-1) != -1
    lse = torch.logsumexp(logits.view(-1, 97)[keep], dim=-1)
    zl.train()
    torch.testing.assert_close(zl(x, y)[1], ce + 1e-2 * lse.square().mean())
    zl.ce_chunk = 9
    torch.testing.assert_close(zl(x, y)[1], ce + 1e-2 * lse.square().mean())
    zl.eval()  # validation loss and bits per byte stay plain cross-entropy
    torch.testing.assert_close(zl(x, y)[1], ce)


# ---- exports ------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_qk_norm_exports_as_qwen3_with_our_logits(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    from azllm.export.hf import export_hf

    run = _option_run(f"qknorm-{tie}", qk_norm=True, tie_embeddings=tie)
    out = export_hf(run, tmp_path / "hf")
    model, tok, cfg = load_run(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert sum(p.numel() for p in hf.parameters()) == model.num_params()
    for text in (PARAGRAPH, *PROMPTS):
        ids = torch.tensor([tok.encode(text)[: cfg.model.block_size]])
        with torch.no_grad():
            ours, theirs = model(ids)[0], hf(input_ids=ids).logits
        assert ours.std() > 0.5  # far from uniform: the comparison has teeth
        diff = (ours - theirs).abs().max().item()
        assert diff < 1e-4, f"max |logit difference| {diff}"


def test_qk_norm_exports_as_gguf_qwen3_with_our_logits(tmp_path):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from azllm.export.gguf import export_gguf
    from azllm.export.llamacpp import loaded

    run = _option_run("qknorm-False", qk_norm=True, tie_embeddings=False)
    path = export_gguf(run, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    model, tok, cfg = load_run(run)
    windows = [
        tok.encode(PARAGRAPH)[: cfg.model.block_size],
        tok.encode(held_out_text())[1000 : 1000 + cfg.model.block_size],
    ]
    with loaded(path, logits_all=True) as llm:
        assert llm.metadata["general.architecture"] == "qwen3"
        for ids in windows:
            theirs, ours = both_logits(llm, model, ids)
            assert ours.std() > 0.5
            # measured 3.1e-3 (fp32, 2 cores AVX2); the random llama of test_export_gguf: 2.8e-3
            err = np.abs(ours - theirs).max()
            assert err < 1e-2, f"max |logit diff| {err:.2e}"


def test_logit_softcap_is_refused_by_both_exports(tmp_path):
    from azllm.export.hf import export_hf

    run = _option_run("softcap", logit_softcap=15.0)
    with pytest.raises(AzllmError, match="logit_softcap") as e:
        export_hf(run, tmp_path / "hf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()
    pytest.importorskip("gguf")
    from azllm.export.gguf import export_gguf

    with pytest.raises(AzllmError, match="logit_softcap"):
        export_gguf(run, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.glob("*m.gguf*"))
