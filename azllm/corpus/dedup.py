"""Deduplication across all inputs: exact (documents and lines) and near (MinHash LSH).

Units. The same text reaches us through several sources cut in different ways: the Füzuli
divan file has no blank lines, the classical-poems file separates poems by blank lines, so
documents (fixed chunks of one, poems of the other) barely overlap as wholes, and MinHash
over such documents finds almost nothing. So there are three levels:
1. exact documents: a hash of the normalised text (Azerbaijani lowercase, apostrophes
   dropped, other punctuation and runs of spaces folded to one space);
2. exact lines (verses, sentences, paragraph lines) of at least `min_line_chars` normalised
   characters, across documents: a line already seen in an *earlier document* is removed
   (repeats inside one document — a refrain — stay). So are unseen lines whose neighbours
   were seen (`_variants`: the `degil`/`deyil` variants of a poem we already have) and short
   lines between removed ones. A document left with less than `min_keep_chars`, or that lost
   `max_dup_line_fraction` of its characters, is dropped whole. Being line-based, this finds
   a poem inside a 5,000-character chunk of a file without blank lines as well as alone;
3. near documents: MinHash (minhash.py: datasketch's, computed without importing it; word
   5-gram shingles of the normalised text) with LSH banding; any band shared with an earlier kept
   document marks a near duplicate. For text
   files a document is a blank-line block — a poem, a stanza, a paragraph.
The first occurrence (in input order) is kept, so the output does not depend on worker count.

Memory. Every key is a 64-bit hash stored in a `HashIndex`: recent keys in a small dict,
older ones in sorted numpy runs (8 bytes a key plus 4-8 bytes of value). A kept line costs
12 bytes, a kept document 16 bytes plus 16 per LSH band (9 bands at threshold 0.8): about
12 bytes per 75 bytes of text plus 160 bytes per document. Measured with synthetic keys for
a 2 GB input of all-unique 1.6 KB documents (1.26 M documents, 26.5 M lines): indexes 525 MB,
peak RSS of the deciding process 695 MB. A 20 GB dump needs ~5 GB. `max_keys` caps each
index (dedup then stops learning new keys, and the report says so), which bounds memory for
any input at the price of missing duplicates of what came after the cap. Merges copy at most
`max_run` keys (32 MB) at a time, so there is no transient doubling of the whole index.
Collisions: with 64-bit hashes, 200 M keys collide with probability about 1e-3 in all.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .clean import az_lower
from .minhash import MinHasher

_APOSTROPHE_CHARS = "'’ʼ`´‘\u00ad\u200b\u200c\u200d"
_APOSTROPHES = re.compile(f"[{_APOSTROPHE_CHARS}]")
_NON_WORD = re.compile(r"[\W_]+")
_WORD_RUN = re.compile(r"[^\W_]+")


def normalize(text: str) -> str:
    """The form two texts must share to count as the same: lowercase, no punctuation."""
    return " ".join(_NON_WORD.sub(" ", _APOSTROPHES.sub("", az_lower(text))).split())


def normalize_lines(text: str) -> list[str]:
    """`normalize` of every line of `text` (same indices as text.split("\\n")).

    The words `normalize` keeps are the runs of word characters other than "_", so they are
    found directly (one findall per line) instead of replacing every gap between words."""
    low = az_lower(text)
    if any(c in low for c in _APOSTROPHE_CHARS):
        low = _APOSTROPHES.sub("", low)
    return [" ".join(_WORD_RUN.findall(line)) for line in low.split("\n")]


@dataclass
class Words:
    """The words of a normalised text as numbers: a 64-bit hash and a length each."""

    hashes: np.ndarray  # uint64
    lengths: np.ndarray  # int64, characters
    alpha: np.ndarray  # bool: has a letter (normalised words are letters and digits only)
    _ngrams: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.hashes)

    def ngrams(self, n: int) -> np.ndarray:
        """`ngram_keys(self.hashes, n)`, remembered: the filters and MinHash both use n=5,
        and the (n+1)-gram keys are built from the n-gram ones with one multiply-add."""
        keys = self._ngrams.get(n)
        if keys is None:
            if n > 1 and len(self.hashes) >= n:  # (integer arrays wrap without a warning)
                keys = self.ngrams(n - 1)[:-1] * np.uint64(_P) + self.hashes[n - 1 :]
            else:
                keys = ngram_keys(self.hashes, n)
            self._ngrams[n] = keys
        return keys


_P = 0x100000001B3  # odd, so invertible modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_POWERS: list[np.ndarray] = [np.ones(1, np.uint64), np.ones(1, np.uint64)]  # P**i, P**-i


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**i and P**-i (mod 2**64) for i < n, from a table grown on demand."""
    if len(_POWERS[0]) < n:
        size = max(n, 2 * len(_POWERS[0]), 1 << 16)
        with np.errstate(over="ignore"):
            for k, base in enumerate((_P, _P_INV)):
                table = np.full(size, base, dtype=np.uint64)
                table[0] = 1
                _POWERS[k] = np.cumprod(table, dtype=np.uint64)
    return _POWERS[0], _POWERS[1]


def words(norm: str) -> Words:
    """Hash every word of a normalised text (single spaces between words) at once, in numpy.

    A word's hash is sum((byte + 1) * P**i) over its bytes, computed from prefix sums over the
    whole text and shifted to its start with powers of P's inverse (arithmetic modulo 2**64).
    The same word gets the same hash anywhere, with no Python loop over words.
    """
    b = np.frombuffer(norm.encode("utf-8"), dtype=np.uint8)
    if not len(b):
        return Words(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, bool))
    space = b == 32
    gaps = np.flatnonzero(space)
    starts = np.concatenate(([0], gaps + 1))
    ends = np.concatenate((gaps, [len(b)]))
    pw, inv = _powers(len(b) + 1)
    # integer arrays wrap modulo 2**64 silently (np.errstate, ~4 µs a call, is not needed)
    prefix = np.zeros(len(b) + 1, dtype=np.uint64)
    np.cumsum((b + np.uint64(1)) * pw[: len(b)], out=prefix[1:])
    h = (prefix[ends] - prefix[starts]) * inv[starts]
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x9E3779B97F4A7C15)
    chars = np.zeros(len(b) + 1, dtype=np.int64)
    np.cumsum((b & 0xC0) != 0x80, out=chars[1:])  # UTF-8 lead bytes
    letters = np.zeros(len(b) + 1, dtype=np.int64)
    np.cumsum(~space & ((b < 48) | (b > 57)), out=letters[1:])  # not a digit 0-9
    return Words(h, chars[ends] - chars[starts], letters[ends] > letters[starts])


def ngram_keys(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit key per position of each word n-gram (polynomial hash, wrapping)."""
    m = len(word_hashes) - n + 1
    keys = np.zeros(max(m, 0), dtype=np.uint64)
    for j in range(n):
        keys = keys * np.uint64(_P) + word_hashes[j : m + j]
    return keys


def hash64(text: str) -> int:
    """A stable (run-independent, unlike hash()) signed 64-bit hash of a string."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class HashIndex:
    """A map from 64-bit keys to small integer values, compact and with bounded memory.

    New keys go to a dict of at most `buffer_size` entries; a full dict becomes a sorted numpy
    run (8 bytes a key plus the value), and runs are merged pairwise like a binary counter up
    to `max_run` keys, so lookups search a handful of runs and a merge never copies more than
    `max_run` keys at once. `max_keys` stops growth: `add` then returns False, `full` is set.
    """

    def __init__(
        self,
        value_dtype=np.int64,
        buffer_size: int = 1 << 16,
        max_run: int = 1 << 22,
        max_keys: int = 0,
    ):
        self.value_dtype = value_dtype
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted keys, values)
        self.buffer: dict[int, int] = {}
        self.buffer_size, self.max_run, self.max_keys = buffer_size, max_run, max_keys
        self.full = False
        self._size = 0

    def __len__(self) -> int:
        return self._size + len(self.buffer)

    @property
    def nbytes(self) -> int:
        arrays = sum(k.nbytes + v.nbytes for k, v in self.runs)
        return arrays + 100 * len(self.buffer)  # ~100 bytes per dict entry with its ints

    def get(self, key: int) -> int | None:
        value = self.buffer.get(key)
        if value is not None:
            return value
        for keys, values in self.runs:
            i = int(np.searchsorted(keys, key))
            if i < len(keys) and keys[i] == key:
                return int(values[i])
        return None

    def get_many(self, keys: list[int]) -> list[int | None]:
        out: list[int | None] = [self.buffer.get(k) for k in keys]
        if keys and self.runs:
            q = np.array(keys, dtype=np.int64)
            for run_keys, run_values in self.runs:
                pos = np.minimum(np.searchsorted(run_keys, q), len(run_keys) - 1)
                for j in np.flatnonzero(run_keys[pos] == q):
                    out[j] = int(run_values[pos[j]])
        return out

    def add(self, key: int, value: int) -> bool:
        if self.max_keys and len(self) >= self.max_keys:
            self.full = True
            return False
        self.buffer[key] = value
        if len(self.buffer) >= self.buffer_size:
            self._flush()
        return True

    def _flush(self) -> None:
        k = np.fromiter(self.buffer.keys(), dtype=np.int64, count=len(self.buffer))
        v = np.fromiter(self.buffer.values(), dtype=self.value_dtype, count=len(self.buffer))
        order = np.argsort(k)
        self.runs.append((k[order], v[order]))
        self._size += len(k)
        self.buffer = {}
        while len(self.runs) >= 2:
            (k1, v1), (k2, v2) = self.runs[-2], self.runs[-1]
            if len(k2) < len(k1) or len(k1) + len(k2) > self.max_run:
                break
            pos = np.searchsorted(k1, k2)  # merge two sorted runs in linear time
            self.runs[-2:] = [(np.insert(k1, pos, k2), np.insert(v1, pos, v2))]


# --- the deduplicator (runs in the main process, in input order) ----------------------------


@dataclass
class DedupKeys:
    """What a worker computes for the main process to decide on."""

    doc: int
    bands: list[int]
    lines: list[tuple[int, int, int]]  # (line number in the document, hash, characters)
    chars: int  # characters of all lines
    short: list[tuple[int, int]] = field(default_factory=list)  # (line, chars): too short to hash


def dedup_keys(
    text: str,
    minhasher: MinHasher | None,
    min_line_chars: int = 20,
    lines: bool = True,
    norm_lines: list[str] | None = None,
    word_table: Words | None = None,
) -> DedupKeys:
    """Document hash, LSH band keys and line hashes of a (cleaned) document.

    `norm_lines` (`normalize_lines(text)`) and `word_table` (`words(norm)`) may be passed
    in when the caller has computed them already."""
    if norm_lines is None:
        norm_lines = normalize_lines(text)
    line_keys, short = [], []
    if lines:
        raw_lines = text.split("\n")
        for i, n in enumerate(norm_lines):
            if len(n) >= min_line_chars:
                line_keys.append((i, hash64(n), len(raw_lines[i])))
            elif raw_lines[i].strip():
                short.append((i, len(raw_lines[i])))
    norm = " ".join(n for n in norm_lines if n)
    bands = []
    if minhasher:
        if word_table is None:
            word_table = words(norm)
        bands = minhasher.band_keys(word_table)
    return DedupKeys(hash64(norm), bands, line_keys, len(text), short)


def pack_ref(file_index: int, doc_index: int) -> int:
    return (file_index << 36) | doc_index


def unpack_ref(ref: int) -> tuple[int, int]:
    return ref >> 36, ref & ((1 << 36) - 1)


@dataclass
class Verdict:
    reason: str | None  # "duplicate:exact" / "duplicate:near" / "duplicate:lines", or None
    head: int | None = None  # ref of the kept document it duplicates
    drop_lines: frozenset[int] = frozenset()  # line numbers to remove from a kept document
    dup_lines: int = 0  # lines seen before
    variant_lines: int = 0  # lines dropped because the lines around them were seen before


def _variants(dup: list[bool]) -> list[bool]:
    """Unseen lines surrounded by seen ones: 3 of the 4 nearest, or 2 of 3 next to an edge.

    A poem that reached us twice is usually not identical: one edition writes `degil`, the
    other `deyil`. Its couplets that match exactly are removed as seen; the variant lines in
    between are what is left of the same poem, and go too. A new poem next to a known one keeps
    its first lines (only 2 of their 4 neighbours are seen).
    """
    out = []
    for j, d in enumerate(dup):
        if d:
            out.append(False)
            continue
        near = [dup[k] for k in (j - 2, j - 1, j + 1, j + 2) if 0 <= k < len(dup)]
        out.append(len(near) >= 3 and sum(near) >= len(near) - 1)
    return out


class Deduplicator:
    """Decides, document by document in input order, what is a duplicate of what came before."""

    def __init__(
        self,
        mode: str = "near",
        *,
        lines: bool = True,
        max_dup_line_fraction: float = 0.8,
        min_keep_chars: int = 100,
        max_keys: int = 0,
    ):
        if mode not in ("exact", "near", "none"):
            raise ValueError(f"unknown dedup mode {mode!r}")
        self.mode = mode
        self.lines = lines and mode != "none"
        self.max_dup_line_fraction = max_dup_line_fraction
        self.min_keep_chars = min_keep_chars
        self.docs = HashIndex(max_keys=max_keys)
        self.bands = HashIndex(max_keys=max_keys)
        self.line_index = HashIndex(value_dtype=np.int32, max_keys=max_keys)
        self.clusters: Counter[int] = Counter()  # head ref -> duplicates found
        self.line_overlap: Counter[tuple[int, int]] = Counter()  # (file, earlier file) -> lines
        self.doc_overlap: Counter[tuple[int, int]] = Counter()

    def check(self, keys: DedupKeys, ref: int) -> Verdict:
        if self.mode == "none":
            return Verdict(None)
        file_index = unpack_ref(ref)[0]
        head = self.docs.get(keys.doc)
        if head is not None:
            return self._dup("duplicate:exact", head, file_index)
        if self.mode == "near" and keys.bands:
            for found in self.bands.get_many(keys.bands):
                if found is not None:
                    return self._dup("duplicate:near", found, file_index)
        drop: set[int] = set()
        n_dup = n_variant = 0
        if self.lines and keys.lines:
            seen = self.line_index.get_many([h for _, h, _ in keys.lines])
            dup = [first is not None for first in seen]
            variant = _variants(dup) if any(dup) else dup  # (all False)
            dropped_chars = 0
            for (i, _h, n), first, d, v in zip(keys.lines, seen, dup, variant, strict=True):
                if d or v:
                    drop.add(i)
                    dropped_chars += n
                if d:
                    n_dup += 1
                    self.line_overlap[(file_index, first)] += 1
            n_variant = sum(variant)
            if drop:
                # short lines (a refrain "Ey dil,") between two removed lines go with them
                order = sorted([(i, i in drop) for i, _, _ in keys.lines])
                idx = [i for i, _ in order]
                for i, n in keys.short:
                    k = bisect.bisect(idx, i)
                    if 0 < k < len(idx) and order[k - 1][1] and order[k][1]:
                        drop.add(i)
                        dropped_chars += n
                left = keys.chars - dropped_chars
                if (
                    dropped_chars >= self.max_dup_line_fraction * keys.chars
                    or left < self.min_keep_chars
                ):
                    return Verdict("duplicate:lines", None, frozenset(drop), n_dup, n_variant)
        # kept: remember it
        self.docs.add(keys.doc, ref)
        for b in keys.bands:
            self.bands.add(b, ref)
        for i, h, _n in keys.lines:
            if i not in drop:
                self.line_index.add(h, file_index)
        return Verdict(None, None, frozenset(drop), n_dup, n_variant)

    def _dup(self, reason: str, head: int, file_index: int) -> Verdict:
        self.clusters[head] += 1
        self.doc_overlap[(file_index, unpack_ref(head)[0])] += 1
        return Verdict(reason, head)

    @property
    def full(self) -> bool:
        return self.docs.full or self.bands.full or self.line_index.full

    @property
    def nbytes(self) -> int:
        return self.docs.nbytes + self.bands.nbytes + self.line_index.nbytes
