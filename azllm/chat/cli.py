"""`azllm chat` and `azllm serve`: their argparse parsers (wired into azllm/cli.py)."""

from __future__ import annotations

import argparse

from azllm.config import PRECISIONS
from azllm.errors import AzllmError
from azllm.sampling import SamplingSettings

DEFAULT = SamplingSettings()


def run_flags(p: argparse.ArgumentParser, *, run_required: bool = True, threads: bool = True):
    """The flags of every command that loads a run: chat, serve, generate, eval."""
    p.add_argument("--run", required=run_required, help="run directory (azllm train / sft)")
    p.add_argument("--weights", default="model", choices=["model", "best"])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS)
    if threads:
        p.add_argument(
            "--threads",
            type=int,
            default=None,
            help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine)",
        )


def sampling_flags(p: argparse.ArgumentParser, *, max_new_tokens_help: str | None = None) -> None:
    """--temperature --top-k --top-p --seed --max-new-tokens, defaults from SamplingSettings()
    (`max_new_tokens_help` given: its default is None, which the command explains there)."""
    p.add_argument("--temperature", type=float, default=DEFAULT.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=DEFAULT.top_k, help="0 = off")
    p.add_argument("--top-p", type=float, default=DEFAULT.top_p, help="1 = off")
    p.add_argument("--seed", type=int, default=DEFAULT.seed)
    if max_new_tokens_help is None:
        p.add_argument("--max-new-tokens", type=int, default=DEFAULT.max_new_tokens)
    else:
        p.add_argument("--max-new-tokens", type=int, default=None, help=max_new_tokens_help)


def sampling_from_args(args) -> SamplingSettings:
    """The flags of `sampling_flags`, checked: a bad value is a one-line error naming the flag."""
    return SamplingSettings(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=DEFAULT.max_new_tokens
        if args.max_new_tokens is None
        else args.max_new_tokens,
    ).check("--")


def _set_threads(args) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise AzllmError(f"--threads {args.threads}: must be at least 1")
        import torch

        torch.set_num_threads(args.threads)


def cmd_chat(args) -> int:
    from azllm.chat.terminal import run_chat

    _set_threads(args)
    return run_chat(args)


def cmd_serve(args) -> int:
    from azllm.errors import require

    require("serve", "azllm serve")
    from azllm.chat.server import serve

    _set_threads(args)
    serve(
        args.run,
        host=args.host,
        port=args.port,
        weights=args.weights,
        device=args.device,
        precision=args.precision,
        max_batch=args.max_batch,
        name=args.model_name,
        api_key=args.api_key,
        allowed_hosts=args.allowed_host,
        cors_origins=args.cors_origin,
        rag=args.rag,
        rag_k=args.rag_k,
    )
    return 0


def register(subparsers) -> None:
    from azllm.rag.cli import rag_flags

    p = subparsers.add_parser("chat", help="talk to a chat model in the terminal")
    run_flags(p)
    p.add_argument("--system", default="", help="system prompt (change it with /system)")
    sampling_flags(p, max_new_tokens_help="longest reply in tokens (default: half the context)")
    rag_flags(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser(
        "serve", help="web chat page + OpenAI-compatible API (/v1/chat/completions, ...)"
    )
    run_flags(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 exposes it to the network)",
    )
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="most sequences decoded together; more requests wait their turn",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="the model id clients use (default: the run directory's name)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1/* (default: $AZLLM_API_KEY, else none)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host is NAME (a reverse proxy's public name; "
        "repeatable; '*' = any). localhost, IP addresses and --host always pass",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (https://app.example, or *) call the API; repeatable",
    )
    rag_flags(p)
    p.set_defaults(func=cmd_serve)
