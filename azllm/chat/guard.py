"""The HTTP-level defences of `azllm serve`, in front of every route (pure ASGI middleware).

In order, outermost first:
1. Host check (DNS rebinding, as llama.cpp and Ollama do): a web page on evil.example whose name
   is re-pointed at 127.0.0.1 reaches this server as *same-origin* to the browser, but its
   requests carry `Host: evil.example`. Only the names the server was started for pass:
   localhost (and *.localhost, which browsers never send to DNS), the --host value, each
   --allowed-host, and IP literals (a browser that sends an IP as Host connected to that IP,
   so no DNS name could have been re-pointed). The port is not compared. 403 otherwise;
   `--allowed-host '*'` turns the check off (for a proxy that rewrites Host).
2. CORS, only with --cors-origin: then preflights from those origins are answered and their
   responses carry Access-Control-Allow-Origin; without it no CORS header is ever sent, so
   browsers keep other sites from reading answers (starlette's CORSMiddleware).
3. API key, only with --api-key / AZLLM_API_KEY: /v1/* needs `Authorization: Bearer KEY`
   (compared in constant time); 401 in OpenAI's error shape. / and /health stay open.
4. POST bodies must be `Content-Type: application/json` (415): a page on another site can POST
   text/plain or a form without a CORS preflight, but not JSON, so with this rule every
   cross-site POST needs a preflight, which fails unless --cors-origin allows it.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from azllm.chat.api import ApiError
from azllm.errors import AzllmError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Guard:
    """What `azllm serve` was started with: --host, --allowed-host, --api-key, --cors-origin."""

    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()

    def check(self) -> Guard:
        if self.api_key is not None and not self.api_key.strip():
            raise AzllmError("--api-key (or AZLLM_API_KEY) is empty; give a non-empty key")
        for origin in self.cors_origins:
            if origin != "*" and (
                not origin.startswith(("http://", "https://")) or origin.count("/") != 2
            ):
                raise AzllmError(
                    f"--cors-origin {origin}: give an origin such as https://app.example "
                    "(scheme://host[:port], no path) or *"
                )
        return self

    def loopback_only(self) -> bool:
        return _name(self.host) in LOOPBACK

    def host_allowed(self, header: str | None) -> bool:
        if header is None or "*" in self.allowed_hosts:  # HTTP/1.0 without Host: not a browser
            return True
        name = _name(header)
        if name in ("localhost", _name(self.host)) or name.endswith(".localhost"):
            return True
        if name in {_name(h) for h in self.allowed_hosts}:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def _name(host: str) -> str:
    """The host name of a Host header or --host value: lower case, no port, no brackets."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port (more colons: a bare IPv6 address)
        host = host.split(":")[0]
    return host.rstrip(".")


def _error(status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, None, code).body(), status, headers=headers)


class _Checks:
    """Steps 1, 3 and 4 of the module docstring; CORS (step 2) wraps the inner app."""

    def __init__(self, app, guard: Guard, outer: bool) -> None:
        self.app, self.guard, self.outer = app, guard, outer
        self.key = guard.api_key.encode() if guard.api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._host(headers) if self.outer else self._request(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _host(self, headers: Headers) -> JSONResponse | None:
        if self.guard.host_allowed(headers.get("host")):
            return None
        return _error(
            403,
            f"Host {headers['host'][:100]!r} is not a name this server answers to; start it "
            "with --allowed-host NAME to accept it",
            "host_not_allowed",
        )

    def _request(self, scope, headers: Headers) -> JSONResponse | None:
        if self.key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                return _error(
                    401,
                    "Incorrect or missing API key: send `Authorization: Bearer KEY` with the key "
                    "the server was started with (--api-key / AZLLM_API_KEY)",
                    "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"},
                )
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return _error(
                    415,
                    f"Content-Type must be application/json, got {kind[:60]!r}",
                    "unsupported_media_type",
                )
        return None


def guarded(app, guard: Guard):
    """The app behind the host check, CORS (if any origin is allowed), the key and the
    Content-Type rule."""
    inner = _Checks(app, guard, outer=False)
    if guard.cors_origins:
        inner = CORSMiddleware(
            inner,
            allow_origins=list(guard.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return _Checks(inner, guard, outer=True)
