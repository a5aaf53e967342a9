"""Documents into overlapping chunks that start and end on sentence boundaries.

A sentence ends at `.`, `!`, `?` or `…` (with closing quotes or brackets after it) followed by
white space and a capital letter, a digit or an opening quote, or at a line break. Common
Azerbaijani abbreviations ("və s.", "b.e.ə.", "məs.", initials such as "H. Əliyev") do not end
one. Chunks gather whole sentences up to `size` characters; the next chunk starts again with the
last sentences of the one before, up to `overlap` characters, so an answer that straddles a
boundary is whole in one of them. A sentence longer than `size` is cut at spaces.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from azllm.errors import AzllmError

_END = re.compile(r"""[.!?…]+["'»”)\]]*\s+(?=["'«“(\[]?[A-ZÇƏĞIİÖŞÜ0-9])|\n\s*""")
# a "sentence end" right after one of these is not one (lower-cased, without the dot)
_ABBREV = {"s", "və s", "məs", "b.e.ə", "e.ə", "b.e", "i.e", "bax", "səh", "prof", "dr", "akad"}


@dataclass(frozen=True)
class Chunking:
    size: int = 600  # characters of a chunk, at most (a longer sentence is cut)
    overlap: int = 150  # characters of trailing sentences repeated at the next chunk's start

    def check(self) -> Chunking:
        if self.size < 50:
            raise AzllmError(f"--chunk-chars {self.size}: must be at least 50")
        if not 0 <= self.overlap < self.size // 2:
            raise AzllmError(
                f"--overlap-chars {self.overlap}: must be in [0, {self.size // 2}) "
                f"(under half of --chunk-chars {self.size})"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def sentences(text: str) -> list[str]:
    """The sentences of a text, stripped, empty ones dropped."""
    out, start = [], 0
    for m in _END.finditer(text):
        piece = text[start : m.end()].strip()
        if not piece:
            start = m.end()
            continue
        if m.group().strip() and _is_abbreviation(text[start : m.start()]):
            continue  # keep reading: the dot belonged to an abbreviation or an initial
        out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _is_abbreviation(before: str) -> bool:
    words = before.split()
    if not words:
        return False
    last = words[-1].lower().rstrip(".")
    two = " ".join(words[-2:]).lower().rstrip(".")
    # a single capital letter is an initial ("H. Əliyev"), unless it is the whole sentence
    return last in _ABBREV or two in _ABBREV or (len(last) == 1 and last.isalpha())


def _cut_long(sentence: str, size: int) -> list[str]:
    parts, cur = [], ""
    for word in sentence.split():
        while len(word) > size:  # a "word" longer than a chunk (a URL, a table row)
            if cur:
                parts.append(cur)
                cur = ""
            parts.append(word[:size])
            word = word[size:]
        if cur and len(cur) + 1 + len(word) > size:
            parts.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        parts.append(cur)
    return parts


def chunk_text(text: str, cfg: Chunking = Chunking()) -> list[str]:  # noqa: B008 (frozen)
    """Overlapping chunks of whole sentences, each at most cfg.size characters."""
    sents = [p for s in sentences(text) for p in _cut_long(s, cfg.size)]
    chunks: list[str] = []
    i = 0
    while i < len(sents):
        cur, length, j = [], 0, i
        while j < len(sents) and (not cur or length + 1 + len(sents[j]) <= cfg.size):
            length += len(sents[j]) + (1 if cur else 0)
            cur.append(sents[j])
            j += 1
        chunks.append(" ".join(cur))
        if j >= len(sents):
            break
        # step back over trailing sentences that fit the overlap, never to i (always progress)
        back, k = 0, j
        while k - 1 > i and back + len(sents[k - 1]) <= cfg.overlap:
            back += len(sents[k - 1]) + 1
            k -= 1
        i = k
    return chunks
