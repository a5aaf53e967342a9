"""`azllm serve`: a web chat page, an OpenAI-compatible API and /health, over one batching engine.

Starlette (ASGI) on uvicorn: each HTTP request is a coroutine; its tokens come from the engine
thread through an asyncio queue of its own. Routes:
  GET  /                      the chat page (azllm/chat/web.py)
  GET  /health                {"status": "ok", ...} plus the engine's counters
  GET  /v1/models             the one model, named after the run directory ("azllm" also works)
  POST /v1/chat/completions   messages -> the chat template -> a reply ending at <|end|> or EOS
                              (with --rag: sources retrieved for the last user message, in a
                              system turn and in the reply's "sources"; api.py's docstring)
  POST /v1/completions        a plain text continuation, ending at EOS
`stream: true` answers with server-sent events ending in `data: [DONE]`; mistakes get a 4xx in
OpenAI's error shape (shapes and checks: azllm/chat/api.py), and a failure after the stream has
started is sent as an error event, then `data: [DONE]`. A client that goes away, streaming or
not, frees its row in the engine. The host check, CORS, API key and Content-Type rules sit in
front of the routes (azllm/chat/guard.py); the body limit is enforced here, while reading.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from azllm.chat import api
from azllm.chat.api import ApiError, Params
from azllm.chat.engine import Engine
from azllm.chat.guard import Guard, guarded
from azllm.errors import AzllmError
from azllm.generate import StreamDecoder
from azllm.tokenizer import AzTokenizer

MAX_BODY = 4 * 1024 * 1024


class _EventStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends (finished, client gone, or
    never started), so the engine row is always released."""

    def __init__(self, content, on_close: Callable[[], None], **kw) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _until_disconnect(request: Request) -> None:
    # the body has been read, so the next message on the receive channel is http.disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    """The routes, bound to one engine, tokenizer and model name."""

    def __init__(
        self, engine: Engine, tok: AzTokenizer, name: str, needs_key: bool, rag=None, rag_k=4
    ) -> None:
        self.engine, self.tok, self.name, self.needs_key = engine, tok, name, needs_key
        self.rag, self.rag_k = rag, rag_k  # an azllm.rag Index (--rag), chunks per question
        self.created = int(time.time())
        # Text longer than this cannot fit the context, whatever it says: each token covers at
        # most `longest` bytes (a byte fragment decodes to U+FFFD, 3 bytes: an overestimate),
        # and NFC can shrink text at most 3x (Hangul jamo), so 4x is safe. Checked before
        # tokenizing, which blocks the event loop (4 MB of text: ~5 s on a CPU).
        longest = max(len(tok.decode([i]).encode()) for i in range(tok.vocab_size))
        self.max_text_bytes = 4 * max(longest, 1) * engine.ctx

    async def _body(self, request: Request) -> dict:
        """The JSON body, read chunk by chunk and refused as soon as it passes MAX_BODY, so a
        huge upload costs at most MAX_BODY of memory (uvicorn pauses the socket between reads)."""
        too_big = ApiError(413, f"request body over {MAX_BODY} bytes", None, "body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 12 or int(declared) > MAX_BODY):
            raise too_big
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY:
                raise too_big
            parts.append(part)
        body = api.parse_json(b"".join(parts))
        api.model_name(body, self.name)
        return body

    def _check_size(self, texts: list[str], param: str) -> None:
        size = sum(len(t.encode()) for t in texts)
        if size > self.max_text_bytes:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.engine.ctx} tokens; "
                f"{size} bytes of text cannot fit it; shorten it",
                param,
                "context_length_exceeded",
            )

    def _submit(self, prompt: list[int], max_tokens: int, params: Params, stop_ids: set[int]):
        """Queue the request in the engine; (request, its event queue)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind, value):  # called in the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

        try:
            req = self.engine.submit(
                prompt,
                max_tokens=max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=params.seed,
                stop_ids=set() if params.ignore_eos else stop_ids,
                emit=emit,
            )
        except AzllmError as e:  # the engine is shutting down
            raise ApiError(503, str(e), None, "unavailable", "server_error") from None
        return req, events

    async def _generate(self, req, events: asyncio.Queue, params: Params) -> AsyncIterator[tuple]:
        """Yields ("text", piece)... then ("end", finish_reason, usage)."""
        decoder, text, sent, n_tokens = StreamDecoder(self.tok.decode), "", 0, 0
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
                self.engine.cancel(req)
                text, finish = text[:cut], "stop"
                break
            safe = api.safe_end(text, params.stop)
            if safe > sent:
                yield ("text", text[sent:safe])
                sent = safe
        if len(text) > sent:
            yield ("text", text[sent:])
        yield ("end", finish, api.usage(len(req.prompt), n_tokens))

    async def _complete(
        self,
        request: Request,
        prompt: list[int],
        params: Params,
        stop_ids: set[int],
        chat: bool,
        sources: list[dict] | None = None,
    ) -> Response:
        ctx, where = self.engine.ctx, "messages" if chat else "prompt"
        max_tokens = api.fit(len(prompt), params.max_tokens, ctx, where)
        # submitted before the first byte is sent, so a refusal is still an HTTP status
        req, queue = self._submit(prompt, max_tokens, params, stop_ids)

        def release() -> None:
            if not req.finished:  # a stop string, an error, or the client went away
                self.engine.cancel(req)

        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, events = int(time.time()), self._generate(req, queue, params)
        if not params.stream:
            try:
                return await self._whole(request, events, chat, rid, created, sources)
            finally:
                release()

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
                        yield chunk(finish=ev[1], sources=sources)
                        if params.include_usage:
                            yield chunk(use=ev[2])
            except Exception as e:  # the status line is sent already: report it in the stream
                if not isinstance(e, ApiError):
                    e = ApiError(
                        500, f"internal error: {type(e).__name__}", None, None, "server_error"
                    )
                yield f"data: {json.dumps(e.body())}\n\n".encode()
            yield b"data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _EventStream(sse(), release, media_type="text/event-stream", headers=headers)

    async def _whole(
        self, request: Request, events, chat: bool, rid: str, created: int, sources=None
    ):
        """A non-streamed reply; stops waiting (and so frees the row) if the client hangs up."""

        async def collect():
            parts = []
            async for ev in events:
                if ev[0] == "text":
                    parts.append(ev[1])
            return "".join(parts), ev[1], ev[2]

        job = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                raise ClientDisconnect()
            text, finish, use = job.result()
        finally:
            job.cancel()
            gone.cancel()
        out = api.response(chat, rid, created, self.name, text, finish, use, sources)
        return JSONResponse(out)

    # ---- routes ------------------------------------------------------------------------------

    async def page(self, request: Request) -> HTMLResponse:
        from azllm.chat.web import render_page

        return HTMLResponse(render_page(self.name, self.engine.ctx, needs_key=self.needs_key))

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

    async def chat_completions(self, request: Request) -> Response:
        body = await self._body(request)
        params = api.parse_params(body)
        messages = api.chat_messages(body)
        self._check_size([m["content"] for m in messages], "messages")
        k, sources = api.rag_request(body, self.rag is not None, self.rag_k), None
        if k:
            messages, sources = await self._with_sources(messages, params, k)
        prompt, _ = self.tok.encode_chat(messages, add_generation_prompt=True)
        stop_ids = {self.tok.end_id, self.tok.eos_id}
        return await self._complete(request, prompt, params, stop_ids, True, sources)

    async def _with_sources(self, messages: list[dict], params: Params, k: int):
        """The messages with the retrieved chunks in their system turn, fitted to leave the reply
        its room (max_tokens, or the default reply length up to half the context), and the
        sources as the response's "sources" field."""
        from azllm.rag.prompt import add_sources, retrieve

        hits = await asyncio.to_thread(retrieve, self.rag, messages, k)  # SQLite, off the loop
        reply = params.max_tokens or min(api.DEFAULTS.max_new_tokens, self.engine.ctx // 2)
        messages, used = add_sources(self.tok, messages, hits, self.engine.ctx - reply)
        return messages, [s.to_dict() for s in used]

    async def completions(self, request: Request) -> Response:
        body = await self._body(request)
        params = api.parse_params(body)
        prompt = api.completion_ids(body, self.tok, lambda text: self._check_size([text], "prompt"))
        return await self._complete(request, prompt, params, {self.tok.eos_id}, False)


def create_app(
    engine: Engine, tok: AzTokenizer, name: str, guard: Guard | None = None, rag=None, rag_k=4
):
    """The ASGI app: the routes behind the guard (guard.py; default: loopback only, no key);
    `rag` (an azllm.rag Index) turns on retrieval for chat completions."""
    guard = guard or Guard()
    s = Server(engine, tok, name, needs_key=guard.api_key is not None, rag=rag, rag_k=rag_k)

    async def api_error(request, exc: ApiError):
        # after a 413 the connection is closed, or uvicorn would read (and drop) the rest of
        # the upload, however long, before it answers the next request on it
        headers = {"Connection": "close"} if exc.status == 413 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request, exc: HTTPException):  # unknown path, wrong method
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(err.body(), status_code=exc.status_code)

    async def client_gone(request, exc: ClientDisconnect):  # nobody is left to read an answer
        return Response(status_code=499)

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
    handlers = {
        ApiError: api_error,
        HTTPException: http_error,
        ClientDisconnect: client_gone,
        Exception: server_error,
    }
    return guarded(Starlette(routes=routes, exception_handlers=handlers), guard)


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
    api_key: str | None = None,
    allowed_hosts: list[str] | None = None,
    cors_origins: list[str] | None = None,
    rag: str | None = None,
    rag_k: int = 4,
) -> None:
    """Load the run, start the engine, serve until Ctrl-C / SIGTERM. Port 0 picks a free port;
    the address bound is printed as `azllm: serving NAME (context N) on http://HOST:PORT`.
    api_key None reads AZLLM_API_KEY from the environment."""
    import uvicorn

    from azllm.checkpoint import load_run
    from azllm.device import resolve_device, resolve_precision

    if api_key is None:
        api_key = os.environ.get("AZLLM_API_KEY") or None
    guard = Guard(
        host=host,
        allowed_hosts=tuple(allowed_hosts or ()),
        api_key=api_key,
        cors_origins=tuple(cors_origins or ()),
    ).check()
    from azllm.rag.cli import open_rag  # a --rag folder that is not an index fails before loading

    index = open_rag(rag, rag_k)
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
    if not guard.loopback_only() and api_key is None:
        print(
            f"azllm: warning: --host {host} is reachable from other machines and anyone there "
            "can use the API; add --api-key (see the README's security notes)",
            file=sys.stderr,
            flush=True,
        )
    app = create_app(engine, tok, name, guard, rag=index, rag_k=rag_k)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()
