"""`azllm serve`: a web chat page, an OpenAI-compatible API and /health, over one batching engine.

Starlette (ASGI) on uvicorn: each HTTP request is a coroutine; its tokens come from the engine
thread through an asyncio queue of its own. Routes:
  GET  /                      the chat page (azllm/chat/web.py)
  GET  /health                {"status": "ok", ...} plus the engine's counters
  GET  /v1/models             the one model, named after the run directory ("azllm" also works)
  POST /v1/chat/completions   messages -> the chat template -> a reply ending at <|end|> or EOS
  POST /v1/completions        a plain text continuation, ending at EOS
`stream: true` answers with server-sent events ending in `data: [DONE]`; mistakes get a 4xx in
OpenAI's error shape (shapes and checks: azllm/chat/api.py). A client that goes away mid-stream
frees its row in the engine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from azllm.chat import api
from azllm.chat.api import ApiError, Params
from azllm.chat.engine import Engine
from azllm.errors import AzllmError
from azllm.generate import StreamDecoder
from azllm.tokenizer import AzTokenizer

MAX_BODY = 4 * 1024 * 1024


class Server:
    """The routes, bound to one engine, tokenizer and model name."""

    def __init__(self, engine: Engine, tok: AzTokenizer, name: str) -> None:
        self.engine, self.tok, self.name = engine, tok, name
        self.created = int(time.time())

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes", None, "body_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(
                400, f"the request body is not valid JSON ({e})", None, "invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        model = body.get("model", self.name)
        if model not in (self.name, "azllm"):
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server has `{self.name}` "
                "(GET /v1/models)",
                "model",
                "model_not_found",
            )
        return body

    async def _generate(
        self, prompt: list[int], params: Params, stop_ids: set[int]
    ) -> AsyncIterator[tuple]:
        """Yields ("text", piece)... then ("end", finish_reason, usage)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, value):  # called in the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

        req = self.engine.submit(
            prompt,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop_ids=set() if params.ignore_eos else stop_ids,
            emit=emit,
        )
        decoder, text, sent, n_tokens = StreamDecoder(self.tok.decode), "", 0, 0
        try:
            while True:
                kind, value = await events.get()
                if kind == "error":
                    raise ApiError(
                        500, f"generation failed: {value}", None, "engine_error", "server_error"
                    )
                if kind == "done":
                    finish, n_tokens = value.finish_reason, value.completion_tokens
                    break
                n_tokens += 1
                text += decoder.push(value)
                cut = api.find_stop(text, params.stop, sent)
                if cut is not None:  # a stop string: the reply ends before it
                    text, finish = text[:cut], "stop"
                    break
                safe = api.safe_end(text, params.stop)
                if safe > sent:
                    yield ("text", text[sent:safe])
                    sent = safe
        finally:
            if not req.finished:  # a stop string, or the client went away
                self.engine.cancel(req)
        if len(text) > sent:
            yield ("text", text[sent:])
        yield ("end", finish, api.usage(len(prompt), n_tokens))

    async def _complete(self, prompt: list[int], params: Params, stop_ids: set[int], chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, events = int(time.time()), self._generate(prompt, params, stop_ids)
        if not params.stream:
            parts = []
            async for ev in events:
                if ev[0] == "text":
                    parts.append(ev[1])
            _, finish, use = ev
            return JSONResponse(
                api.response(chat, rid, created, self.name, "".join(parts), finish, use)
            )

        def chunk(**kw) -> bytes:
            obj = api.chunk(chat, rid, created, self.name, include_usage=params.include_usage, **kw)
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

        async def sse():
            try:
                if chat:  # OpenAI's first chunk: delta {"role": "assistant", "content": ""}
                    yield chunk(text="", first=True)
                async for ev in events:
                    if ev[0] == "text":
                        yield chunk(text=ev[1])
                    else:
                        yield chunk(finish=ev[1])
                        if params.include_usage:
                            yield chunk(use=ev[2])
            except ApiError as e:  # the status line is sent already: report it in the stream
                yield f"data: {json.dumps(e.body())}\n\n".encode()
            yield b"data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(sse(), media_type="text/event-stream", headers=headers)

    # ---- routes ------------------------------------------------------------------------------

    async def page(self, request: Request) -> HTMLResponse:
        from azllm.chat.web import render_page

        return HTMLResponse(render_page(self.name, self.engine.ctx))

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "model": self.name,
                "context": self.engine.ctx,
                "engine": dict(self.engine.stats),
            }
        )

    async def models(self, request: Request) -> JSONResponse:
        model = {"id": self.name, "object": "model", "created": self.created, "owned_by": "azllm"}
        return JSONResponse({"object": "list", "data": [model]})

    async def chat_completions(self, request: Request):
        body = await self._body(request)
        params = api.parse_params(body)
        prompt, _ = self.tok.encode_chat(api.chat_messages(body), add_generation_prompt=True)
        api.check_fit(len(prompt), params.max_tokens, self.engine.ctx, "messages")
        return await self._complete(prompt, params, {self.tok.end_id, self.tok.eos_id}, True)

    async def completions(self, request: Request):
        body = await self._body(request)
        params = api.parse_params(body)
        prompt = api.completion_ids(body, self.tok)
        api.check_fit(len(prompt), params.max_tokens, self.engine.ctx, "prompt")
        return await self._complete(prompt, params, {self.tok.eos_id}, False)


def create_app(engine: Engine, tok: AzTokenizer, name: str) -> Starlette:
    s = Server(engine, tok, name)

    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request, exc: HTTPException):  # unknown path, wrong method
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(err.body(), status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        err = ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error")
        return JSONResponse(err.body(), status_code=500)

    routes = [
        Route("/", s.page, methods=["GET"]),
        Route("/health", s.health, methods=["GET"]),
        Route("/v1/models", s.models, methods=["GET"]),
        Route("/v1/chat/completions", s.chat_completions, methods=["POST"]),
        Route("/v1/completions", s.completions, methods=["POST"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    return Starlette(routes=routes, exception_handlers=handlers)


def serve(
    run_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    weights: str = "model",
    device: str = "auto",
    precision: str = "fp32",
    max_batch: int = 16,
    name: str | None = None,
) -> None:
    """Load the run, start the engine, serve until Ctrl-C / SIGTERM. Port 0 picks a free port;
    the address bound is printed as `azllm: serving NAME (context N) on http://HOST:PORT`."""
    import uvicorn

    from azllm.checkpoint import load_run
    from azllm.device import resolve_device, resolve_precision

    dev = resolve_device(device)
    model, tok, _ = load_run(Path(run_dir), dev, weights)
    engine = Engine(model, max_batch=max_batch, precision=resolve_precision(precision, dev))
    name = name or Path(run_dir).resolve().name
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        engine.shutdown()
        raise AzllmError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick another port"
        ) from None
    shown = f"[{host}]" if ":" in host else host
    print(
        f"azllm: serving {name} (context {engine.ctx}) on http://{shown}:{sock.getsockname()[1]}",
        flush=True,
    )
    app = create_app(engine, tok, name)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()
