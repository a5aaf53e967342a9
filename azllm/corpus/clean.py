"""Cleaning Azerbaijani text: mojibake repair, normalisation, casing, Cyrillic→Latin.

`clean_text` runs the chain in order: repair (bytes must be right before anything else looks
at characters) → transliterate (optional; works on real Cyrillic letters) → normalize.

Mojibake: UTF-8 bytes that were decoded as Windows-1254 (the Turkish code page; also cp1252 and
Latin-1) turn `Gün` into `GÃ¼n`. Mapping each character back to its byte and decoding as UTF-8
undoes it, except for the bytes cp1254 has no character for (81 8D 8E 8F 90 9D 9E): those were
dropped. `Ə` is C6 8F, so it comes back as a lone `Æ`; `Ğ` (C4 9E) as a lone `Ä`, `Ş` (C5 9E)
as a lone `Å`, `”` (E2 80 9D) as `â€`, and many emoji lose a byte. We put the byte back when
exactly one choice is plausible (see `_lost_byte`). ftfy, the usual tool, leaves these broken.
"""

import re
import unicodedata
from functools import lru_cache

# ---------------------------------------------------------------------------- mojibake

# Bytes Windows-1254 cannot decode: a UTF-8 sequence that contained one comes back one short.
_LOST = (0x81, 0x8D, 0x8E, 0x8F, 0x90, 0x9D, 0x9E)


def _byte_table() -> dict[str, int]:
    """Character → the byte it stands for in a mis-decoded text (Latin-1, cp1252, cp1254)."""
    table = {chr(b): b for b in range(0x80, 0x100)}  # Latin-1, with C1 controls ("sloppy")
    for enc in ("cp1252", "cp1254"):
        for b in range(0x80, 0x100):
            try:
                table[bytes([b]).decode(enc)] = b
            except UnicodeDecodeError:
                pass
    return table


_BYTE = _byte_table()


def _chars(lo: int, hi: int) -> str:
    return re.escape("".join(sorted(c for c, b in _BYTE.items() if lo <= b <= hi)))


# A UTF-8 lead byte's character followed by a continuation byte's: the cheap test that lets
# clean text (almost all of a corpus) skip the byte-level scan.
_HINT = re.compile(f"[{_chars(0xC2, 0xF4)}][{_chars(0x80, 0xBF)}]")
_UNMAPPABLE = re.compile(f"[^\x00-\x7f{_chars(0x80, 0xFF)}]")
# A lead byte's character and the continuation characters after it: one candidate sequence.
_SEQ = re.compile(f"[{_chars(0xC2, 0xF4)}][{_chars(0x80, 0xBF)}]{{0,3}}")

# Emoji by popularity (common ones, and those that course/markdown text uses), to choose among
# the several emoji a lost byte can stand for (🎯 F0 9F 8E AF shows as ğŸ¯, like 🍯 🏯 🐯).
_EMOJI_RANK = {
    c: i
    for i, c in enumerate(
        "👍😍😁😎🎯📝🔍🎉👏🙏🤝💡🚀📚🔥✅❌⚠📌📊📈📉🧠🤖💻🖥🛠⚙🔧🔨🔑🔒🔓🔐🔎📁📂📄📋📎📍📞"
        "🎓🏆🏁🏗🏠🐍🐛🐳🐧🎨🎮🎵🎬🎁🎂🍀🌍🌐💬📢🔔🔗🔄⏳🧪🧩🔬💾📦🔮💎⭐🌟✨👀👉👇😂🤣😭😘"
        "🥰😊💕🥺😅🤦🤷🙄😆🤗😉🤔🙂😳🥳👌💜😔💪💖😋😏😢💗😩💯🌹💞🎈💙😃😡💐😜🙈🤞😄🤤🙌"
        "🤪😀💋💀💔😌💓🤩🙃😬😱😴🤭😐🌞😒😇🌸😈🎶🎊🥵😞💚🖤💰😚👑💥🙋😑🥴👈💩👋🤮😤🤢😥"
        "🌈💛😝😫😲🔴🌻🤯💃👊🤬🏃😕👁🍕🍎🐶🐱🐰🐝🐞🏢🏫🏥🎤🎧🎥🎲🏅🏈🏀📅📆📐📏🍑🐑👎👐"
    )
}


_CYR_LEADS = (0xD0, 0xD1, 0xD2, 0xD3)  # first bytes of Cyrillic letters


def _decode(seq: list[int]) -> str | None:
    try:
        return bytes(seq).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _pictograph(c: str) -> bool:
    return bool(c) and (0x1F000 <= ord(c[-1]) <= 0x1FAFF or 0x2600 <= ord(c[-1]) <= 0x27BF)


def _lost_byte(lead: int, conts: list[int], prev: str, nxt: str) -> str | None:
    """The character a sequence one byte short stood for, or None when nothing fits well."""
    cands = []
    for pos in range(len(conts) + 1):
        for m in _LOST:
            ch = _decode([lead, *conts[:pos], m, *conts[pos:]])
            if ch:
                cands.append(ch)
    letters = [c for c in cands if c in "ƏĞŞ"]  # the Azerbaijani/Turkish letters that lose one
    if len(letters) == 1:
        return letters[0]
    if "\ufe0f" in cands:  # EF B8 8F: the emoji variation selector after ⚙ 🛠 ❤
        return "\ufe0f"
    if "\u201d" in cands:  # E2 80 + 9D ” or 9E „ or 8D zero-width joiner (inside 👩‍💻)
        if _pictograph(prev) and _BYTE.get(nxt) in (0xE2, 0xF0):
            return "\u200d"
        if (not prev or prev.isspace() or prev in "([{") and nxt.isalnum():
            return "\u201e"
        return "\u201d"
    cyrillic = [c for c in cands if "\u0400" <= c <= "\u04ff"]
    if len(cyrillic) > 1 and ("\u0400" <= prev[-1:] <= "\u04ff" or _BYTE.get(nxt, 0) in _CYR_LEADS):
        return "\ufffd"  # a Cyrillic letter inside a Cyrillic word, but А, Н or О? с, я or ю?
    ranked = [c for c in cands if c in _EMOJI_RANK]
    if ranked:
        return min(ranked, key=_EMOJI_RANK.__getitem__)
    if any(_pictograph(c) for c in cands):
        return "\ufffd"  # an emoji, but which one cannot be told
    return None


def _common(ch: str) -> bool:
    """Two-byte results that need no further evidence: Latin-1/Latin Extended-A, ə, Ə, Ș, Ț."""
    cp = ord(ch)
    return cp < 0x180 or ch in "Əəƒ" or 0x218 <= cp <= 0x21B


@lru_cache(maxsize=1 << 16)
def _classify(seq: str) -> tuple[str | None, str, int, list[int]]:
    """A candidate sequence → (decoded or None, kind, characters used, its bytes).

    kind: "sure" (a complete, valid UTF-8 sequence), "ctx" (complete, but decodes to a rare
    script: kept only next to other repairs, so `GENÇ”` (C7 9D = ǝ) in correct Turkish text
    survives), "short" (one byte short: see _scan), "" (not mojibake).
    """
    b = _BYTE[seq[0]]
    need = 1 if b < 0xE0 else 2 if b < 0xF0 else 3
    codes = [b] + [_BYTE[c] for c in seq[1 : 1 + need]]
    if len(codes) == need + 1:
        ch = _decode(codes)
        kind = "" if ch is None else "sure" if need > 1 or _common(ch) else "ctx"
        return ch, kind, len(codes), codes
    return None, "short" if len(codes) == need else "", len(codes), codes


def _scan(line: str) -> list[tuple[str, str | None, str]]:
    """Split a line into pieces (original, replacement or None, kind).

    kind as in _classify, and "weak" for a sequence one byte short that was recovered (an
    NBSP turned space, or a byte cp1254 dropped): it needs mojibake evidence in the line.
    """
    pieces: list[tuple[str, str | None, str]] = []
    start = 0
    for m in _SEQ.finditer(line):
        i = m.start()
        if i < start:
            continue
        ch, kind, used, codes = _classify(m.group())
        j = i + used
        if kind == "short":
            kind = "weak"
            if codes[0] in (0xC2, 0xC3) and line[j : j + 1] == " ":
                ch, j = _decode([codes[0], 0xA0]), j + 1  # NBSP that became a space: Ã  → à
            else:
                prev = pieces[-1][1] if pieces and start == i else line[i - 1 : i]
                ch = _lost_byte(codes[0], codes[1:], prev or "", line[j : j + 1])
        if ch is None:
            continue
        if start < i:
            pieces.append((line[start:i], None, ""))
        pieces.append((line[i:j], ch, kind))
        start = j
    if start < len(line):
        pieces.append((line[start:], None, ""))
    return pieces


def _resolve(pieces: list[tuple[str, str | None, str]], doc_evidence: int, line: str) -> str:
    repaired = [p[1] is not None for p in pieces]
    keep = []
    for k, (_, _, kind) in enumerate(pieces):
        if kind == "ctx":  # a real mis-decoded Cyrillic/Greek/... word gives a run of these
            near = (k > 0 and repaired[k - 1]) or (k + 1 < len(pieces) and repaired[k + 1])
            keep.append(bool(near))
        else:
            keep.append(kind == "sure")
    evidence = sum(keep)
    if evidence >= 2:  # the line is mojibake: one-letter words (Ğ¸ = и) need no neighbour
        keep = [ok or kind == "ctx" for ok, (_, _, kind) in zip(keep, pieces, strict=True)]
    # With no evidence in the line itself, the document's counts only if every character of
    # the line could be mojibake (a line with ə or Cyrillic in it was not mis-decoded).
    weak_ok = evidence > 0 or (doc_evidence >= 2 and not _UNMAPPABLE.search(line))
    out = []
    for (orig, repl, kind), ok in zip(pieces, keep, strict=True):
        use = repl is not None and (ok or (kind == "weak" and weak_ok))
        out.append(repl if use else orig)
    return "".join(out)


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 read as cp1254/cp1252/Latin-1, line by line; correct text comes back as is.

    A line's lost-byte guesses (lone `Æ` → `Ə`) are applied only when the line itself holds
    complete mojibake sequences, or when the document does and the line has nothing but
    characters a mis-decoded text can contain. Runs up to 3 times for double encodings.
    """
    for _ in range(3):
        if not _HINT.search(text):
            return text
        lines = text.split("\n")
        scans = [_scan(line) if _HINT.search(line) or "Æ" in line else [] for line in lines]
        doc_evidence = sum(1 for s in scans for p in s if p[2] == "sure")
        fixed = []
        for line, pieces in zip(lines, scans, strict=True):
            if not pieces and doc_evidence >= 2 and not line.isascii():
                pieces = _scan(line)
            if not any(p[1] is not None for p in pieces):
                fixed.append(line)
                continue
            fixed.append(_resolve(pieces, doc_evidence, line))
        new = "\n".join(fixed)
        if new == text:
            return text
        text = new
    return text


# ---------------------------------------------------------------------------- normalisation

# Control characters (not \t \n) and invisible format characters: soft hyphen, zero-width space,
# direction marks and embeddings, word joiners, BOM. ZWJ/ZWNJ stay (emoji sequences, Persian).
_CONTROLS = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b\u200e\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]"
)
_SPACES = re.compile("[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_SPACE_RUNS = re.compile("  +")
BLANK_RUNS = re.compile(r"\n{3,}")  # also used by filters.py and pipeline.py
_CYRILLIC = re.compile("[\u0400-\u04ff]")
_WORD = re.compile(r"[^\W\d_]+")
# Cyrillic letters that look like Latin ones; a Latin word typed with one of them (often the
# Cyrillic schwa ә on keyboards without Ə) is fixed. Words that are mostly Cyrillic are left.
_HOMOGLYPHS = str.maketrans(
    "әӘаеорсухіјһАВЕКМНОРСТХІЈҺ",
    "əƏaeopcyxijhABEKMHOPCTXIJH",
)
_LOOKALIKES = (("\u01dd", "ə"), ("\u018e", "Ə"))  # ǝ (turned e), Ǝ (reversed E)


def _fix_mixed_word(m: re.Match[str]) -> str:
    word = m.group()
    cyr = len(_CYRILLIC.findall(word))
    if cyr == 0 or cyr == len(word) or len(word) - cyr < cyr:
        return word
    return word.translate(_HOMOGLYPHS)


def _squeeze(m: re.Match[str]) -> str:
    """A run of spaces inside a line becomes one; indentation at a line's start stays."""
    at = m.start()
    return m.group() if at == 0 or m.string[at - 1] == "\n" else " "


def normalize_az(text: str) -> str:
    """NFC, Azerbaijani schwa look-alikes, controls and whitespace.

    Newlines become \\n; tabs and unusual spaces a plain space; runs of spaces inside a line
    one space; trailing spaces go; runs of blank lines become one blank line (paragraph breaks
    survive); leading/trailing blank lines of the text go. Indentation is kept (code, verse).
    """
    # Each step is guarded by a cheap membership test: most text needs none of them, and the
    # regex passes are what would make cleaning slow.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    for odd in ("\u2028", "\u2029", "\x0b", "\x0c"):
        if odd in text:
            text = text.replace(odd, "\n")
    if not text.isascii():
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        for wrong, right in _LOOKALIKES:
            if wrong in text:
                text = text.replace(wrong, right)
        if _CYRILLIC.search(text):
            lines = text.split("\n")
            for k, line in enumerate(lines):
                if _CYRILLIC.search(line):
                    lines[k] = _WORD.sub(_fix_mixed_word, line)
            text = "\n".join(lines)
    text = _CONTROLS.sub("", text)
    text = _SPACES.sub(" ", text)
    if " \n" in text or text.endswith(" "):
        text = "\n".join(line.rstrip(" ") for line in text.split("\n"))
    if "  " in text:
        text = _SPACE_RUNS.sub(_squeeze, text)
    if "\n\n\n" in text:
        text = BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")


def az_lower(s: str) -> str:
    """Lowercase by Azerbaijani rules: I → ı, İ → i (Python gives i and i̇)."""
    return s.replace("I\u0307", "i").replace("İ", "i").replace("I", "ı").lower()


def az_upper(s: str) -> str:
    """Uppercase by Azerbaijani rules: i → İ, ı → I (Python gives I for both)."""
    return s.replace("i", "İ").upper()


# ---------------------------------------------------------------------------- Cyrillic → Latin

# The 1958–1991 Azerbaijani Cyrillic alphabet → the Latin alphabet in use since 1992 (the 1991
# one with Ə for Ä), plus Russian letters that appear in loanwords (ц → s as in "sement").
_CYR2LAT = {
    "а": "a", "б": "b", "в": "v", "г": "q", "ғ": "ğ", "д": "d", "е": "e", "ә": "ə", "ж": "j",
    "з": "z", "и": "i", "ы": "ı", "ј": "y", "к": "k", "ҝ": "g", "ґ": "g", "л": "l", "м": "m",
    "н": "n", "о": "o", "ө": "ö", "п": "p", "р": "r", "с": "s", "т": "t", "у": "u", "ү": "ü",
    "ф": "f", "х": "x", "һ": "h", "ч": "ç", "ҹ": "c", "ҷ": "c", "ш": "ş", "й": "y", "э": "e",
    "ц": "s", "щ": "şç", "ё": "yo", "ю": "yu", "я": "ya", "ъ": "", "ь": "",
}  # fmt: skip
_UPPER_OF = {"и": "İ", "ы": "I"}
_TABLE = {}
for _c, _l in _CYR2LAT.items():
    _TABLE[ord(_c)] = _l
    _TABLE[ord(_c.upper())] = _UPPER_OF.get(_c, _l[:1].upper() + _l[1:])
_MULTI_CAPS = re.compile("([ЩЁЮЯ])(?=[А-ЯЁӘҒҸЈҮӨҺҜ])|(?<=[А-ЯЁӘҒҸЈҮӨҺҜ])([ЩЁЮЯ])")
_AZ_MARKERS = set("әғҹјүөһҝӘҒҸЈҮӨҺҜ")
# Letters of other Cyrillic alphabets (Kazakh, Uzbek, Tatar, Bashkir, Ukrainian) that share
# some of the markers above but are not Azerbaijani.
_FOREIGN = set("қңұіўҳҗҡҙҫӣӯєїҚҢҰІЎҲҖҠҘҪӢӮЄЇ")
_RUSSIAN_ONLY = re.compile("[ёщъьэюяЁЩЪЬЭЮЯ]")


def is_az_cyrillic(text: str) -> bool:
    """True when the Cyrillic in `text` is Azerbaijani (ә ғ ҹ ј ү ө һ ҝ), not Russian etc."""
    cyr = az = foreign = 0
    for ch in text:
        if "\u0400" <= ch <= "\u04ff":
            cyr += 1
            az += ch in _AZ_MARKERS
            foreign += ch in _FOREIGN
    return az > 0 and az >= 0.03 * cyr and foreign <= 0.1 * az


def _transliterate(line: str) -> str:
    line = _MULTI_CAPS.sub(lambda m: _TABLE[ord(m.group())].upper(), line)
    return line.translate(_TABLE)


def cyrillic_to_latin(text: str) -> str:
    """Azerbaijani Cyrillic → Latin, line by line; Russian or other Cyrillic is left alone.

    A line is converted when it is Azerbaijani Cyrillic itself, or when the whole text is and
    the line has no letters only Russian uses (short lines like "Бакы" carry no marker).
    """
    if not _CYRILLIC.search(text):
        return text
    text = unicodedata.normalize("NFC", text)  # й as и + breve → one letter
    doc_az = is_az_cyrillic(text)
    lines = text.split("\n")
    for k, line in enumerate(lines):
        if not _CYRILLIC.search(line):
            continue
        if is_az_cyrillic(line) or (
            doc_az and not _RUSSIAN_ONLY.search(line) and not _FOREIGN.intersection(line)
        ):
            lines[k] = _transliterate(line)
    return "\n".join(lines)


def clean_text(text: str, *, repair: bool = True, transliterate: bool = False) -> str:
    """The cleaning chain: repair mojibake → (optionally) Cyrillic→Latin → normalize."""
    if repair:
        text = repair_mojibake(text)
    if transliterate:
        text = cyrillic_to_latin(text)
    return normalize_az(text)
