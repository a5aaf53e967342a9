"""Shared helpers for the chat tests: a tiny random run directory, a real `azllm serve` process
on a free loopback port, and small HTTP clients (stdlib only) for JSON and server-sent events."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from azllm.config import Config, ModelConfig

REPO = Path(__file__).resolve().parents[1]


def make_run(tokenizer_path: Path, out: Path, *, block_size: int = 256, seed: int = 0) -> Path:
    """A run directory with a random-init tiny llama model: config.json, tokenizer.json,
    model.safetensors — all `load_run` needs. Random weights give near-uniform logits, so
    replies are random text; tests that need exact lengths use ignore_eos / no stop ids."""
    from azllm.checkpoint import save_weights
    from azllm.model import GPT
    from azllm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        model=ModelConfig(
            vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=4, n_embd=64
        )
    )
    (out / "config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    tok.save(out / "tokenizer.json")
    torch.manual_seed(seed)
    save_weights(GPT(cfg.model), out / "model.safetensors")
    return out


def chat_cli(*args: str) -> list[str]:
    """The command line of `azllm ARGS` (chat, serve) as a real process."""
    return [sys.executable, "-m", "azllm.cli", *map(str, args)]


class ServerProcess:
    """`azllm serve --port 0` in a subprocess; `url` once /health answers."""

    def __init__(self, run: Path, *extra: str, timeout: float = 60) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            chat_cli("serve", "--run", run, "--port", "0", *extra),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()  # "azllm: serving NAME (context N) on http://..."
        m = re.search(r"on (http://\S+)", line)
        if not m:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r} {''.join(self.stderr)}")
        self.url = m.group(1)
        while True:
            try:
                if get_json(self.url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError(f"server never became healthy: {''.join(self.stderr)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _conn(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), parts.path


def request(
    method: str, url: str, body: bytes | str | dict | None = None, timeout: float = 60
) -> tuple[int, dict, bytes]:
    """(status, headers, raw body) of one HTTP request."""
    conn, path = _conn(url, timeout)
    if isinstance(body, dict):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def get_json(url: str, timeout: float = 10) -> tuple[int, dict]:
    status, _, data = request("GET", url, timeout=timeout)
    return status, json.loads(data)


def post_json(url: str, body, timeout: float = 60) -> tuple[int, dict]:
    status, _, data = request("POST", url, body, timeout=timeout)
    return status, json.loads(data)


def post_sse(url: str, body: dict, timeout: float = 60) -> tuple[int, str, list]:
    """(status, content type, events): each `data:` payload as parsed JSON, "[DONE]" as is."""
    conn, path = _conn(url, timeout)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = []
    for raw in resp:  # http.client undoes the chunked encoding; SSE is line-based
        line = raw.decode("utf-8").rstrip("\n")
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    conn.close()
    return resp.status, resp.getheader("content-type", ""), events


@pytest.fixture(scope="module")
def chat_run(tokenizer_path, tmp_path_factory) -> Path:
    return make_run(tokenizer_path, tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def server(chat_run):
    srv = ServerProcess(chat_run)
    yield srv
    srv.stop()
