"""MinHash signatures of a document's word n-grams, cut into LSH band keys (near duplicates).

The signatures are datasketch's (MinHash with its default "affine32" permutations, seed 1) and
so are the band/row counts (MinHashLSH's optimum for the threshold), computed here in numpy
without importing datasketch: importing it imports scipy, ~0.5-1.5 s at every start and in every
worker. tests/test_corpus_fastpaths.py holds both to datasketch's own values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .dedup import Words

_MASK64 = (1 << 64) - 1
_FMIX32 = (np.uint32(16), np.uint32(0x85EBCA6B), np.uint32(13), np.uint32(0xC2B2AE35))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix in its "affine32" scheme)."""
    s1, m1, s2, m2 = _FMIX32
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s1)


def minhash_permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of datasketch's MinHash(num_perm, seed) (>= 2.0, "affine32": h -> a*h + b).

    Made here rather than read from a datasketch MinHash: importing datasketch imports its
    LSH module and with it scipy (~0.5-1.5 s at every start, in every worker). Tests check
    that these are datasketch's permutations and give its signatures."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """The (bands, rows) datasketch's MinHashLSH(threshold, num_perm) uses (its _optimal_param,
    weights 0.5/0.5): the first, with b * r <= num_perm, that minimises the false positive
    plus false negative probability mass around the threshold.

    Its integrals, of 1 - (1 - s**r)**b over [0, threshold] and of (1 - s**r)**b over
    [threshold, 1], are of polynomials of degree b * r <= num_perm, so Gauss-Legendre with
    num_perm // 2 + 1 nodes is exact up to rounding (~1e-13; scipy's quad agrees). The best
    and the second best (b, r) differ by more than 1e-8 for every threshold and num_perm the
    tests try, so the argmin is datasketch's (tests compare with it on a grid)."""
    b = np.repeat(np.arange(1, num_perm + 1), [num_perm // k for k in range(1, num_perm + 1)])
    r = np.concatenate([np.arange(1, num_perm // k + 1) for k in range(1, num_perm + 1)])
    x, w = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def integral(f, lo: float, hi: float) -> np.ndarray:  # for every (b, r) at once
        s = lo + (hi - lo) * (x + 1) / 2
        return f(s) @ w * ((hi - lo) / 2)

    def miss(s: np.ndarray) -> np.ndarray:  # no band of a pair with Jaccard s agrees
        return (1 - s[None, :] ** r[:, None]) ** b[:, None]

    error = 0.5 * integral(lambda s: 1 - miss(s), 0.0, threshold)
    error += 0.5 * integral(miss, threshold, 1.0)
    best = int(np.argmin(error))  # the first minimum, in datasketch's (b, then r) order
    return int(b[best]), int(r[best])


@dataclass
class MinHasher:
    """MinHash signatures (datasketch's) of word n-gram shingles, cut into LSH band keys."""

    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    seed: int = 1
    bands: int = 0
    rows: int = 0
    _perm: tuple = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.bands:
            # the (bands, rows) that minimise false positives + false negatives at threshold
            self.bands, self.rows = lsh_params(self.threshold, self.num_perm)
        # only the bands * rows permutations the band keys use
        a, b = minhash_permutations(self.num_perm, self.seed)
        n = self.bands * self.rows
        self._perm = (a[:n].copy(), b[:n].copy())

    def shingles(self, w: Words) -> list[int]:
        """32-bit hashes of the distinct word n-grams (the whole text if shorter)."""
        return np.unique(self._shingles(w)).tolist()

    def _shingles(self, w: Words) -> np.ndarray:
        """The shingle of every word position (repeats included: a minimum does not mind)."""
        if not len(w):
            return np.empty(0, np.uint32)
        keys = w.ngrams(min(self.ngram, len(w)))
        return ((keys ^ (keys >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)

    def signature(self, w: Words) -> np.ndarray | None:
        """The MinHash values (uint64) of the first bands * rows permutations; None if empty.

        The values of datasketch's MinHash.update_batch (tests check it), computed in numpy
        without its Python list of every shingle."""
        shingles = self._shingles(w)
        if not len(shingles):
            return None
        n = self.bands * self.rows
        a, b = self._perm
        hv = _fmix32(shingles)[:, None]
        buf = np.empty((min(len(hv), 2048), n), dtype=np.uint32)
        sig = np.full(n, 0xFFFFFFFF, dtype=np.uint32)
        for i in range(0, len(hv), 2048):  # bounded memory for very long documents
            part = buf[: len(hv) - i] if len(hv) - i < 2048 else buf
            np.multiply(hv[i : i + 2048], a, out=part)  # uint32 arithmetic wraps, as theirs
            np.add(part, b, out=part)
            np.minimum(sig, part.min(axis=0), out=sig)
        return sig.astype(np.uint64)

    def band_keys(self, w: Words) -> list[int]:
        """LSH band keys of a document given its `words(normalized text)`."""
        sig = self.signature(w)
        if sig is None:
            return []
        # Band b's key: k = (b + 1) * golden, then k = (k ^ row) * P for each row, modulo
        # 2**64, as a signed int64. In Python ints: 117 steps cost less than 26 numpy calls.
        hv, rows, out = sig.tolist(), self.rows, []
        for band in range(self.bands):
            k = (band + 1) * 0x9E3779B97F4A7C15 & _MASK64
            for h in hv[band * rows : (band + 1) * rows]:
                k = (k ^ h) * 0x100000001B3 & _MASK64
            out.append(k - (1 << 64) if k >> 63 else k)
        return out
