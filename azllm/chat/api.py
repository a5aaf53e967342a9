"""OpenAI's API, the parts `azllm serve` speaks: request validation and response shapes.

Plain functions over dicts (no web framework), so the shapes can be read in one place:
errors are {"error": {"message", "type", "param", "code"}}; replies are `chat.completion` /
`text_completion` objects, streamed as `chat.completion.chunk` (choices[].delta) /
`text_completion` chunks. Extensions beyond OpenAI: `top_k`, and `ignore_eos` (as in vLLM:
generate exactly max_tokens, for benchmarks). A "developer" message is a system message.
"""

from __future__ import annotations

from dataclasses import dataclass

from azllm.tokenizer import AzTokenizer

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


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


@dataclass
class Params:
    max_tokens: int | None  # None: up to the context
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool


def _number(body: dict, name: str, lo: float, hi: float, default, lo_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not ((lo < value if lo_open else lo <= value) and value <= hi):
        side = "(" if lo_open else "["
        raise ApiError(
            400,
            f"{name} must be a number in {side}{lo}, {hi}], got {value!r}",
            name,
            "invalid_value",
        )
    return value


def _integer(body: dict, name: str, lo: int, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ApiError(
            400, f"{name} must be an integer >= {lo}, got {value!r}", name, "invalid_value"
        )
    return value


def parse_params(body: dict) -> Params:
    """Sampling and streaming options of a completion request, checked."""
    max_tokens = _integer(body, "max_completion_tokens", 1, _integer(body, "max_tokens", 1))
    if _integer(body, "n", 1, 1) != 1:
        raise ApiError(
            400, "n: only one choice per request is supported (n=1)", "n", "invalid_value"
        )
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not (
        isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)
    ):
        raise ApiError(
            400,
            "stop must be a string or a list of at most 4 non-empty strings",
            "stop",
            "invalid_value",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(
            400, f"stream must be true or false, got {stream!r}", "stream", "invalid_type"
        )
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options", "invalid_type")
    return Params(
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 0, 2, 1.0)),
        top_p=float(_number(body, "top_p", 0, 1, 1.0, lo_open=True)),
        top_k=_integer(body, "top_k", 0) or None,
        seed=_integer(body, "seed", -(2**63)),
        stop=stop,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        ignore_eos=bool(body.get("ignore_eos", False)),
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
        if role not in ROLES:
            raise ApiError(
                400,
                f"Invalid value: {role!r}. Supported roles are 'system', "
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


def completion_ids(body: dict, tok: AzTokenizer) -> list[int]:
    """`prompt` of /v1/completions as token ids: a string (BOS + its tokens, as `azllm generate`
    does) or a list of token ids; a batch of one is accepted."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
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


def check_fit(n_prompt: int, max_tokens: int | None, ctx: int, prompt_param: str) -> None:
    if n_prompt >= ctx:
        raise ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens, but the "
            f"prompt has {n_prompt} tokens; shorten it",
            prompt_param,
            "context_length_exceeded",
        )
    if max_tokens is not None and n_prompt + max_tokens > ctx:
        raise ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens; the prompt "
            f"has {n_prompt} tokens and max_tokens asks for {max_tokens}; ask for at "
            f"most {ctx - n_prompt}",
            "max_tokens",
            "context_length_exceeded",
        )


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
    chat: bool, rid: str, created: int, model: str, text: str, finish: str, use: dict
) -> dict:
    """A whole `chat.completion` (chat=True) or `text_completion`."""
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
    return out
