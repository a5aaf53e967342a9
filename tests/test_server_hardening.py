"""`azllm serve` against hostile or careless clients, over real HTTP on 127.0.0.1: malformed and
oversized bodies, clients that hang up, cross-site requests, API keys, and a seeded fuzz."""

import http.client
import json
import os
import random
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from chat_fixtures import ServerProcess, chat_run, get_json, make_run, server  # noqa: F401

from azllm.chat.server import MAX_BODY, create_app
from azllm.tokenizer import load_tokenizer

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Salam"}]


def call(url: str, method: str, path: str, body=None, headers=None, timeout: float = 60):
    """(status, lower-cased headers, raw body); JSON content type unless headers say otherwise."""
    host, port = url.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body)  # ensure_ascii: a lone surrogate travels as the escape \ud800
    conn.request(
        method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def sse_events(data: bytes) -> list:
    out = []
    for line in data.decode().splitlines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ---- 1, 5: every field typed and bounded; no 500 on hostile input ---------------------------

DIGITS = "9" * 5000
HOSTILE = [
    (CHAT, {"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    (CHAT, {"messages": [{"role": {"a": 1}, "content": "x"}]}, "messages[0].role"),
    (TEXT, '{"prompt": "x", "max_tokens": ' + DIGITS + "}", None),
    (TEXT, {"prompt": "x", "max_tokens": 2**40}, "max_tokens"),
    (CHAT, {"messages": USER, "max_tokens": 3, "seed": 2**64}, "seed"),
    (CHAT, {"messages": USER, "max_tokens": 3, "seed": -(2**63) - 1}, "seed"),
    (CHAT, {"messages": [{"role": "user", "content": "\ud800"}]}, None),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
        None,
    ),
    (TEXT, {"prompt": "\ud800", "max_tokens": 2}, None),
    (TEXT, {"prompt": "x", "user": {"\udc00": 1}}, None),  # keys too, in fields we ignore
    (TEXT, b'{"prompt": "\xed\xa0\x80"}', None),  # the surrogate as raw (CESU) bytes
    (TEXT, "[" * 100_000, None),  # deeper than Python's stack
    (TEXT, '{"prompt": "x", "user": %s}' % ("[" * 500 + "]" * 500), None),  # deep, but parses
    (TEXT, '{"prompt": "x", "temperature": NaN}', None),
    (TEXT, '{"prompt": "x", "top_p": Infinity}', None),
    (
        CHAT,
        {"messages": USER, "stream_options": {"include_usage": "false"}},
        "stream_options.include_usage",
    ),
    (CHAT, {"messages": USER, "ignore_eos": "false"}, "ignore_eos"),
    (CHAT, {"messages": USER, "ignore_eos": 1}, "ignore_eos"),
    (CHAT, {"messages": USER, "stream_options": [1]}, "stream_options"),
    (CHAT, {"messages": USER, "temperature": "0.5"}, "temperature"),
    (CHAT, {"messages": USER, "top_k": 2.5}, "top_k"),
    (CHAT, {"messages": USER, "n": "1"}, "n"),
    (CHAT, {"messages": USER, "model": ["azllm"]}, "model"),
    (CHAT, {"messages": USER, "stop": [["x"]]}, "stop"),
    (TEXT, {"prompt": [1, 2.0]}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", HOSTILE)
def test_hostile_fields_get_a_400_not_a_500(server, path, body, param):  # noqa: F811
    status, headers, raw = call(server.url, "POST", path, body)
    assert status == 400, raw[:300]
    err = json.loads(raw)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert len(err["message"]) < 300  # a 5,000-digit number is not echoed back


def test_a_bad_seed_with_stream_is_refused_before_the_stream_starts(server):  # noqa: F811
    body = {"messages": USER, "max_tokens": 3, "seed": 2**64, "stream": True}
    status, headers, raw = call(server.url, "POST", CHAT, body)
    assert status == 400 and headers["content-type"].startswith("application/json"), raw
    assert json.loads(raw)["error"]["param"] == "seed"
    # the largest seed torch takes is fine
    body = {"prompt": "x", "max_tokens": 2, "seed": 2**64 - 1, "stream": True}
    status, _, raw = call(server.url, "POST", TEXT, body)
    assert status == 200 and sse_events(raw)[-1] == "[DONE]"


@pytest.mark.parametrize("path", [CHAT, TEXT])
def test_text_too_long_to_fit_is_refused_without_tokenizing_it(server, path):  # noqa: F811
    text = "Azerbaycan Respublikasi Cenubi Qafqazda yerlesir. " * 70_000  # 3.5 MB, ASCII
    body = {"prompt": text} if path == TEXT else {"messages": [{"role": "user", "content": text}]}
    start = time.monotonic()
    status, _, raw = call(server.url, "POST", path, body)
    took = time.monotonic() - start
    assert status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"
    assert took < 2.5, took  # tokenizing it would hold the event loop ~5 s; this takes ~0.1 s


class _Engine:
    """Stands in for the engine: one good token, then a token id the tokenizer cannot decode,
    so the failure happens after the stream's status line has gone out."""

    ctx, stats = 64, {}

    def check(self, n_prompt, max_tokens):
        return max_tokens or self.ctx - n_prompt

    def submit(self, prompt, *, emit, **kw):
        emit("token", 7)
        emit("token", 10**30)
        return SimpleNamespace(prompt=prompt, finished=False)

    def cancel(self, req):
        req.finished = True


def test_a_failure_mid_stream_is_an_error_event_then_done(chat_run):  # noqa: F811
    import uvicorn

    app = create_app(_Engine(), load_tokenizer(chat_run / "tokenizer.json"), "fake")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        while not srv.started:
            time.sleep(0.01)
        for path, body in ((CHAT, {"messages": USER}), (TEXT, {"prompt": "x"})):
            status, _, raw = call(url, "POST", path, {**body, "stream": True})
            events = sse_events(raw)
            assert status == 200 and events[-1] == "[DONE]", raw
            assert events[-2]["error"]["type"] == "server_error", events
            status, _, raw = call(url, "POST", path, body)  # not streamed: a plain 500
            assert status == 500 and json.loads(raw)["error"]["type"] == "server_error"
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


# ---- 2: the body limit holds while reading --------------------------------------------------


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = dict(
        line.split(":", 1)
        for line in open(f"/proc/{pid}/status").read().splitlines()
        if ":" in line
    )
    return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def test_a_huge_streamed_upload_is_refused_while_it_is_being_read(server):  # noqa: F811
    pid, total, piece = server.proc.pid, 64 * 2**20, b"x" * 2**20
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # restart the peak (VmHWM) from the current RSS
    rss0, _ = _rss(pid)
    sock = socket.create_connection(("127.0.0.1", port_of(server.url)))
    sock.sendall(
        f"POST {TEXT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    sent, reply = [0], bytearray()

    def upload():  # no Content-Length: the server can only count as it reads
        try:
            while sent[0] < total:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent[0] += len(piece)
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed: the rest is refused
            pass

    sender = threading.Thread(target=upload)
    sender.start()
    sock.settimeout(60)
    try:
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    except ConnectionResetError:
        pass
    sender.join(60)
    sock.close()
    rss1, peak = _rss(pid)
    assert reply.startswith(b"HTTP/1.1 413"), bytes(reply[:200])
    assert sent[0] < total  # refused before the client had sent it all
    assert peak - rss0 < 24 * 2**20, (rss0, rss1, peak)  # MAX_BODY (4 MB) and buffers, not 64 MB
    assert call(server.url, "GET", "/health")[0] == 200


def test_a_declared_huge_body_is_refused_before_it_is_sent(server):  # noqa: F811
    sock = socket.create_connection(("127.0.0.1", port_of(server.url)), timeout=30)
    sock.sendall(
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
    )
    reply = b""
    while chunk := sock.recv(65536):  # the server closes the connection after a 413
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"body_too_large"' in reply


# ---- 3: abandoned requests are cancelled -----------------------------------------------------


@pytest.fixture(scope="module")
def long_server(tokenizer_path, tmp_path_factory):
    """A server whose context is long enough that a reply takes seconds, not milliseconds."""
    run = make_run(tokenizer_path, tmp_path_factory.mktemp("long") / "long-chat", block_size=4096)
    srv = ServerProcess(run, "--max-batch", "4")
    yield srv
    srv.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_clients_that_hang_up_free_their_rows(long_server, stream):
    url, n, max_tokens = long_server.url, 4, 4000
    before = get_json(url + "/health")[1]["engine"]
    body = json.dumps(
        {"prompt": "Bir gün", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    ).encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port_of(url)))
        s.sendall(
            f"POST {TEXT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        socks.append(s)
    deadline = time.monotonic() + 30
    while get_json(url + "/health")[1]["engine"]["running"] < n:  # all four rows decoding
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for s in socks:
        s.close()
    while (engine := get_json(url + "/health")[1]["engine"])["running"] and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert engine["running"] == 0 and engine["cancelled"] - before["cancelled"] == n
    assert engine["tokens"] - before["tokens"] < n * max_tokens
    # the batch is free again: a short request is served at once
    status, out = call(url, "POST", TEXT, {"prompt": "x", "max_tokens": 4, "ignore_eos": True})[:2]
    assert status == 200
    assert "Traceback" not in "".join(long_server.stderr)


# ---- 4: cross-site requests, Host check, CORS, API key ---------------------------------------


def test_cross_site_requests_are_refused(server):  # noqa: F811
    url, port = server.url, port_of(server.url)
    body = json.dumps({"prompt": "x", "max_tokens": 2})
    evil = {"Origin": "http://evil.example", "Host": "evil.example"}
    # a page on evil.example whose name now points at 127.0.0.1 (DNS rebinding)
    assert call(url, "POST", TEXT, body, {**evil, "Content-Type": "text/plain"})[0] == 403
    assert call(url, "POST", TEXT, body, {**evil, "Host": f"evil.example:{port}"})[0] == 403
    assert call(url, "GET", "/v1/models", None, evil)[0] == 403
    # a cross-site form or text/plain POST (no CORS preflight needed) with a good Host
    status, _, raw = call(url, "POST", TEXT, body, {"Content-Type": "text/plain"})
    assert status == 415 and json.loads(raw)["error"]["code"] == "unsupported_media_type"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert call(url, "POST", CHAT, "a=b", form)[0] == 415
    # no CORS header for another origin: the browser keeps the answer from that page
    status, headers, _ = call(url, "GET", "/v1/models", None, {"Origin": "http://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in headers
    pre = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    status, headers, _ = call(url, "OPTIONS", CHAT, None, pre)
    assert status >= 400 and "access-control-allow-origin" not in headers
    # the names the server was started for pass, with or without the port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert call(url, "POST", TEXT, body, {"Host": host})[0] == 200, host
    ctype = {"Content-Type": "application/json; charset=utf-8"}
    assert call(url, "POST", TEXT, body, ctype)[0] == 200


@pytest.fixture(scope="module")
def guarded_server(chat_run):  # noqa: F811
    old = os.environ.get("AZLLM_API_KEY")
    os.environ["AZLLM_API_KEY"] = "sekret"  # the key from the environment
    try:
        srv = ServerProcess(
            chat_run, "--cors-origin", "http://app.example", "--allowed-host", "chat.example"
        )
    finally:
        if old is None:
            del os.environ["AZLLM_API_KEY"]
        else:
            os.environ["AZLLM_API_KEY"] = old
    yield srv
    srv.stop()


def test_the_api_key_guards_v1_only(guarded_server):
    url, key = guarded_server.url, {"Authorization": "Bearer sekret"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        status, got, raw = call(url, "GET", "/v1/models", None, headers)
        assert status == 401 and got["www-authenticate"] == "Bearer"
        err = json.loads(raw)["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert call(url, "POST", CHAT, {"messages": USER, "max_tokens": 2}, headers)[0] == 401
    assert call(url, "GET", "/v1/models", None, key)[0] == 200
    status, _, raw = call(url, "POST", CHAT, {"messages": USER, "max_tokens": 2}, key)
    assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] <= 2
    assert call(url, "GET", "/health")[0] == 200
    status, _, page = call(url, "GET", "/")
    assert status == 200 and b'<div id="key-box" >' in page  # the page asks for the key


def test_the_key_field_is_hidden_without_a_key(server):  # noqa: F811
    assert b'<div id="key-box" hidden>' in call(server.url, "GET", "/")[2]


def test_cors_and_allowed_hosts_when_asked_for(guarded_server):
    url, key = guarded_server.url, {"Authorization": "Bearer sekret"}
    pre = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = call(url, "OPTIONS", CHAT, None, pre)  # preflight: no key needed
    assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, headers, _ = call(url, "OPTIONS", CHAT, None, {**pre, "Origin": "http://evil.example"})
    assert status == 400 and "access-control-allow-origin" not in headers
    got = call(url, "GET", "/v1/models", None, {**key, "Origin": "http://app.example"})[1]
    assert got["access-control-allow-origin"] == "http://app.example"
    got = call(url, "GET", "/v1/models", None, {**key, "Origin": "http://evil.example"})[1]
    assert "access-control-allow-origin" not in got
    # a 401 still carries the CORS header, so the allowed page can show why
    got = call(url, "GET", "/v1/models", None, {"Origin": "http://app.example"})
    assert got[0] == 401 and got[1]["access-control-allow-origin"] == "http://app.example"
    assert call(url, "GET", "/health", None, {"Host": "chat.example"})[0] == 200
    assert call(url, "GET", "/health", None, {"Host": "CHAT.example:443"})[0] == 200
    assert call(url, "GET", "/health", None, {"Host": "other.example"})[0] == 403


def test_an_empty_api_key_is_a_one_line_error(chat_run):  # noqa: F811
    from conftest import run_cli

    proc = run_cli("serve", "--run", chat_run, "--port", "0", "--api-key", "", check=False)
    assert proc.returncode == 2 and "--api-key" in proc.stderr and "Traceback" not in proc.stderr


# ---- 6: fuzz -----------------------------------------------------------------------------------

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "stop"]
FIELDS += ["stream", "stream_options", "temperature", "top_p", "top_k", "seed", "ignore_eos"]
GOOD = {
    "model": lambda r: r.choice(["azllm", "tiny-chat"]),
    "messages": lambda r: [{"role": r.choice(["user", "system"]), "content": "Salam"}],
    "prompt": lambda r: r.choice(["Bakı", [5, 6, 7]]),
    "max_tokens": lambda r: r.randint(1, 3),
    "max_completion_tokens": lambda r: r.randint(1, 3),
    "n": lambda r: 1,
    "stop": lambda r: r.choice(["a", ["b", "c"]]),
    "stream": lambda r: r.random() < 0.5,
    "stream_options": lambda r: {"include_usage": r.random() < 0.5},
    "temperature": lambda r: r.uniform(0, 2),
    "top_p": lambda r: r.uniform(0.01, 1),
    "top_k": lambda r: r.randint(0, 100),
    "seed": lambda r: r.randint(-(2**63), 2**64 - 1),
    "ignore_eos": lambda r: r.random() < 0.5,
}


def junk(r: random.Random, depth: int = 0):
    """A random JSON value of any type, size and (bounded) nesting."""
    atoms = [
        None, True, False, 0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**64), 10**300, 0.5, -0.0,
        1e308, -3.5, "", "x", "false", "user", "\ud800", "\x00", "é" * 50, "<|end|>",
    ]  # fmt: skip
    roll = r.random()
    if depth > 4 or roll < 0.6:
        return r.choice(atoms)
    if roll < 0.8:
        return [junk(r, depth + 1) for _ in range(r.randint(0, 3))]
    keys = ["role", "content", "type", "text", "include_usage", "x", "\udfff"]
    return {r.choice(keys): junk(r, depth + 1) for _ in range(r.randint(0, 3))}


def fuzz_body(r: random.Random, path: str) -> str:
    """A valid request with a few fields replaced by junk (or dropped), sometimes cut up."""
    body = {"max_tokens": r.randint(1, 3)}  # short replies: the fuzz stays fast
    body["messages" if path == CHAT else "prompt"] = GOOD["messages" if path == CHAT else "prompt"](
        r
    )
    for name in FIELDS:
        if name not in body and r.random() < 0.3:
            body[name] = GOOD[name](r)
    for _ in range(r.choice([0, 1, 1, 2, 3])):
        name = r.choice(FIELDS)
        if r.random() < 0.2:
            body.pop(name, None)
        else:
            body[name] = junk(r)
    if isinstance(body.get("messages"), list) and body["messages"] and r.random() < 0.2:
        body["messages"][0] = {"role": junk(r), "content": junk(r)}
    text = json.dumps(body)
    if r.random() < 0.1:  # broken JSON too
        cut = r.randint(0, len(text))
        text = text[:cut] + r.choice(["", "}", "]]", "\\", '"', "\x00"]) + text[cut + 1 :]
    return text


def test_fuzz_only_2xx_and_4xx(server):  # noqa: F811
    r, seen, start = random.Random(1234), {}, time.monotonic()
    for i in range(300):
        path = r.choice([CHAT, TEXT])
        body = fuzz_body(r, path)
        status, headers, raw = call(server.url, "POST", path, body, timeout=30)
        assert status < 500, (i, body, raw[:300])
        seen[status] = seen.get(status, 0) + 1
        if status == 200 and headers["content-type"].startswith("text/event-stream"):
            assert sse_events(raw)[-1] == "[DONE]", (body, raw[-300:])
        else:
            json.loads(raw)  # a JSON answer, whole
    assert time.monotonic() - start < 120
    assert seen.get(200, 0) > 50 and seen.get(400, 0) > 50, seen  # both paths exercised
    assert call(server.url, "GET", "/health")[0] == 200
    assert server.proc.poll() is None and "Traceback" not in "".join(server.stderr)
