"""Retrieved chunks into the prompt: a system turn with numbered sources, through the one chat
template (`AzTokenizer.encode_chat`), trimmed so the prompt leaves the reply its room.

Only the text of the conversation's last user message is searched: never a system prompt, an
assistant's reply or an earlier turn (a conversation cannot steer retrieval by what it makes
the model say). The sources go after the caller's own system prompt, in the system turn, so
the template marks them as context and not as something the user wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from azllm.rag.index import Hit, Index
from azllm.tokenizer import AzTokenizer

INSTRUCTION = (
    "Suala aşağıdakı mənbələrə əsaslanaraq cavab ver və istifadə etdiyin mənbənin nömrəsini "
    "[1] kimi göstər. Cavab mənbələrdə yoxdursa, bunu de."
)
MIN_PIECE = 16  # tokens: a cut chunk shorter than this is not worth its place
DEFAULT_K = 4


@dataclass
class Source:
    """A chunk as it was put in the prompt (numbered from 1; `text` may be cut to fit)."""

    n: int
    source: str
    chunk: int
    score: float
    text: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["score"] = round(self.score, 4)
        return d

    def label(self) -> str:
        return f"[{self.n}] {self.source} (chunk {self.chunk}, score {self.score:.2f})"


def last_user_text(messages: list[dict]) -> str:
    """The content of the last user message ("" if there is none): the only text searched."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return ""


def retrieve(index: Index, messages: list[dict], k: int = DEFAULT_K) -> list[Hit]:
    text = last_user_text(messages)
    return index.search(text, k) if text.strip() else []


def system_text(system: str, sources: list[Source]) -> str:
    head = f"{system}\n\n" if system else ""
    body = "\n".join(f"[{s.n}] ({s.source}) {s.text}" for s in sources)
    return f"{head}{INSTRUCTION}\n\nMənbələr:\n{body}"


def add_sources(
    tok: AzTokenizer, messages: list[dict], hits: list[Hit], budget: int
) -> tuple[list[dict], list[Source]]:
    """The messages with as many hits (best first) as keep the prompt within `budget` tokens, in
    a system turn after the first system message's own text; the first hit that does not fit
    whole is cut to the room left (if at least MIN_PIECE tokens) and the rest are left out.
    No hit fits: the messages unchanged and no sources."""
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"], messages[1:]
    else:
        system, rest = "", messages

    def with_(sources: list[Source]) -> list[dict]:
        return [{"role": "system", "content": system_text(system, sources)}] + rest

    def length(sources: list[Source]) -> int:
        return len(tok.encode_chat(with_(sources), add_generation_prompt=True)[0])

    used: list[Source] = []
    for h in hits:
        src = Source(len(used) + 1, h.source, h.chunk, h.score, h.text)
        if length(used + [src]) <= budget:
            used.append(src)
            continue
        room = budget - length(used + [Source(src.n, h.source, h.chunk, h.score, "")])
        ids = tok.encode(h.text)[: max(room, 0)]
        while len(ids) >= MIN_PIECE:  # decoding a cut can re-tokenize longer: shrink until it fits
            src.text = tok.decode(ids).rstrip() + " …"
            if length(used + [src]) <= budget:
                used.append(src)
                break
            ids = ids[: len(ids) - max(1, len(ids) // 8)]
        break
    if not used:
        return messages, []
    return with_(used), used


def system_for_turn(
    tok: AzTokenizer, index: Index, k: int, system: str, text: str, budget: int
) -> tuple[str, list[Source]]:
    """`azllm chat --rag`: the system prompt of one turn (the user's own, then the sources
    found for `text`) and the sources; they get the room the new message leaves in `budget`,
    before older turns (the terminal then drops the oldest turns to fit, as it always does)."""
    head = [{"role": "system", "content": system}] if system else []
    hits = index.search(text, k) if text.strip() else []
    messages, used = add_sources(tok, head + [{"role": "user", "content": text}], hits, budget)
    return (messages[0]["content"] if used else system), used


def sources_line(sources: list[Source]) -> str:
    return "sources: " + "; ".join(s.label() for s in sources) if sources else "sources: none"
