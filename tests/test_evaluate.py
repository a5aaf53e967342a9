import math

import pytest
import torch

from azllm.config import ModelConfig
from azllm.evaluate import evaluate_text, nll_of_ids
from azllm.model import GPT


def test_bits_per_byte_of_a_uniform_model(tok):
    """A model whose logits are all zero predicts uniformly: loss is exactly ln(V) per token."""
    model = GPT(
        ModelConfig(
            vocab_size=tok.vocab_size,
            block_size=16,
            n_layer=1,
            n_head=2,
            n_embd=16,
            tie_embeddings=False,
        )
    ).eval()
    torch.nn.init.zeros_(model.lm_head.weight)
    text = "Azərbaycan dili türk dilləri ailəsinə aiddir. " * 7
    res = evaluate_text(model, tok, text)
    n_tokens = len(tok.encode(text))  # every token predicted once (EOS is the first context)
    n_bytes = len(text.encode("utf-8"))
    assert res["tokens"] == n_tokens and res["bytes"] == n_bytes
    assert res["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    assert res["bpb"] == pytest.approx(n_tokens * math.log2(tok.vocab_size) / n_bytes, rel=1e-6)
    assert res["perplexity"] == pytest.approx(tok.vocab_size, rel=1e-5)


def test_windows_cover_every_token_once():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    ids = torch.randint(0, 50, (30,)).tolist()
    total, n = nll_of_ids(model, ids, batch_size=2)
    assert n == 29
    # reference: the same windows scored one by one
    ref = 0.0
    for s in range(0, 29, 8):
        w = torch.tensor(ids[s : s + 9])[None]
        logits, _ = model(w[:, :-1])
        ref += torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="sum").item()
    assert total == pytest.approx(ref, rel=1e-5)
