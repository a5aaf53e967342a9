"""`azllm serve` as a real process over real HTTP: the OpenAI-compatible API, streaming,
batching of concurrent requests, and errors that leave the server serving."""

import json
import threading

import pytest
from chat_fixtures import chat_run, get_json, post_json, post_sse, request, server  # noqa: F401

from azllm.chat.api import find_stop, safe_end
from azllm.tokenizer import load_tokenizer

MSGS = [
    {"role": "system", "content": "Sən köməkçisən."},
    {"role": "user", "content": "Salam! Azərbaycanın paytaxtı haradır?"},
]


@pytest.fixture(scope="module")
def tok(chat_run):  # noqa: F811
    return load_tokenizer(chat_run / "tokenizer.json")


def test_health_and_models(server, chat_run):  # noqa: F811
    status, health = get_json(server.url + "/health")
    assert status == 200 and health["status"] == "ok" and health["context"] == 256
    status, models = get_json(server.url + "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [chat_run.name]
    assert models["data"][0]["object"] == "model"


def test_chat_completion(server, chat_run, tok):  # noqa: F811
    body = {
        "model": chat_run.name,
        "messages": MSGS,
        "max_tokens": 9,
        "seed": 5,
        "ignore_eos": True,
    }
    status, out = post_json(server.url + "/v1/chat/completions", body)
    assert status == 200, out
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == chat_run.name
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(
        choice["message"]["content"], str
    )
    assert choice["finish_reason"] == "length"
    prompt_ids, _ = tok.encode_chat(MSGS, add_generation_prompt=True)  # the one template
    assert out["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 9,
        "total_tokens": len(prompt_ids) + 9,
    }
    # the same seed gives the same reply; "azllm" is accepted as the model name too
    status, again = post_json(server.url + "/v1/chat/completions", {**body, "model": "azllm"})
    assert again["choices"][0]["message"] == choice["message"]


def test_chat_streaming_is_openai_shaped_sse(server, chat_run):  # noqa: F811
    body = {
        "model": chat_run.name,
        "messages": MSGS,
        "max_tokens": 12,
        "seed": 7,
        "ignore_eos": True,
    }
    _, whole = post_json(server.url + "/v1/chat/completions", body)
    status, ctype, events = post_sse(
        server.url + "/v1/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert status == 200 and ctype.startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 4  # role chunk, several content chunks, the finish chunk, usage
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    finish = chunks[-2]["choices"][0]
    assert finish["finish_reason"] == "length" and finish["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == whole["choices"][0]["message"]["content"]  # streamed == whole, same seed


def test_completions_streaming_and_not(server, tok):  # noqa: F811
    body = {
        "model": "azllm",
        "prompt": "Bakı şəhəri",
        "max_tokens": 6,
        "seed": 3,
        "ignore_eos": True,
    }
    status, out = post_json(server.url + "/v1/completions", body)
    assert status == 200 and out["object"] == "text_completion"
    assert out["usage"]["prompt_tokens"] == 1 + len(tok.encode("Bakı şəhəri"))  # BOS + text
    assert out["usage"]["completion_tokens"] == 6
    _, _, events = post_sse(server.url + "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    assert {e["object"] for e in events[:-1]} == {"text_completion"}
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == out["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_the_api_defaults_are_the_models_defaults(server, tok):  # noqa: F811
    from azllm.sampling import SamplingSettings

    d, url = SamplingSettings(), server.url + "/v1/completions"
    body = {"prompt": "Bakı", "seed": 5, "ignore_eos": True}
    _, implicit = post_json(url, body)
    explicit = {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p}
    _, spelled = post_json(url, {**body, **explicit, "max_tokens": d.max_new_tokens})
    assert implicit["choices"][0]["text"] == spelled["choices"][0]["text"]
    assert implicit["usage"]["completion_tokens"] == d.max_new_tokens  # < the room: 256 - 3
    # the default length never asks for more than the context has room for
    prompt = [tok.bos_id] + [9] * (256 - 1 - d.max_new_tokens + 20)
    _, out = post_json(url, {"prompt": prompt, "ignore_eos": True, "max_tokens": None})
    assert out["usage"]["completion_tokens"] == 256 - len(prompt)


def test_stop_strings_cut_the_reply(server):  # noqa: F811
    body = {"prompt": "Salam", "max_tokens": 40, "seed": 11, "ignore_eos": True}
    _, full = post_json(server.url + "/v1/completions", body)
    text = full["choices"][0]["text"]
    stop = next(c for c in text[3:] if c.strip())  # a character of the reply
    cut = text.index(stop)
    for stream in (False, True):
        if stream:
            _, _, ev = post_sse(
                server.url + "/v1/completions", {**body, "stop": [stop], "stream": True}
            )
            got, reason = (
                "".join(e["choices"][0]["text"] for e in ev[:-1]),
                ev[-2]["choices"][0]["finish_reason"],
            )
        else:
            _, out = post_json(server.url + "/v1/completions", {**body, "stop": stop})
            got, reason = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
        assert (got, reason) == (text[:cut], "stop")


def test_stop_strings_split_across_pieces_are_held_back():
    stops = ["</s>", "STOP"]
    assert safe_end("hello </", stops) == len("hello ")  # may become "</s>": wait
    assert safe_end("hello ST", stops) == len("hello ")
    assert safe_end("hello S!", stops) == len("hello S!")
    assert safe_end("anything", []) == len("anything")
    assert find_stop("abc </s> def", stops, 0) == 4
    assert find_stop("abc STOP </s>", stops, 3) == 4  # the first one wins
    assert find_stop("abc </s", stops, 0) is None


def test_concurrent_requests_are_batched_and_each_as_alone(server):  # noqa: F811
    bodies = [
        {
            "messages": [{"role": "user", "content": f"Sual {i}: {'necə' * i}"}],
            "max_tokens": 40,
            "seed": i,
            "ignore_eos": True,
            "temperature": 1.0,
        }
        for i in range(4)
    ]
    url = server.url + "/v1/chat/completions"
    alone = [post_json(url, b)[1]["choices"][0]["message"]["content"] for b in bodies]
    before = get_json(server.url + "/health")[1]["engine"]
    results, start = [None] * 4, threading.Barrier(4)

    def client(i):
        start.wait()
        results[i] = post_json(url, {**bodies[i], "stream": False})[1]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = get_json(server.url + "/health")[1]["engine"]
    assert [r["choices"][0]["message"]["content"] for r in results] == alone
    assert after["max_batch_seen"] > 1
    steps, tokens = after["steps"] - before["steps"], after["tokens"] - before["tokens"]
    assert tokens == 160 and steps < tokens * 0.75  # decode steps served several rows at once


LONG = "salam dünya " * 400

BAD = [
    ("/v1/chat/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2]", 400, None, "invalid_json"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": MSGS}, 404, "model", "model_not_found"),
    (
        "/v1/chat/completions",
        {"messages": MSGS, "max_tokens": 10_000},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "/v1/chat/completions",
        {"messages": MSGS, "max_tokens": 0},
        400,
        "max_tokens",
        "invalid_value",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages[0].role",
        "invalid_value",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user"}]},
        400,
        "messages[0].content",
        "invalid_type",
    ),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "invalid_value"),
    (
        "/v1/chat/completions",
        {"messages": MSGS, "temperature": 7},
        400,
        "temperature",
        "invalid_value",
    ),
    ("/v1/chat/completions", {"messages": MSGS, "n": 3}, 400, "n", "invalid_value"),
    ("/v1/chat/completions", {"messages": MSGS, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/chat/completions", {"messages": MSGS, "top_p": 1.01}, 400, "top_p", "invalid_value"),
    ("/v1/chat/completions", {"messages": MSGS, "top_k": -1}, 400, "top_k", "invalid_value"),
    ("/v1/chat/completions", {"messages": MSGS, "top_k": 2**31}, 400, "top_k", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_k": "5"}, 400, "top_k", "invalid_type"),
    (
        "/v1/chat/completions",
        {"messages": MSGS, "ignore_eos": "false"},
        400,
        "ignore_eos",
        "invalid_type",
    ),
    (
        "/v1/chat/completions",
        {"messages": MSGS, "stream": True, "stream_options": {"include_usage": "false"}},
        400,
        "stream_options.include_usage",
        "invalid_type",
    ),
    ("/v1/chat/completions", {"messages": MSGS, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", "invalid_value"),
    (
        "/v1/completions",
        {"prompt": "x", "max_tokens": 256},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    ("/v1/nothing-here", {}, 404, None, None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD)
def test_bad_requests_get_openai_errors(server, path, body, status, param, code):  # noqa: F811
    got, headers, raw = request("POST", server.url + path, body)
    assert got == status, raw
    assert headers["content-type"].startswith("application/json")
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)


def test_the_server_keeps_serving_after_bad_requests(server):  # noqa: F811
    for path, body, *_ in BAD:
        request("POST", server.url + path, body)
    assert request("GET", server.url + "/v1/chat/completions")[0] == 405
    status, out = post_json(
        server.url + "/v1/chat/completions", {"messages": MSGS, "max_tokens": 3, "ignore_eos": True}
    )
    assert status == 200 and out["usage"]["completion_tokens"] == 3
    assert server.proc.poll() is None and "Traceback" not in "".join(server.stderr)


def test_the_openai_client(server, chat_run):  # noqa: F811
    openai = pytest.importorskip("openai", reason="pip install openai (the test extra)")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [chat_run.name]
    out = client.chat.completions.create(
        model=chat_run.name, messages=MSGS, max_tokens=8, seed=1, temperature=0.7, top_p=0.9
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens <= 8
    assert out.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model=chat_run.name,
            messages=MSGS,
            max_tokens=8,
            seed=1,
            temperature=0.7,
            top_p=0.9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    text = client.completions.create(model=chat_run.name, prompt="Bakı", max_tokens=5, seed=2)
    assert text.object == "text_completion" and text.usage.prompt_tokens >= 2
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=chat_run.name, messages=MSGS, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
