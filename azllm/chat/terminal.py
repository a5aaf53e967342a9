"""`azllm chat`: talk to a run in the terminal, the reply printed token by token.

The conversation is kept and re-sent whole each turn through the one chat template
(`AzTokenizer.encode_chat`); when it no longer fits `context - max_new_tokens`, the oldest turns
are dropped (the system prompt stays). Commands: /reset, /system TEXT, /help, /quit; Ctrl-D
(end of input) leaves, Ctrl-C stops a reply that is being written.
Template tokens go in by id only (`encode_chat`): what the user types is always plain text.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

from azllm.chat.engine import Engine
from azllm.generate import SamplingSettings, StreamDecoder
from azllm.tokenizer import AzTokenizer

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt; "
    "/system alone clears it), /help, /quit; Ctrl-D leaves, Ctrl-C stops a reply"
)


def fit_history(
    tok: AzTokenizer, system: str, turns: list[dict], budget: int
) -> tuple[list[int], list[dict]]:
    """The prompt ids for system + turns + the assistant header, dropping the oldest turns until
    it has at most `budget` tokens. Keeps at least the last turn (the caller checks the length);
    a kept history always starts with a user turn."""
    head = [{"role": "system", "content": system}] if system else []
    while True:
        ids, _ = tok.encode_chat(head + turns, add_generation_prompt=True)
        if len(ids) <= budget or len(turns) <= 1:
            return ids, turns
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]


def _reader(stdin: TextIO, stdout: TextIO):
    """input() with line editing on a terminal; plain readline on pipes (tests, scripts)."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
        return input

    def read(prompt: str) -> str:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read


def chat_loop(
    engine: Engine,
    tok: AzTokenizer,
    *,
    name: str = "azllm",
    system: str = "",
    sampling: SamplingSettings | None = None,
    max_new_tokens: int | None = None,
    rag=None,
    rag_k: int = 4,
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> int:
    """Talk until /quit or end of input. `sampling` (default SamplingSettings()) picks the
    tokens; its seed, if any, seeds reply n with seed + n, so a replayed session replies the
    same. Replies are at most max_new_tokens long (None: half the context, so that a long reply
    still leaves the conversation room). `rag` (an azllm.rag Index): each message's best
    `rag_k` chunks go into the system turn (rag/prompt.py), listed after the reply."""
    sampling = (sampling or SamplingSettings()).check()
    ctx = engine.ctx
    if max_new_tokens is None:
        max_new_tokens = ctx // 2
    elif max_new_tokens > ctx - 8:  # leave room for at least a short message
        stdout.write(
            f"(--max-new-tokens {max_new_tokens} leaves no room in the context of "
            f"{ctx}; using {ctx // 2})\n"
        )
        max_new_tokens = ctx // 2
    budget = ctx - max_new_tokens
    read = _reader(stdin, stdout)
    stdout.write(
        f"azllm chat with {name} (context {ctx} tokens, replies up to {max_new_tokens}).\n{HELP}\n"
    )
    turns: list[dict] = []
    n_replies = 0
    while True:
        try:
            text = read("you> ")
        except (EOFError, KeyboardInterrupt):
            stdout.write("\n")
            return 0
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, arg = text.strip().partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                turns = []
                stdout.write("(conversation cleared)\n")
            elif cmd == "/system":
                system = arg.strip()
                stdout.write("(system prompt set)\n" if system else "(system prompt cleared)\n")
            elif cmd == "/help":
                stdout.write(HELP + "\n")
            else:
                stdout.write(f"(unknown command {cmd}; {HELP})\n")
            continue

        before, turn_system, sources = len(turns), system, []
        if rag is not None:  # retrieval on what the user typed, and only that
            from azllm.rag.prompt import system_for_turn

            turn_system, sources = system_for_turn(tok, rag, rag_k, system, text, budget)
        user = {"role": "user", "content": text}
        ids, turns = fit_history(tok, turn_system, turns + [user], budget)
        if len(ids) > budget:
            turns = turns[:-1]
            stdout.write(
                f"(that message needs {len(ids)} tokens with the system prompt; at most "
                f"{budget} fit with replies of {max_new_tokens}: shorten it)\n"
            )
            continue
        dropped = before + 1 - len(turns)
        if dropped:
            stdout.write(f"(dropped the {dropped} oldest message(s) to fit the context)\n")
        stdout.write("bot> ")
        stdout.flush()
        seed = None if sampling.seed is None else sampling.seed + n_replies
        req = engine.submit(
            ids,
            sampling=dataclasses.replace(sampling, seed=seed),
            max_tokens=max_new_tokens,
            stop_ids={tok.end_id, tok.eos_id},
        )
        n_replies += 1
        decoder, reply = StreamDecoder(tok.decode), []
        try:
            for t in req.stream():
                reply.append(t)
                stdout.write(decoder.push(t))
                stdout.flush()
        except KeyboardInterrupt:
            engine.cancel(req)
            stdout.write(" [stopped]")
        stdout.write("\n")
        if rag is not None:
            from azllm.rag.prompt import sources_line

            stdout.write(sources_line(sources) + "\n")
        turns.append({"role": "assistant", "content": tok.decode(reply)})


def run_chat(args) -> int:
    """`azllm chat` entry point."""
    from pathlib import Path

    from azllm.chat.cli import sampling_from_args
    from azllm.checkpoint import load_run
    from azllm.device import resolve_device, resolve_precision
    from azllm.rag.cli import open_rag

    sampling = sampling_from_args(args)  # bad flags fail here, before the model loads
    rag = open_rag(args.rag, args.rag_k)  # so does a --rag folder that is not an index
    device = resolve_device(args.device)
    model, tok, _ = load_run(Path(args.run), device, args.weights)
    engine = Engine(model, max_batch=1, precision=resolve_precision(args.precision, device))
    try:
        return chat_loop(
            engine,
            tok,
            name=Path(args.run).resolve().name,
            system=args.system,
            sampling=sampling,
            max_new_tokens=args.max_new_tokens,
            rag=rag,
            rag_k=args.rag_k,
        )
    finally:
        engine.shutdown()
        if rag is not None:
            rag.close()
