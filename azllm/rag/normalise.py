"""Azerbaijani-aware normalisation of text into search terms (the index and queries share it).

Python's `str.lower()` is wrong for Azerbaijani twice: it lower-cases `I` to `i` (Azerbaijani:
`ı`) and `İ` to `i` + a combining dot (Azerbaijani: `i`), so "BAKI" would not find "Bakı" and
"İsmayıllı" would not find "ismayıllı". `az_lower` fixes both after NFC (which also joins an
`I` + combining dot typed in decomposed form into `İ`).

Terms are runs of letters and digits (`\\w`). An apostrophe inside a word separates a proper
noun or number from its case suffix ("Bakı'nın", "2020'də"; every apostrophe look-alike counts):
the suffix is dropped, keeping the noun. Optional light suffix stripping (`stem=True`) removes
common inflectional endings (plural, possessive, case, the copula) from the end of a word, longest
first, while at least MIN_STEM letters remain: "şəhərlərində" and "şəhərə" both become "şəhər".
It is crude (no vowel-harmony check, so it also cuts some stems ending like a suffix), but the
index and the query are cut alike; bench/rag_speed.py measures recall@k with and without it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache

from azllm.errors import AzllmError

APOSTROPHES = "'\u2019\u2018\u02bc\u02b9\u0060\u00b4\u2032"
_APOS_SUFFIX = re.compile(rf"(\w)[{APOSTROPHES}]\w+")
_WORD = re.compile(r"\w+")
MIN_STEM = 3

# Inflectional endings, every vowel-harmony variant; stripped repeatedly, longest match first.
_SUFFIXES = frozenset(
    {
        *"lar lər".split(),  # plural
        *"ları ləri".split(),  # plural + possessive
        *"ımız imiz umuz ümüz ınız iniz unuz ünüz".split(),  # our / your
        *"ım im um üm ın in un ün sı si su sü".split(),  # my / your(sg) / his, genitive
        *"nın nin nun nün".split(),  # genitive after a vowel
        *"ya yə na nə".split(),  # dative after a vowel / possessive
        *"nı ni nu nü yı yi yu yü".split(),  # accusative after a vowel
        *"da də nda ndə".split(),  # locative
        *"dan dən ndan ndən".split(),  # ablative
        *"la lə ilə".split(),  # instrumental
        *"dır dir dur dür".split(),  # copula
        *"dakı dəki ki".split(),  # "the one in"
        *"ı i u ü a ə".split(),  # accusative / dative / possessive after a consonant
    }
)
_LENGTHS = sorted({len(s) for s in _SUFFIXES}, reverse=True)


@dataclass(frozen=True)
class Normalisation:
    """How text becomes terms; stored in the index, so queries are cut as the documents were.

    casing: "az" (NFC, İ→i, I→ı, then lower) or "python" (str.lower(): wrong for I/İ; kept
    only so the benchmark can show the difference). apostrophes: drop the suffix after an
    apostrophe. stem: strip inflectional endings."""

    casing: str = "az"
    apostrophes: bool = True
    stem: bool = True

    def check(self) -> Normalisation:
        if self.casing not in ("az", "python"):
            raise AzllmError(f"normalisation casing must be 'az' or 'python', got {self.casing!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Normalisation:
        return cls(**{k: d[k] for k in ("casing", "apostrophes", "stem") if k in d}).check()

    def terms(self, text: str) -> list[str]:
        """The search terms of a text, in order (repeats kept: BM25 counts them)."""
        text = az_lower(text) if self.casing == "az" else text.lower()
        if self.apostrophes:
            text = _APOS_SUFFIX.sub(r"\1", text)
        words = _WORD.findall(text)
        return [strip_suffixes(w) for w in words] if self.stem else words


def az_lower(text: str) -> str:
    """Lower-case the Azerbaijani way: NFC, then İ→i and I→ı before the generic lower()."""
    text = unicodedata.normalize("NFC", text)
    return text.replace("İ", "i").replace("I", "ı").lower()


@lru_cache(maxsize=1 << 18)  # words repeat (Zipf): most calls are a lookup
def strip_suffixes(word: str) -> str:
    """The word with inflectional endings removed, longest ending first, keeping at least
    MIN_STEM characters; numbers are left alone."""
    if word.isdigit():
        return word
    stripped = True
    while stripped:
        stripped = False
        for n in _LENGTHS:
            if len(word) - n >= MIN_STEM and word[-n:] in _SUFFIXES:
                word, stripped = word[:-n], True
                break
    return word
