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
    """Reference computed another way: token p's NLL from a forward pass over just its own
    context (the tokens since its window began, windows starting every block_size tokens), one
    token at a time, no batching or padding."""
    torch.manual_seed(0)
    ctx = 8
    model = GPT(ModelConfig(vocab_size=50, block_size=ctx, n_layer=1, n_head=2, n_embd=16)).eval()
    for length in (2, 9, 17, 30):  # a single pair, exactly one window + 1, ragged tails
        ids = torch.randint(0, 50, (length,)).tolist()
        ref = 0.0
        for p in range(1, length):
            start = (p - 1) // ctx * ctx
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids[start:p]]))
            ref -= torch.log_softmax(logits[0, -1].double(), -1)[ids[p]].item()
        for batch_size in (1, 2, 3):
            total, n = nll_of_ids(model, ids, batch_size=batch_size)
            assert n == length - 1
            assert total == pytest.approx(ref, rel=1e-5), (length, batch_size)
