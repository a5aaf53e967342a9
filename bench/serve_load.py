"""Load on `azllm serve`: N concurrent streaming clients against one client alone.

Each client sends streaming chat completions one after another (`ignore_eos`, so every reply is
exactly --max-tokens long and the phases do the same work) and records time to first token and
latency; a phase's aggregate tokens/s is all completion tokens over the phase's wall time.
Issue target on a 2-core CPU: 8 concurrent streams >= 3x the aggregate tokens/s of one stream.

    python bench/serve_load.py --run runs/baby                 # starts its own server
    python bench/serve_load.py --url http://127.0.0.1:8000     # a server already running
Options: --clients 8 --requests 3 (per client) --max-tokens 64 --time-limit 300 --json out.json
--threads N (with --run: the server's torch threads; 1 is faster on a busy machine)
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

PROMPTS = [
    "Salam! Azərbaycan haqqında bir neçə cümlə yaz.",
    "Bakı şəhəri haqqında nə bilirsən?",
    "Mənə qısa bir hekayə danış.",
    "Xəzər dənizi niyə göl sayılır?",
    "Novruz bayramını necə qeyd edirlər?",
]


def stream_one(url: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One streaming chat completion: {"ttft", "latency", "tokens"} in seconds / tokens."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.8,
    }
    start = time.perf_counter()
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, tokens = None, 0
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    conn.close()
    return {"ttft": ttft if ttft is not None else latency, "latency": latency, "tokens": tokens}


def phase(url: str, clients: int, requests: int, max_tokens: int, deadline: float) -> dict:
    results, errors = [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                r = stream_one(url, PROMPTS[(i + j) % len(PROMPTS)], max_tokens, left)
            except Exception as e:  # noqa: BLE001 - report, do not hang the bench
                with lock:
                    errors.append(str(e))
                return
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)

    def pct(key: str, q: float) -> float:
        xs = sorted(r[key] for r in results)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50": statistics.median(r["ttft"] for r in results) if results else None,
        "ttft_p95": pct("ttft", 0.95),
        "latency_p50": pct("latency", 0.5),
        "latency_p95": pct("latency", 0.95),
    }


def start_server(run: str, max_batch: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "azllm.cli", "serve", "--run", run, "--port", "0"]
    cmd += ["--max-batch", str(max_batch)] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    m = re.search(r"on (http://\S+)", line)
    if not m:
        proc.kill()
        sys.exit(f"server did not start: {line!r}")
    return proc, m.group(1)


def get_health(url: str) -> dict:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running azllm serve, e.g. http://127.0.0.1:8000")
    where.add_argument("--run", help="run directory: start a server for it on a free port")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="with --run: the engine's batch")
    ap.add_argument("--threads", type=int, help="with --run: the server's torch threads")
    ap.add_argument("--time-limit", type=float, default=300, help="seconds for the whole bench")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.clients < 1 or args.requests < 1 or args.clients > 64:
        sys.exit("--clients must be 1..64 and --requests at least 1")

    proc = None
    if args.run:
        proc, url = start_server(args.run, args.max_batch, args.threads)
    else:
        url = args.url.rstrip("/")
    try:
        for _ in range(200):
            try:
                health = get_health(url)
                break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit(f"{url}/health does not answer")
        deadline = time.monotonic() + args.time_limit
        stream_one(url, PROMPTS[0], 4, 60)  # warm-up: first-call allocations
        rows = [
            phase(url, 1, args.requests, args.max_tokens, deadline),
            phase(url, args.clients, args.requests, args.max_tokens, deadline),
        ]
        engine = get_health(url)["engine"]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)

    print(
        f"server {url}: model {health['model']}, context {health['context']}; "
        f"{args.max_tokens} tokens per reply, {args.requests} request(s) per client"
    )
    print(
        f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>8} "
        f"{'TTFT p50':>9} {'TTFT p95':>9} {'lat p50':>8} {'lat p95':>8}"
    )
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['wall_s']:>7.2f} "
            f"{r['tokens_per_s']:>8.1f} {r['ttft_p50']:>9.3f} {r['ttft_p95']:>9.3f} "
            f"{r['latency_p50']:>8.2f} {r['latency_p95']:>8.2f}"
            + (f"  {len(r['errors'])} errors: {r['errors'][0]}" if r["errors"] else "")
        )
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"] if rows[0]["tokens_per_s"] else 0
    target = 3.0 if args.clients >= 8 else None
    print(
        f"aggregate speed-up with {args.clients} clients: {ratio:.2f}x"
        + (
            f" (target >= {target:.0f}x: {'met' if ratio >= target else 'NOT met'})"
            if target
            else ""
        )
        + f"; engine's largest batch {engine['max_batch_seen']}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "url": url,
                    "max_tokens": args.max_tokens,
                    "phases": rows,
                    "speedup": ratio,
                    "engine": engine,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
