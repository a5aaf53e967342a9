"""Filters: each looks at one document and returns a reason to drop it, or None to keep it.

Line level (`clean_lines`): leftover wiki markup is stripped, and boilerplate lines (cookie
banners, "Bütün hüquqlar qorunur", "Saytın materiallarından istifadə edərkən istinad
mütləqdir", share/menu lines) and lines without a single letter (page numbers of a scanned
book) are removed, each counted by reason.

Document level (`document_reason`), in order: length, digit/symbol ratio, Gopher quality rules,
Gopher repetition rules. The Gopher rules (Rae et al. 2021, "Scaling Language Models", app. A)
are adapted to Azerbaijani:
- words are split on whitespace (a spaCy-style tokenizer counts punctuation as words and
  skews every ratio), with punctuation stripped from their ends;
- the stop-word rule uses Azerbaijani function words (including the classical forms of poetry:
  `ol`, `degil`, `çün`, `gər`) — the English list rejects nearly all Azerbaijani text;
- mean word length allows up to 12 characters (Azerbaijani is agglutinative);
- there is no rule on short lines or on lines ending in punctuation (C4, FineWeb): poetry is
  short lines without final punctuation and must survive;
- verse (`is_verse`: 4+ lines, 80% of them at most 80 characters) gets looser repetition
  limits. A ghazal repeats its radif at the end of every couplet ("... gördügün könlüm" is 29%
  of one poem's characters as a top 2-gram, Gopher's limit is 20%), a tərcibənd repeats its
  refrain couplet, and measured on the 844 poems of wikisource_classical_poems.txt the Gopher
  limits dropped 28 of them; the verse limits (`verse_*`) still drop short-line spam such as
  the same three-word line with one word changed. Prose keeps Gopher's thresholds.
Language (`language_reason`) goes last because it is the most expensive.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from itertools import accumulate

import numpy as np

from .clean import BLANK_RUNS
from .dedup import Words, normalize
from .dedup import words as word_table
from .wiki import strip_wiki_markup

# Function words of Azerbaijani (modern and classical), lowercase.
AZ_STOP_WORDS = frozenset(
    """
    və ilə bu bir ki da də üçün o ən çox olan olaraq isə kimi həm görə sonra əvvəl daha ya yaxud
    amma lakin ancaq həmin hər heç nə necə niyə mən sən biz siz onlar onun onu ona bunu buna bunun
    belə elə artıq yalnız hələ indi orada burada qədər tərəfindən üzrə haqqında edir olur olub idi
    deyil var yox hansı kim ola ol əgər gər çün ey dək tək degil mənim sənin bizim sizin özü öz
    hətta bəzi digər bütün başqa çünki yəni əsasən eyni həmçinin habelə ilk sanki
    """.split()
)

_BULLET = re.compile(r"^\s*(?:[-*•·●▪►‣⁃–]|\d+[.)])\s")
_ELLIPSIS = re.compile(r"(?:\.\.\.|…)\s*$")
_LETTER = re.compile(r"[^\W\d_]")
# Symbols: not letters, digits, spaces or the punctuation of running text.
_SYMBOL = re.compile(r"[^\w\s.,;:!?'\"’‘“”«»„()\[\]\-–—…/%№]|_")
# Its complement but "_", in runs: deleting those leaves the symbols other than "_" (counting
# them this way takes a few long matches instead of a test at every character).
_NOT_SYMBOL_RUNS = re.compile(r"[\w\s.,;:!?'\"’‘“”«»„()\[\]\-–—…/%№]+")

# Boilerplate lines. STRONG: anywhere in a short line. NAV: the whole line is such phrases.
_STRONG_BOILERPLATE = re.compile(
    "|".join(
        [
            r"\bcookie",
            r"\bkuki\w*",
            r"\bçərəz\w* (?:fayl|siyasət)",  # "çərəz" alone is also a snack
            r"bütün hüquqlar(?:ı)? qorunur",
            r"müəllif hüquqları qorunur",
            r"all rights reserved",
            r"все права защищены",
            r"tüm hakları saklıdır",
            r"materiallarından istifadə ed[əe]rkən",
            r"istinad (?:mütləqdir|vacibdir|zəruridir|edilməlidir)",
            r"hiperlinklə istinad",
            r"javascript",
            r"brauzerinizi yeniləyin",
            r"^\s*(?:©|\(c\)|copyright)\s",
        ]
    ),
    re.IGNORECASE,
)
_NAV_PHRASES = [
    "ana səhifə", "əsas səhifə", "haqqımızda", "bizimlə əlaqə", "əlaqə", "əlaqələr", "reklam",
    "abunə ol", "abunə olun", "bizi izləyin", "paylaş", "paylaşın", "şərh yaz", "şərhlər",
    "daha çox", "daha çox oxu", "ətraflı", "ardını oxu", "xəbər lenti", "son xəbərlər", "axtarış",
    "axtar", "giriş", "qeydiyyat", "çıxış", "məxfilik siyasəti", "gizlilik siyasəti",
    "istifadə şərtləri", "istifadə qaydaları", "sayt xəritəsi", "facebook", "twitter", "x",
    "instagram", "whatsapp", "telegram", "youtube", "linkedin", "tiktok", "vkontakte", "ok", "az",
    "en", "ru", "menyu", "home", "share", "tweet", "read more", "login", "sign up", "menu",
]  # fmt: skip
_NAV = "(?:" + "|".join(sorted(map(re.escape, _NAV_PHRASES), key=len, reverse=True)) + ")"
_NAV_SEP = r"[ \t|•·»›:/,.!→-]"
# the whole line is nav phrases separated by spaces or separators
_NAV_LINE = re.compile(rf"^[ \t]*{_NAV}(?:{_NAV_SEP}+{_NAV})*{_NAV_SEP}*$", re.IGNORECASE)
_NAV_FIRST = frozenset(p.split()[0] for p in _NAV_PHRASES)
# Cheap substring tests that must pass before the regexes above are tried on a text.
_STRONG_KEYS = ("cookie", "kuki", "çərəz", "hüquq", "reserved", "защищены", "saklı", "istifadə ed",
                "istinad", "javascript", "brauzer", "©", "copyright", "(c)")  # fmt: skip
_WIKI_KEYS = ("[[", "]]", "{{", "}}", "''", "|", "<", "&", "__", "px", "thumb", "()", "( )", "(,",
              "\n=")  # fmt: skip
_MENU_SEPARATORS = re.compile(r"\s*[|•·»›]\s*")
_MENU_HINT = re.compile(r"[|•·»›].*[|•·»›].*[|•·»›]")
_LETTERLESS = re.compile(r"^(?:[^\w\n]|[\d_])+$", re.MULTILINE)


@dataclass(frozen=True)
class FilterConfig:
    min_chars: int = 50
    min_words: int = 10
    max_words: int = 200_000
    max_digit_ratio: float = 0.25  # of non-space characters
    max_symbol_ratio: float = 0.10
    min_mean_word_len: float = 2.5
    max_mean_word_len: float = 12.0
    max_ellipsis_lines: float = 0.3
    max_bullet_lines: float = 0.9
    min_alpha_words: float = 0.8
    min_stop_words: int = 2
    stop_words: frozenset[str] = AZ_STOP_WORDS
    max_dup_lines: float = 0.3
    max_dup_line_chars: float = 0.2
    max_dup_paragraphs: float = 0.3
    max_dup_paragraph_chars: float = 0.2
    top_ngram: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_ngram: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    # verse: looser repetition limits (see the module docstring)
    verse_max_dup_lines: float = 0.5
    verse_max_top_ngram: float = 0.4
    verse_max_dup_ngram: float = 0.5
    verse_min_stop_words: int = 0  # Nəsimi's "Nigarım, dilbərim, yarım..." has none
    strip_wiki: bool = True
    remove_boilerplate: bool = True
    drop_letterless_lines: bool = True

    # Derived configs, made once per config and kept on it (cached_property writes to the
    # instance's __dict__, which a frozen dataclass allows; it is not a field, so equality,
    # asdict and the report ignore it). A cache keyed by id() could hand a new config the
    # entry of a collected one whose id was reused.

    @cached_property
    def verse(self) -> FilterConfig:
        """This config with the verse limits in place of the prose ones."""
        return replace(
            self,
            max_dup_lines=self.verse_max_dup_lines,
            max_dup_line_chars=self.verse_max_dup_lines,
            max_dup_paragraphs=self.verse_max_dup_lines,
            max_dup_paragraph_chars=self.verse_max_dup_lines,
            top_ngram={n: max(v, self.verse_max_top_ngram) for n, v in self.top_ngram.items()},
            dup_ngram={n: max(v, self.verse_max_dup_ngram) for n, v in self.dup_ngram.items()},
            min_stop_words=min(self.min_stop_words, self.verse_min_stop_words),
        )

    @cached_property
    def non_az(self) -> FilterConfig:
        """For a language other than Azerbaijani: no Azerbaijani stop-word rule."""
        if self.stop_words != AZ_STOP_WORDS:
            return self
        return replace(self, min_stop_words=0, verse_min_stop_words=0)


# --- line level ---------------------------------------------------------------------------------


def _nav_line(line: str) -> bool:
    first = line.split(None, 1)[0].strip(":|•·»›,.!-").lower() if line.strip() else ""
    return first in _NAV_FIRST and bool(_NAV_LINE.match(line))


def boilerplate_reason(line: str) -> str | None:
    """Why a line is boilerplate ("boilerplate" / "menu"), or None."""
    if len(line) <= 300 and _STRONG_BOILERPLATE.search(line):
        return "boilerplate"
    if len(line) <= 120:
        if _nav_line(line):
            return "menu"
        parts = [p for p in _MENU_SEPARATORS.split(line.strip()) if p]
        if len(parts) >= 4 and max(len(p) for p in parts) <= 25 and not re.search(r"[.!?]$", line):
            return "menu"  # "Siyasət | İqtisadiyyat | İdman | Mədəniyyət"
    return None


def clean_lines(text: str, cfg: FilterConfig) -> tuple[str, Counter[str]]:
    """The text without markup residue, boilerplate and letterless lines; removed-line counts.

    Whole-text tests (substrings, one regex) come first, and single lines are looked at only
    when they found something: most documents have nothing to remove.
    """
    removed: Counter[str] = Counter()
    lines = text.split("\n")
    wiki = cfg.strip_wiki and (any(k in text for k in _WIKI_KEYS) or text.startswith("="))
    strong = False
    if cfg.remove_boilerplate:
        low = text.lower()
        strong = any(k in low for k in _STRONG_KEYS)
    letterless = cfg.drop_letterless_lines and _LETTERLESS.search(text)
    out: list[str] = []
    for line in lines:
        if not line.strip():
            out.append("")
            continue
        if wiki:
            line = strip_wiki_markup(line)
            if not line:
                removed["wiki_markup"] += 1
                continue
        if cfg.remove_boilerplate and len(line) <= 300:
            reason = None
            if strong and _STRONG_BOILERPLATE.search(line):
                reason = "boilerplate"
            elif len(line) <= 120 and (_nav_line(line) or _MENU_HINT.search(line)):
                reason = boilerplate_reason(line)
            if reason:
                removed[reason] += 1
                continue
        if letterless and not _LETTER.search(line):
            removed["no_letters"] += 1
            continue
        out.append(line)
    if not removed and not wiki:
        return text, removed
    cleaned = BLANK_RUNS.sub("\n\n", "\n".join(out)).strip("\n")
    return cleaned, removed


# --- document level ------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _stop_hashes(stop_words: frozenset[str]) -> np.ndarray:
    return np.unique(word_table(normalize(" ".join(sorted(stop_words)))).hashes)


def length_reason(text: str, words: Words, cfg: FilterConfig) -> str | None:
    if len(text) < cfg.min_chars:
        return "too_short:chars"
    if len(words) < cfg.min_words:
        return "too_short:words"
    if len(words) > cfg.max_words:
        return "too_long:words"
    return None


def symbol_count(text: str) -> int:
    """How many characters of `text` match _SYMBOL."""
    return len(_NOT_SYMBOL_RUNS.sub("", text)) + text.count("_")


def ratio_reason(text: str, cfg: FilterConfig) -> str | None:
    chars = len(text) - sum(map(text.count, " \n\t"))
    if chars == 0:
        return "empty"
    if sum(map(text.count, "0123456789")) / chars > cfg.max_digit_ratio:
        return "digit_ratio"
    if symbol_count(text) / chars > cfg.max_symbol_ratio:
        return "symbol_ratio"
    return None


def is_verse(text: str) -> bool:
    """Poetry-shaped: at least 4 lines, 80% of them short (<= 80 characters)."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return len(lines) >= 4 and sum(len(ln) <= 80 for ln in lines) >= 0.8 * len(lines)


def verse_config(cfg: FilterConfig) -> FilterConfig:
    """`cfg` with the verse limits in place of the prose ones (made once per config)."""
    return cfg.verse


def quality_reason(text: str, words: Words, cfg: FilterConfig) -> str | None:
    """Gopher quality rules, Azerbaijani variant (see the module docstring)."""
    mean_len = int(words.lengths.sum()) / len(words)
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return "quality:mean_word_length"
    hashes = text.count("#") + text.count("...") + text.count("…")
    if hashes / len(words) > 0.1:
        return "quality:symbol_word_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if sum(1 for ln in lines if _BULLET.match(ln)) / len(lines) > cfg.max_bullet_lines:
        return "quality:bullet_lines"
    if ("..." in text or "…" in text) and (
        sum(1 for ln in lines if _ELLIPSIS.search(ln)) / len(lines) > cfg.max_ellipsis_lines
    ):
        return "quality:ellipsis_lines"
    if np.count_nonzero(words.alpha) / len(words) < cfg.min_alpha_words:
        return "quality:alpha_words"
    if cfg.min_stop_words > 0:
        stop = _stop_hashes(cfg.stop_words)
        pos = np.minimum(np.searchsorted(stop, words.hashes), len(stop) - 1)
        found = set(words.hashes[stop[pos] == words.hashes].tolist())  # (np.unique: slower)
        if len(found) < cfg.min_stop_words:
            return "quality:stop_words"
    return None


def _dup_fraction(units: list[str]) -> tuple[float, float]:
    """Fraction of units that repeat an earlier one, and of their characters."""
    if len(set(units)) == len(units):
        return 0.0, 0.0  # nothing repeats (most documents): no loop
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for u in units:
        total_chars += len(u)
        if u in seen:
            dup += 1
            dup_chars += len(u)
        else:
            seen.add(u)
    return dup / max(len(units), 1), dup_chars / max(total_chars, 1)


@lru_cache(maxsize=64)
def _salt(n: int) -> np.uint64:
    return np.uint64(0x9E3779B97F4A7C15 * n % (1 << 64))


def repetition_reason(text: str, words: Words, cfg: FilterConfig) -> str | None:
    """Gopher repetition rules: duplicate lines/paragraphs, top n-grams, duplicated n-grams."""
    lines = [ln for ln in map(str.strip, text.split("\n")) if ln]
    frac, char_frac = _dup_fraction(lines)
    if frac > cfg.max_dup_lines:
        return "repetition:dup_lines"
    if char_frac > cfg.max_dup_line_chars:
        return "repetition:dup_line_chars"
    paragraphs = [p for p in map(str.strip, text.split("\n\n")) if p]
    if len(paragraphs) > 1:
        frac, char_frac = _dup_fraction(paragraphs)
        if frac > cfg.max_dup_paragraphs:
            return "repetition:dup_paragraphs"
        if char_frac > cfg.max_dup_paragraph_chars:
            return "repetition:dup_paragraph_chars"
    lengths = words.lengths.tolist()
    total = max(sum(lengths), 1)
    # One np.unique over the n-grams of every n we need (each n salted apart), not one per n:
    # on documents of a few hundred words its calls cost as much as its (stable) sort.
    first_dup = min(cfg.dup_ngram, default=0)
    ns = [n for n in sorted(set(cfg.top_ngram) | ({first_dup} - {0})) if len(lengths) >= n]
    if not ns:
        return None
    bounds = [0, *accumulate(len(lengths) - n + 1 for n in ns)]
    keys = np.empty(bounds[-1], dtype=np.uint64)
    for n, lo, hi in zip(ns, bounds[:-1], bounds[1:], strict=True):
        np.bitwise_xor(words.ngrams(n), _salt(n), out=keys[lo:hi])
    _, first, inverse, counts = np.unique(
        keys, return_index=True, return_inverse=True, return_counts=True
    )
    for n, lo, hi in zip(ns, bounds[:-1], bounds[1:], strict=True):
        if n in cfg.top_ngram:
            seg_counts = counts[inverse[lo:hi]]
            top = int(seg_counts.argmax())  # a position where the most frequent n-gram is
            most = int(seg_counts[top])
            if most > 1 and most * sum(lengths[top : top + n]) / total > cfg.top_ngram[n]:
                return f"repetition:top_{n}gram"
        if n == first_dup:
            repeat = first[inverse[lo:hi]] != np.arange(lo, hi)  # seen at an earlier position
            reason = _dup_ngrams(repeat, n, words, total, cfg)
            if reason:
                return reason
    return None


def _covered_fraction(repeat: np.ndarray, n: int, lengths: np.ndarray, total: int) -> float:
    """Share of characters in words covered by an n-gram that occurred earlier."""
    starts = np.flatnonzero(repeat)
    if not len(starts):
        return 0.0
    cover = np.zeros(len(lengths) + 1, dtype=np.int64)
    cover[starts] += 1  # starts are distinct, so plain fancy indexing adds correctly
    cover[starts + n] -= 1
    return float(lengths[np.cumsum(cover[:-1]) > 0].sum() / total)


def _dup_ngrams(
    repeat: np.ndarray, n0: int, words: Words, total: int, cfg: FilterConfig
) -> str | None:
    """Gopher's duplicated n-gram rules, from the smallest n up; stops early when it can."""
    floor = min(cfg.dup_ngram.values())
    lengths = words.lengths
    frac = _covered_fraction(repeat, n0, lengths, total)
    if frac > cfg.dup_ngram[n0]:
        return f"repetition:dup_{n0}gram"
    for n in sorted(cfg.dup_ngram):
        if n == n0:
            continue
        if frac <= floor or len(lengths) < n:
            break  # a repeated (n+1)-gram is made of repeated n-grams: larger n cover less
        keys = words.ngrams(n)
        _, first = np.unique(keys, return_index=True)
        rep = np.ones(len(keys), dtype=bool)
        rep[first] = False
        frac = _covered_fraction(rep, n, lengths, total)
        if frac > cfg.dup_ngram[n]:
            return f"repetition:dup_{n}gram"
    return None


def document_reason(text: str, cfg: FilterConfig, words: Words | None = None) -> str | None:
    """The first rule a document fails (length, ratios, quality, repetition), or None.

    `words`: `dedup.words(normalize(text))` if the caller has it already."""
    if words is None:
        words = word_table(normalize(text))
    if is_verse(text):
        cfg = verse_config(cfg)
    return (
        length_reason(text, words, cfg)
        or ratio_reason(text, cfg)
        or quality_reason(text, words, cfg)
        or repetition_reason(text, words, cfg)
    )


LANG_SAMPLE_CHARS = 170


def language_sample(text: str, chars: int = LANG_SAMPLE_CHARS) -> str:
    """Start, middle and end of a long text: lid.176 runs at ~1 MB/s, so a document is judged
    on at most 3 x `chars` characters (a foreign header or footer alone cannot decide it)."""
    if len(text) <= 3 * chars:
        return text
    mid = len(text) // 2 - chars // 2
    return " ".join((text[:chars], text[mid : mid + chars], text[-chars:]))


def language_reason(text: str, lang: str, threshold: float | None = None) -> tuple[str | None, str]:
    """("language:<detected>" or None, detected language) — via langid.keep_language."""
    from .langid import keep_language

    sample = language_sample(text)
    if threshold is None:
        keep, detected, _prob = keep_language(sample, lang)
    else:
        keep, detected, _prob = keep_language(sample, lang, threshold)
    return (None if keep else f"language:{detected}"), detected
