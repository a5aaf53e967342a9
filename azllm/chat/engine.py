"""One generation engine shared by every request: continuous batching over GPT + KVCache.

A background thread owns the model. Requests queue up from any thread; between two decode steps
the engine admits waiting requests (up to `max_batch` sequences at once), so a new request never
waits for the batch in flight to finish:

1. prefill: the new prompts, left-padded into one batch, go through the model into a fresh
   KVCache; each row's first token is sampled from its last logits;
2. merge: the running rows and the new ones are packed into one cache, each row's real
   keys/values right-aligned in the slots (keys carry their RoPE position already and the mask
   only looks at `valid`, so moving slots changes nothing for attention); rows that finished or
   were cancelled are dropped here;
3. decode: one forward of [batch, 1] (each row's last sampled token), then per-row sampling with
   the row's own temperature / top-k / top-p and its own seeded generator (the one sampler,
   `generate.sample_next`), and per-row stops. Every loop turn does one decode step, with or
   without admissions, and reads the sampled tokens back to the host once.

The cache's slot counter is shared by all rows, so it can outgrow a row's own length; it is
packed again (step 2 with no new rows) when the next step would pass the context. Admission
guarantees prompt + max_tokens <= context, so a packed cache always has room for one more step.
Results go to each request's `emit` callback from the engine thread (a thread-safe queue by
default; the server passes one that hands events to its event loop).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from azllm.device import DTYPES, autocast
from azllm.errors import AzllmError
from azllm.generate import SamplingSettings, fit_max_tokens, sample_next
from azllm.model import GPT, KVCache

# emit(kind, value): ("token", id) for each new token, then ("done", Result) or ("error", message)
Emit = Callable[[str, object], None]


@dataclass
class Result:
    finish_reason: str  # "stop" (a stop id), "length" (max_tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int  # tokens emitted; the stop token is not counted


@dataclass
class Request:
    """A sequence to continue. Made by `Engine.submit`; read `events` or pass your own emit.
    `sampling` picks the tokens (its max_new_tokens is not read: `max_tokens` is the length)."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingSettings = SamplingSettings()
    stop_ids: frozenset[int] = frozenset()
    emit: Emit | None = None
    id: int = 0
    events: queue.Queue | None = None
    cancelled: bool = False
    generated: int = 0
    finished: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)
    result: Result | None = None

    def stream(self, timeout: float | None = None) -> Iterator[int]:
        """Token ids as they come (only for requests submitted without an emit callback)."""
        if self.events is None:
            raise RuntimeError("this request reports to its own emit callback")
        while True:
            kind, value = self.events.get(timeout=timeout)
            if kind == "token":
                yield value
            elif kind == "done":
                self.result = value
                return
            else:
                raise AzllmError(f"generation failed: {value}")


class Engine:
    def __init__(self, model: GPT, *, max_batch: int = 16, precision: str = "fp32") -> None:
        if max_batch < 1:
            raise AzllmError("--max-batch must be at least 1")
        self.model = model.eval()
        self.ctx = model.cfg.block_size
        self.device = next(model.parameters()).device
        self.precision = precision
        self.max_batch = max_batch
        self._pending: deque[Request] = deque()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._stopping = False
        # running state, touched only by the engine thread
        self._rows: list[Request] = []
        self._last: list[int] = []  # per row: the sampled token not yet fed to the cache
        self._cache: KVCache | None = None
        # counters for /health and tests; "steps" counts decode forwards, each serving every row
        self.stats = {
            "requests": 0,
            "steps": 0,
            "tokens": 0,
            "max_batch_seen": 0,
            "cancelled": 0,
            "running": 0,
            "waiting": 0,
        }
        self._thread = threading.Thread(target=self._loop, name="azllm-engine", daemon=True)
        self._thread.start()

    # ---- API (any thread) ---------------------------------------------------------------------

    def check(self, n_prompt: int, max_tokens: int | None) -> int:
        """The max_tokens to use for a prompt of n_prompt tokens (None: up to the context);
        AzllmError (`generate.DoesNotFit` when it is about the context) if it cannot fit."""
        return fit_max_tokens(n_prompt, max_tokens, self.ctx)

    def submit(
        self,
        prompt: list[int],
        *,
        sampling: SamplingSettings | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop_ids: set[int] | frozenset[int] = frozenset(),
        emit: Emit | None = None,
    ) -> Request:
        """Queue a prompt. Tokens are picked by `sampling` (default SamplingSettings()), whose
        fields temperature / top_p / top_k / seed are replaced by those given here (None keeps
        them). The length is max_tokens (None: up to the context), not sampling.max_new_tokens:
        the API's max_tokens means that, and the terminal passes its own."""
        sampling = (sampling or SamplingSettings()).override(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
        )
        sampling.check()
        max_tokens = self.check(len(prompt), max_tokens)
        req = Request(list(prompt), max_tokens, sampling, frozenset(stop_ids), emit)
        req.id = next(self._ids)
        if emit is None:
            req.events = queue.Queue()
            req.emit = lambda kind, value: req.events.put((kind, value))
        if sampling.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        with self._wake:
            if self._stopping:
                raise AzllmError("the engine has been shut down")
            self._pending.append(req)
            self._wake.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (a client went away); it ends with finish_reason "cancelled"."""
        req.cancelled = True
        with self._wake:
            self._wake.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self._rows:
                    self._wake.wait()
                if self._stopping:
                    break
                room = self.max_batch - sum(not r.finished for r in self._rows)
                new = []
                while self._pending and len(new) < room:
                    req = self._pending.popleft()
                    if req.cancelled:
                        self._finish(req, "cancelled")
                    else:
                        new.append(req)
            try:
                with torch.no_grad(), autocast(self.device, self.precision):
                    self._step(new)
            except Exception as e:  # a bug or out of memory: fail those requests, keep serving
                for req in self._rows + new:
                    if not req.finished:
                        req.finished = True
                        req.emit("error", f"{type(e).__name__}: {e}")
                self._rows, self._last, self._cache = [], [], None
        for req in self._rows + list(self._pending):
            if not req.finished:
                self._finish(req, "cancelled")

    def _step(self, new: list[Request]) -> None:
        for req in self._rows:
            if req.cancelled and not req.finished:
                self._finish(req, "cancelled")
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        prefilled = self._prefill(new) if new else None
        if (
            prefilled is not None
            or len(keep) < len(self._rows)
            or (self._cache is not None and self._cache.len + 1 > self.ctx)
        ):
            self._repack(keep, prefilled, new)
        self.stats["running"], self.stats["waiting"] = len(self._rows), len(self._pending)
        if not self._rows:
            return
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(self._rows))
        # every row now has one sampled token not yet in the cache: decode them all (also right
        # after a prefill, so a stream of arrivals cannot starve the rows already running)
        b = len(self._rows)
        x = torch.tensor(self._last, dtype=torch.long, device=self.device)[:, None]
        real = torch.ones((b, 1), dtype=torch.bool, device=self.device)
        logits, _ = self.model(x, cache=self._cache, real=real, last_only=True)
        self.stats["steps"] += 1
        self._sample(list(range(b)), self._rows, logits[:, -1])

    def _prefill(self, new: list[Request]) -> KVCache:
        longest = max(len(r.prompt) for r in new)
        x = torch.zeros((len(new), longest), dtype=torch.long)
        real = torch.zeros((len(new), longest), dtype=torch.bool)
        for i, r in enumerate(new):
            x[i, longest - len(r.prompt) :] = torch.tensor(r.prompt)
            real[i, longest - len(r.prompt) :] = True
        cache = KVCache(self.model.cfg, len(new), longest, self.device, DTYPES[self.precision])
        logits, _ = self.model(
            x.to(self.device), cache=cache, real=real.to(self.device), last_only=True
        )
        self.stats["requests"] += len(new)
        self._new_last = [0] * len(new)
        self._sample(list(range(len(new))), new, logits[:, -1], into=self._new_last)
        return cache

    def _sample(
        self,
        idx: list[int],
        reqs: list[Request],
        logits: torch.Tensor,
        into: list[int] | None = None,
    ) -> None:
        into = self._last if into is None else into
        live = [(i, r) for i, r in zip(idx, reqs, strict=True) if not r.finished]
        if not live:
            return
        if len(live) < logits.size(0):
            logits = logits[torch.tensor([i for i, _ in live], device=logits.device)]
        picked = sample_next(logits, [r.sampling for _, r in live], [r.generator for _, r in live])
        tokens = picked.tolist()  # the one host read of this step
        for (i, req), t in zip(live, tokens, strict=True):
            into[i] = t
            if t in req.stop_ids:
                self._finish(req, "stop")
                continue
            req.generated += 1
            self.stats["tokens"] += 1
            req.emit("token", t)
            if req.generated >= req.max_tokens:
                self._finish(req, "length")

    def _finish(self, req: Request, reason: str) -> None:
        req.finished = True
        self.stats["cancelled"] += reason == "cancelled"
        req.emit("done", Result(reason, len(req.prompt), req.generated))

    def _repack(self, keep: list[int], prefilled: KVCache | None, new: list[Request]) -> None:
        """One cache holding the kept running rows and the live new rows, right-aligned."""
        parts = []
        if keep and self._cache is not None:
            parts.append(_packed(self._cache, keep))
        rows = [self._rows[i] for i in keep]
        last = [self._last[i] for i in keep]
        live_new = [i for i, r in enumerate(new) if not r.finished]
        if prefilled is not None and live_new:
            parts.append(_packed(prefilled, live_new))
            rows += [new[i] for i in live_new]
            last += [self._new_last[i] for i in live_new]
        self._rows, self._last = rows, last
        if not rows:
            self._cache = None
            return
        n = max(p[4] for p in parts)
        cache = KVCache(self.model.cfg, len(rows), self.ctx, self.device, DTYPES[self.precision])
        start = 0
        for k, v, valid, next_pos, m in parts:
            b = k.shape[1]
            cache.k[:, start : start + b, :, n - m : n] = k
            cache.v[:, start : start + b, :, n - m : n] = v
            cache.valid[start : start + b, n - m : n] = valid
            cache.next_pos[start : start + b] = next_pos
            start += b
        cache.len = n
        self._cache = cache


def _packed(cache: KVCache, rows: list[int]):
    """(k, v, valid, next_pos, n) of the given rows, cut to the last n slots, n = the most real
    tokens any of them has. A row's real slots are always one block at the right end (prompts
    are left-padded, merges right-align, decoding appends to every row), so this drops padding
    only."""
    idx = torch.tensor(rows, device=cache.valid.device)
    n = int(cache.valid[idx, : cache.len].sum(1).max())
    cut = slice(cache.len - n, cache.len)
    return (
        cache.k[:, idx, :, cut],
        cache.v[:, idx, :, cut],
        cache.valid[idx, cut],
        cache.next_pos[idx],
        n,
    )


def wait_all(reqs: list[Request], timeout: float = 60.0) -> list[list[int]]:
    """Collect the tokens of several queued requests (tests and scripts)."""
    deadline = time.monotonic() + timeout
    return [list(r.stream(timeout=max(0.01, deadline - time.monotonic()))) for r in reqs]
