"""OpenAI's API, the parts `azllm serve` speaks: request validation and response shapes.

Plain functions over dicts (no web framework), so the shapes can be read in one place:
errors are {"error": {"message", "type", "param", "code"}}; replies are `chat.completion` /
`text_completion` objects, streamed as `chat.completion.chunk` (choices[].delta) /
`text_completion` chunks. Extensions beyond OpenAI: `top_k`, and `ignore_eos` (as in vLLM:
generate exactly max_tokens, for benchmarks). A "developer" message is a system message.

Retrieval (a server started with `--rag INDEX`): a chat completion searches the index with the
text of the last user message (never system or assistant text), puts the best chunks into a
system turn with numbered sources (trimmed to leave max_tokens, or the default reply length, of
room; see azllm/rag/prompt.py) and returns them in an extra top-level field `"sources"`: a list
of {"n", "source", "chunk", "score", "text"}, on the `chat.completion` object, and when
streaming on the chunk that carries the finish_reason. Request fields: `rag` (true/false,
default true on such a server; true on a server without an index is a 400) and `rag_k`
(chunks to retrieve, 1-20, default --rag-k). /v1/completions never retrieves (a raw prompt has
no user turn to search).

Every field is checked for its type and bounds before anything uses it, so a hostile body gets a
400 and never reaches the tokenizer or the engine: JSON nesting is bounded, strings must be
valid Unicode (no lone surrogates, which JSON's "\\ud800" escape can smuggle in), integers are
bounded (a 5,000-digit max_tokens or a seed torch cannot take is a 400, not a 500). Fields the
request leaves out take the model's own defaults, `SamplingSettings()` (as Ollama does), except
max_tokens, whose default is also capped by the room the prompt leaves in the context.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from azllm.sampling import DoesNotFit, OutOfBounds, SamplingSettings, fit_max_tokens
from azllm.tokenizer import AzTokenizer

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULTS = SamplingSettings()
# azllm reads at most 5 levels ({"messages": [{"content": [{...}]}]}), but clients also send
# fields it ignores (tools, response_format with a JSON schema) that nest deeper
MAX_DEPTH = 64
INT_MAX = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class ApiError(Exception):
    """A request the server refuses: becomes an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type_,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _show(value) -> str:
    """A value for an error message: short, whatever the client sent."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")  # json.loads accepts NaN and Infinity by default


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, nested at most MAX_DEPTH deep, every string (keys
    too) valid Unicode. ApiError(400, code "invalid_json") otherwise."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # "[[[[..." deeper than Python's stack: the C parser gives up
        raise _too_deep() from None
    except ValueError as e:  # bad syntax, bad UTF-8, an integer over 4,300 digits, NaN
        raise ApiError(
            400, f"the request body is not valid JSON ({_show(str(e))})", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    stack = [(body, 1)]  # iterative: the walk itself must not recurse on hostile nesting
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            for s in (key, value):
                if isinstance(s, str) and not _valid_unicode(s):
                    raise ApiError(
                        400,
                        "the request body has a string that is not valid Unicode "
                        "(a lone surrogate such as \\ud800)",
                        None,
                        "invalid_json",
                    )
            if isinstance(value, dict | list):
                stack.append((value, depth + 1))
    return body


def _too_deep() -> ApiError:
    return ApiError(
        400, f"the request body nests deeper than {MAX_DEPTH} levels", None, "invalid_json"
    )


def _valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Params:
    max_tokens: int | None  # None: the default (SamplingSettings), capped by the context
    temperature: float
    top_p: float
    top_k: int  # 0 = off (passed as 0: the engine reads None as "the default")
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _type_error(name: str, what: str, value) -> ApiError:
    return ApiError(400, f"{name} must be {what}, got {_show(value)}", name, "invalid_type")


def _bool(obj: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):  # the string "false" is not false
        raise _type_error(param or name, "true or false", value)
    return value


def _number(body: dict, name: str, default: float) -> float:
    """A JSON number (not a bool) as a float; its bounds are SamplingSettings.check's."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(name, "a number", value)
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits: outside every bound, not a 500
        return math.inf if value > 0 else -math.inf


def _integer(body: dict, name: str, lo: int, hi: int = INT_MAX, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if not lo <= value <= hi:
        raise ApiError(
            400,
            f"{name} must be an integer in [{lo}, {hi}], got {_show(value)}",
            name,
            "invalid_value",
        )
    return value


def parse_params(body: dict) -> Params:
    """Sampling and streaming options of a completion request, checked; absent ones take
    `SamplingSettings()`'s defaults."""
    max_tokens = _integer(body, "max_completion_tokens", 1, default=_integer(body, "max_tokens", 1))
    if _integer(body, "n", 1, default=1) != 1:
        raise ApiError(
            400, "n: only one choice per request is supported (n=1)", "n", "invalid_value"
        )
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
    ):
        raise ApiError(
            400,
            "stop must be a string or a list of at most 4 non-empty strings",
            "stop",
            "invalid_value",
        )
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    try:  # the bounds' one home; INT_MAX only keeps a 5,000-digit top_k out of torch
        sampling = SamplingSettings(
            temperature=_number(body, "temperature", DEFAULTS.temperature),
            top_p=_number(body, "top_p", DEFAULTS.top_p),
            top_k=_integer(body, "top_k", -INT_MAX, default=DEFAULTS.top_k),
        ).check()
    except OutOfBounds as e:
        raise ApiError(400, str(e), e.field, "invalid_value") from None
    return Params(
        max_tokens=max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=_integer(body, "seed", *SEED_RANGE, default=DEFAULTS.seed),
        stop=stop,
        stream=_bool(body, "stream", False),
        include_usage=_bool(options, "include_usage", False, "stream_options.include_usage"),
        ignore_eos=_bool(body, "ignore_eos", False),
    )


def chat_messages(body: dict) -> list[dict]:
    """`messages` as [{"role": system|user|assistant, "content": str}], checked."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400,
            "messages must be a non-empty list of {role, content} objects",
            "messages",
            "invalid_value",
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list is not hashable
            raise ApiError(
                400,
                f"Invalid value: {_show(role)}. Supported roles are 'system', "
                "'developer', 'user' and 'assistant'.",
                f"{where}.role",
                "invalid_value",
            )
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise ApiError(
                    400,
                    f"{where}.content: only text parts are supported",
                    f"{where}.content",
                    "invalid_value",
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(
                400, f"{where}.content must be a string", f"{where}.content", "invalid_type"
            )
        out.append({"role": ROLES[role], "content": content})
    return out


def completion_ids(
    body: dict, tok: AzTokenizer, check_text: Callable[[str], None] | None = None
) -> list[int]:
    """`prompt` of /v1/completions as token ids: a string (BOS + its tokens, as `azllm generate`
    does) or a list of token ids; a batch of one is accepted. `check_text` sees a string prompt
    before it is tokenized (the server refuses text too long to fit there)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if check_text is not None:
            check_text(prompt)
        return [tok.bos_id] + tok.encode(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok.vocab_size
            for t in prompt
        )
    ):
        return list(prompt)
    raise ApiError(
        400,
        "prompt must be a string (or a list of token ids; one prompt per request)",
        "prompt",
        "invalid_value",
    )


def rag_request(body: dict, has_index: bool, default_k: int) -> int:
    """How many chunks to retrieve for this request (0: no retrieval), from `rag` / `rag_k`."""
    wanted = _bool(body, "rag", has_index)
    k = _integer(body, "rag_k", 1, 20, default=default_k)
    if wanted and not has_index:
        raise ApiError(
            400,
            "rag: this server has no document index (start it with `azllm serve --rag INDEX`)",
            "rag",
            "invalid_value",
        )
    return k if wanted else 0


def model_name(body: dict, served: str) -> str:
    """The `model` a request names: the served one (its default) or "azllm"; 404 otherwise."""
    model = body.get("model", served)
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model not in (served, "azllm"):
        raise ApiError(
            404,
            f"The model `{_show(model)[1:-1]}` does not exist; this server has `{served}` "
            "(GET /v1/models)",
            "model",
            "model_not_found",
        )
    return model


def fit(n_prompt: int, max_tokens: int | None, ctx: int, prompt_param: str) -> int:
    """The max_tokens to generate: the request's, or the default capped by the room the prompt
    leaves. The fit rule is sampling.fit_max_tokens (the engine's and generate()'s too); its
    DoesNotFit names the field at fault."""
    try:
        room = fit_max_tokens(n_prompt, max_tokens, ctx)
    except DoesNotFit as e:
        raise ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens: {e}",
            prompt_param if e.param == "prompt" else "max_tokens",
            "context_length_exceeded",
        ) from None
    return room if max_tokens is not None else min(DEFAULTS.max_new_tokens, room)


def safe_end(text: str, stops: list[str]) -> int:
    """How much of text can be sent: hold back a tail that may be the start of a stop string."""
    longest = max((len(s) for s in stops), default=1)
    for keep in range(min(len(text), longest - 1), 0, -1):
        if any(s.startswith(text[-keep:]) for s in stops):
            return len(text) - keep
    return len(text)


def find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Where the first stop string starts in text (only text after `sent` can hold a new one)."""
    hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
    return min(hits) if hits else None


# ---- response shapes ---------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(
    chat: bool,
    rid: str,
    created: int,
    model: str,
    text: str,
    finish: str,
    use: dict,
    sources: list[dict] | None = None,
) -> dict:
    """A whole `chat.completion` (chat=True) or `text_completion`; `sources` (retrieval) is
    added as a top-level field when given."""
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": use,
        **({"sources": sources} if sources is not None else {}),
    }


def chunk(
    chat: bool,
    rid: str,
    created: int,
    model: str,
    *,
    text: str | None = None,
    finish: str | None = None,
    first: bool = False,
    use: dict | None = None,
    include_usage: bool = False,
    sources: list[dict] | None = None,
) -> dict:
    """One streamed chunk. Chat: the first carries delta {"role": "assistant", "content": ""},
    the last delta {} with finish_reason. With include_usage every chunk has "usage": null but
    a final extra one with choices [] and the usage."""
    out = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
    }
    if use is None:
        if chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}
        out["choices"] = [choice]
    if include_usage:
        out["usage"] = use
    if sources is not None:  # retrieval: on the chunk with the finish_reason
        out["sources"] = sources
    return out
