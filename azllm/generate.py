"""Sampling text from a model: batched prompts, KV cache, temperature / top-k / top-p, streaming.

Prompts of different lengths are left-padded into one batch; the KV cache keeps every sequence's
own positions and masks the padding, so each row decodes exactly as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from azllm.device import DTYPES, autocast
from azllm.errors import AzllmError
from azllm.model import GPT, KVCache


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits [B, V] -> next ids [B]. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first stays)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    precision: str = "fp32",
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens of each (EOS not included)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise AzllmError("every prompt needs at least one token (an empty prompt: use BOS)")
    ctx = model.cfg.block_size
    longest = max(len(p) for p in prompts)
    if longest >= ctx:
        raise AzllmError(
            f"prompt of {longest} tokens does not fit the model's context of {ctx}; "
            "shorten the prompt"
        )
    max_new_tokens = min(max_new_tokens, ctx - longest)
    device = next(model.parameters()).device
    b = len(prompts)
    tokens = torch.full((b, longest), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((b, longest), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) :] = torch.tensor(p, device=device)
        real[i, longest - len(p) :] = True
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = (
        KVCache(model.cfg, b, longest + max_new_tokens, device, DTYPES[precision])
        if (use_cache)
        else None
    )
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    step_input, step_real = tokens, real
    for _ in range(max_new_tokens):
        with autocast(device, precision):
            logits, _ = model(step_input, cache=cache, real=step_real, last_only=True)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, gen)
        for i in range(b):
            if done[i]:
                continue
            t = int(nxt[i])
            if eos_id is not None and t == eos_id:
                done[i] = True
                continue
            out[i].append(t)
            if on_token:
                on_token(i, t)
        if bool(done.all()):
            break
        if use_cache:
            step_input, step_real = (
                nxt[:, None],
                torch.ones((b, 1), dtype=torch.bool, device=device),
            )
        else:  # recompute the whole sequence each step (the reference the cache must match)
            step_input = torch.cat([step_input, nxt[:, None]], 1)
            step_real = torch.cat(
                [step_real, torch.ones((b, 1), dtype=torch.bool, device=device)], 1
            )
    return out


class StreamDecoder:
    """Turns a growing list of token ids into printable text increments.

    Byte-level BPE can split one character (ə is two bytes) across tokens; a trailing U+FFFD
    means "wait for the next token", so nothing half-decoded is ever printed.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode, self.ids, self.printed = decode, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed :], len(text)
        return new
