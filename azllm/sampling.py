"""How the next token is picked, and how many: the one home of the sampling defaults and bounds
(`SamplingSettings`) and of the context-fit check (`fit_max_tokens`).

`azllm generate`, `azllm chat`, `azllm serve` (the HTTP API), the quickstart, `generate()` and
the chat engine all start from `SamplingSettings()`. No torch here: the CLI builds its flags from
these defaults at start-up. The sampler itself is `azllm.generate.sample_next`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from azllm.errors import AzllmError


class OutOfBounds(AzllmError):
    """A sampling setting outside its bounds; `field` is its name in SamplingSettings (the HTTP
    API reports it as the 400's `param`)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick each next token: the one home of the sampling defaults and their bounds.

    Every command (generate, chat, serve, quickstart), the engine and the HTTP API start from
    these defaults; `check()` is the one place the bounds are enforced.
    temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off.
    """

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 200
    seed: int | None = None

    def check(self, where: str = "") -> SamplingSettings:
        """Raise OutOfBounds naming the field (prefixed by `where`, e.g. "--") when out of bounds.

        temperature stops at 2, OpenAI's bound: the HTTP API and the commands take one range.
        """
        bad = None
        if not 0.0 <= self.temperature <= 2.0:  # also refuses NaN
            bad = ("temperature", "a number in [0, 2] (0 = greedy)", self.temperature)
        elif self.top_k < 0:
            bad = ("top_k", "an integer >= 0 (0 = off)", self.top_k)
        elif not 0.0 < self.top_p <= 1.0:
            bad = ("top_p", "a number in (0, 1] (1 = off; 0 would keep no token)", self.top_p)
        elif self.max_new_tokens < 1:
            bad = ("max_new_tokens", "an integer >= 1", self.max_new_tokens)
        if bad:
            name = f"{where}{bad[0].replace('_', '-')}" if where == "--" else f"{where}{bad[0]}"
            raise OutOfBounds(f"{name} must be {bad[1]}, got {bad[2]!r}", bad[0])
        return self

    def override(self, **fields) -> SamplingSettings:
        """A copy with the given fields replaced; a field given as None keeps this one's value
        (so callers can pass optional flags / request fields straight through)."""
        given = {k: v for k, v in fields.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self


class DoesNotFit(AzllmError):
    """A prompt (param "prompt") or prompt + max_tokens (param "max_tokens") that does not fit
    the context; `room` is the most new tokens the prompt leaves (0 if the prompt alone is too
    long). The HTTP API turns it into its 400 context_length_exceeded on `param`."""

    def __init__(self, message: str, param: str, room: int) -> None:
        super().__init__(message)
        self.param, self.room = param, room


def fit_max_tokens(n_prompt: int, max_tokens: int | None, ctx: int, *, clip: bool = False) -> int:
    """How many new tokens a prompt of n_prompt tokens gets in a context of ctx.

    max_tokens None: as many as fit. A prompt that leaves no room raises DoesNotFit; so does
    max_tokens beyond the room, unless `clip` (then the room is used: `azllm generate` with a
    long --max-new-tokens just stops at the context's end).
    """
    if n_prompt < 1:
        raise AzllmError("the prompt is empty: it needs at least one token (an empty prompt: BOS)")
    room = ctx - n_prompt
    if room < 1:
        raise DoesNotFit(
            f"the prompt of {n_prompt} tokens does not fit the model's context of {ctx} tokens "
            "(it needs room for one new token); shorten it",
            "prompt",
            0,
        )
    if max_tokens is None:
        return room
    if max_tokens < 1:
        raise AzllmError(f"max_tokens must be at least 1 (got {max_tokens})")
    if max_tokens > room and not clip:
        raise DoesNotFit(
            f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) does not fit the "
            f"model's context of {ctx} tokens; ask for at most {room} tokens",
            "max_tokens",
            room,
        )
    return min(max_tokens, room)
