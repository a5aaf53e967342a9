"""Held-out evaluation: loss, perplexity and bits per byte.

Bits per byte divides the total negative log-likelihood (in bits) by the UTF-8 bytes of the text,
so models with different tokenizers (vocab 4k vs 32k) compare fairly: a tokenizer that makes fewer,
longer tokens gets no credit for that alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from azllm.device import autocast
from azllm.errors import AzllmError
from azllm.model import GPT
from azllm.tokenizer import AzTokenizer


def read_text_file(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise AzllmError(f"--text {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise AzllmError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise AzllmError(f"{path}: the file is empty")
    return text


@torch.no_grad()
def nll_of_ids(
    model: GPT, ids: list[int], *, batch_size: int = 8, precision: str = "fp32"
) -> tuple[float, int]:
    """Total NLL (nats) of ids[1:] given what precedes each, in windows of the model's context.

    Windows overlap by one token, so every token after the first is predicted exactly once.
    """
    ctx = model.cfg.block_size
    device = next(model.parameters()).device
    windows = [ids[s : s + ctx + 1] for s in range(0, len(ids) - 1, ctx)]
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        x = torch.zeros((len(chunk), ctx), dtype=torch.long)
        y = torch.full((len(chunk), ctx), -1, dtype=torch.long)
        for r, w in enumerate(chunk):
            x[r, : len(w) - 1] = torch.tensor(w[:-1])
            y[r, : len(w) - 1] = torch.tensor(w[1:])
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits, _ = model(x)
        total += F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum"
        ).item()
        count += int((y != -1).sum())
    return total, count


def evaluate_text(
    model: GPT, tok: AzTokenizer, text: str, *, batch_size: int = 8, precision: str = "fp32"
) -> dict:
    """{"loss", "perplexity", "bpb", "tokens", "bytes"} of `text` under the model.

    The text is preceded by EOS (a document boundary), so its first token is predicted too.
    """
    ids = [tok.eos_id] + tok.encode(text)
    nll, n = nll_of_ids(model, ids, batch_size=batch_size, precision=precision)
    return text_metrics(nll, n, text)


def text_metrics(nll: float, n: int, text: str) -> dict:
    """Total NLL (nats) of n predicted tokens of `text` -> loss, perplexity, bits per byte."""
    n_bytes = len(text.encode("utf-8"))
    loss = nll / n
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpb": nll / math.log(2) / n_bytes,
        "tokens": n,
        "bytes": n_bytes,
    }
