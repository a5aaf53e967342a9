"""Sampling text from a model: batched prompts, KV cache, temperature / top-k / top-p, streaming.

Prompts of different lengths are left-padded into one batch; the KV cache keeps every sequence's
own positions and masks the padding, so each row decodes exactly as it would alone.
The one sampler, `sample_next`, is used by `generate` and the chat engine; the settings it
reads and the context-fit check live in azllm/sampling.py (no torch: the CLI builds its flags
from them without importing torch) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from azllm.device import DTYPES, autocast
from azllm.errors import AzllmError
from azllm.model import GPT, KVCache
from azllm.sampling import DoesNotFit, SamplingSettings, fit_max_tokens

__all__ = [
    "DoesNotFit",
    "SamplingSettings",
    "StreamDecoder",
    "fit_max_tokens",
    "generate",
    "sample_next",
]


def _per_row(values: list, device: torch.device) -> float | torch.Tensor:
    """A scalar when every row has the same value (no host-to-device copy), else a [B, 1]."""
    if all(v == values[0] for v in values):
        return values[0]
    return torch.tensor(values, device=device)[:, None]


def sample_next(
    logits: torch.Tensor,
    settings: Sequence[SamplingSettings],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The one sampler: logits [B, V] -> next ids [B], on the logits' device (nothing is read
    back to the host, so a decode loop can go on without waiting for the device).

    Row i uses settings[i] (temperature 0: greedy; top_k, top_p: see SamplingSettings) and
    draws with generators[i] (None: torch's global generator). Rows that share one generator
    object draw together in one call; the filtering runs on all rows at once (a per-row sort of
    the vocabulary costs more than a decode step's matmuls for small models with 8k+
    vocabularies). A row draws exactly what it would draw alone with the same generator.
    """
    b, vocab = logits.shape
    dev, inf = logits.device, float("inf")
    greedy = logits.argmax(-1)
    hot = [i for i, s in enumerate(settings) if s.temperature > 0]
    if not hot:
        return greedy
    every = len(hot) == b
    x = logits if every else logits[torch.tensor(hot, device=dev)]
    rows = [settings[i] for i in hot]
    x = x.float() / _per_row([s.temperature for s in rows], dev)
    ks = [min(s.top_k, vocab) for s in rows]
    if any(ks):
        top = torch.topk(x, max(ks)).values  # sorted, largest first
        if all(k == ks[0] for k in ks):
            kth = top[:, -1:]
        else:  # each row's own k-th largest; rows without top-k keep everything
            kth = top.gather(1, torch.tensor([max(k - 1, 0) for k in ks], device=dev)[:, None])
            kth = kth.masked_fill(torch.tensor([k == 0 for k in ks], device=dev)[:, None], -inf)
        x = x.masked_fill(x < kth, -inf)
    ps = [s.top_p if s.top_p < 1 else 2.0 for s in rows]  # p = 2 never drops anything
    if any(p < 1 for p in ps):
        sorted_x, order = x.sort(-1, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first stays)
        drop = (probs.cumsum(-1) - probs) >= _per_row(ps, dev)
        x = torch.full_like(x, -inf).scatter(-1, order, sorted_x.masked_fill(drop, -inf))
    probs = x.softmax(-1)
    groups: dict[int, tuple[torch.Generator | None, list[int]]] = {}
    for j, i in enumerate(hot):
        g = generators[i]
        groups.setdefault(id(g), (g, []))[1].append(j)
    picks = None
    for g, js in groups.values():
        if len(js) == len(hot):  # one generator for all the sampled rows (generate())
            picks = torch.multinomial(probs, 1, generator=g).squeeze(-1)
            break
        if picks is None:
            picks = torch.empty(len(hot), dtype=torch.long, device=dev)
        if len(js) == 1:
            one = slice(js[0], js[0] + 1)
            picks[one] = torch.multinomial(probs[one], 1, generator=g)[0]
        else:
            idx = torch.tensor(js, device=dev)
            picks[idx] = torch.multinomial(probs[idx], 1, generator=g).squeeze(-1)
    if every:
        return picks
    return greedy.index_copy(0, torch.tensor(hot, device=dev), picks)


# How many decode steps `generate` runs between two looks at "has every row ended?" when it
# has no on_token callback: each look waits for the device, so looking every step would stop
# the host from queueing the next step while the device runs this one. At most this many - 1
# steps are computed in vain after the last row ends.
CHECK_EVERY = 8


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    sampling: SamplingSettings | None = None,
    *,
    eos_id: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    precision: str = "fp32",
    on_token: Callable[[int, int], None] | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens of each (EOS not included).

    `sampling` (default SamplingSettings()) says how tokens are picked and how many (capped at
    the context's end); the keyword fields max_new_tokens ... seed, when given, replace its
    fields. One seed drives one generator shared by the batch. `on_token(row, id)` is called
    for each new token as it is made (EOS not included).
    """
    s = (sampling or SamplingSettings()).override(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )
    s.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise AzllmError("every prompt needs at least one token (an empty prompt: use BOS)")
    longest = max(len(p) for p in prompts)
    n_new = fit_max_tokens(longest, s.max_new_tokens, model.cfg.block_size, clip=True)
    device = next(model.parameters()).device
    b = len(prompts)
    tokens = torch.full((b, longest), pad_id, dtype=torch.long)
    real = torch.zeros((b, longest), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p) :] = torch.tensor(p)
        real[i, longest - len(p) :] = True
    tokens, real = tokens.to(device), real.to(device)
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    rows, gens = [s] * b, [gen] * b
    cache = KVCache(model.cfg, b, longest + n_new, device, DTYPES[precision]) if use_cache else None
    # the new tokens stay on the device; the host reads them once per step when it streams
    # them (on_token), else every CHECK_EVERY steps (to stop early) and once at the end
    made = torch.empty((b, n_new), dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    ended = [False] * b  # the same, on the host, kept only when streaming
    one = torch.ones((b, 1), dtype=torch.bool, device=device)
    step_input, step_real, steps = tokens, real, 0
    for step in range(n_new):
        with autocast(device, precision):
            logits, _ = model(step_input, cache=cache, real=step_real, last_only=True)
        nxt = sample_next(logits[:, -1], rows, gens)
        made[:, step] = nxt
        steps = step + 1
        if on_token is not None:
            for i, t in enumerate(nxt.tolist()):  # the one host read of this step
                if not ended[i]:
                    ended[i] = t == eos_id
                    if not ended[i]:
                        on_token(i, t)
            if all(ended):
                break
        elif eos_id is not None:
            done |= nxt == eos_id
            if steps % CHECK_EVERY == 0 and bool(done.all()):
                break
        if use_cache:
            step_input, step_real = nxt[:, None], one
        else:  # recompute the whole sequence each step (the reference the cache must match)
            step_input = torch.cat([step_input, nxt[:, None]], 1)
            step_real = torch.cat([step_real, one], 1)
    out = made[:, :steps].tolist()
    if eos_id is not None:
        out = [row[: row.index(eos_id)] if eos_id in row else row for row in out]
    return out


class StreamDecoder:
    """Turns a growing list of token ids into printable text increments.

    Byte-level BPE can split one character (ə is two bytes) across tokens; a decode that ends
    in U+FFFD means "wait for the next token", so nothing half-decoded is ever printed. Only
    the tokens since the last printed character boundary are decoded again (not the whole
    reply), so the work per token is bounded: the text is the same as decoding everything at
    once, because the decoder maps each token to its bytes and the pieces join at whole
    characters.
    """

    # A character is at most 4 bytes, so at most 4 tokens; a longer undecodable run is broken
    # bytes (a model writing invalid UTF-8), printed as U+FFFD like a whole decode would.
    WINDOW = 8

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.pending: list[int] = []  # tokens after the last printed character boundary

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.decode(self.pending)
        if not text.endswith("\ufffd"):
            self.pending = []
            return text
        if len(self.pending) > self.WINDOW:
            # print the longest head whose text can no longer change: decoding head and tail
            # apart gives the text of both together, so the tail does not continue the head
            for k in range(len(self.pending) - 1, 0, -1):
                head = self.decode(self.pending[:k])
                if head + self.decode(self.pending[k:]) == text:
                    self.pending = self.pending[k:]
                    return head
        return ""
