"""Cleaning: mojibake repair (the course seeds), normalisation, casing, Cyrillic→Latin."""

import unicodedata
from pathlib import Path

import pytest

from azllm.corpus.clean import (
    az_lower,
    az_upper,
    clean_text,
    cyrillic_to_latin,
    is_az_cyrillic,
    normalize_az,
    repair_mojibake,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SEEDS = SHARED / "seeds"
PRETRAIN = SHARED / "data" / "az" / "pretrain"
MOJIBAKE_MARKS = ("Ã", "Å", "Ä", "É", "Æ", "â€", "ğŸ", "\ufffd")


def seed(prefix: str) -> str:
    if not SEEDS.is_dir():
        pytest.skip(f"{SEEDS} missing")
    (path,) = SEEDS.glob(f"{prefix}_*.txt")
    return path.read_text(encoding="utf-8")


def cp1254(text: str) -> str:
    """How the seeds were broken: UTF-8 bytes read as Windows-1254, undecodable bytes dropped."""
    return text.encode("utf-8").decode("cp1254", errors="ignore")


# Phrases a reader of the seeds can check: lone-Æ words (Əksinə, Ən, Əgər, Ədədlər), Ğ/Ş,
# the emoji whose bytes were lost (🎯 🛠️) and typographic punctuation.
SEED_PHRASES = {
    "000": [
        "# Gün 1: Giriş: Süni İntellektə İlk Addım 🚀",
        "Əksinə, biz:",
        "Ədədlərin dəqiqliyini 32 bitdən (FP32) 16 bitə (FP16) endirir.",
        "bir chatbotun – yəni **Böyük Dil Modelinin (LLM)** –",
    ],
    "001": [
        "Ən əsas yol daha çox keyfiyyətli Azərbaycan dili mətni toplamaqdır.",
        "### 2. Ən Son Trendlər",
        "# 📚 50 Gündə Süni-İntellekt: Gün 41",
    ],
    "002": [
        "Əgər modelinizə eyni anda bir neçə sorğu gəlirsə, onları **Batch** şəklində",
        "Əgər `B > 1` olarsa, model eyni anda bir neçə prompt-u emal edə bilər.",
    ],
    "003": [
        "🎯 Projenin Amacı",
        "🛠️ Kullanılan Teknolojiler",
        "Modeli bir diyalog veri seti ile eğiterek basit bir Chatbot haline getirmek.",
        "Core: Python, PyTorch (CUDA desteği ile)",
        "1. Neden RNN değil de Transformer?",
        "# Değerleri birleştir",
    ],
    "004": [
        "## Modelin Yüngülləşdirilməsi (Quantization): Yaddaşa Qənaət 💾",
        "> **Quantization** — modelin çəkilərini daha aşağı dəqiqliyə",
    ],
}


@pytest.mark.parametrize("prefix", sorted(SEED_PHRASES))
def test_seeds_come_out_correct(prefix):
    broken = seed(prefix)
    fixed = repair_mojibake(broken)
    for phrase in SEED_PHRASES[prefix]:
        assert phrase in fixed
    for mark in MOJIBAKE_MARKS:
        assert mark not in fixed, [line for line in fixed.split("\n") if mark in line][:2]
    # Breaking the repaired text again gives back the seed byte for byte: the repair is the
    # inverse of the damage, including the bytes cp1254 dropped.
    assert cp1254(fixed) == broken
    assert repair_mojibake(fixed) == fixed  # idempotent


def test_correct_shared_text_is_unchanged():
    if not PRETRAIN.is_dir():
        pytest.skip(f"{PRETRAIN} missing")
    files = sorted(PRETRAIN.glob("*.txt"))
    assert files
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert repair_mojibake(text) == text, path.name


SAMPLES = [
    "Əksinə, Ən əsas yol. ƏLİ ƏHMƏDOV gəldi. Sonda Ə",
    "Ağ dağ, ĞARŞ, Şəki ŞAH; Çox, Öz, Üzüm, İlk, ışıq, şəhər",
    "“Salam” dedi „Hallo“ – 👩‍💻 👍 🎯 ⚙️ 🛠️ 🚀 — ©",
    "Türkçe: Değerleri birleştir, eğiterek, GÜNEŞ",
]


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("encoding", ["cp1254", "cp1252"])
def test_round_trip_through_windows_code_pages(text, encoding):
    broken = text.encode("utf-8").decode(encoding, errors="ignore")
    assert broken != text
    assert repair_mojibake(broken) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_through_latin1(text):
    assert repair_mojibake(text.encode("utf-8").decode("latin-1")) == text


def test_double_encoding_and_mixed_lines():
    assert repair_mojibake(cp1254(cp1254("Gün ərzində"))) == "Gün ərzində"
    # A line that is half right, half broken: only the broken part changes.
    assert repair_mojibake("Gün 1: GiriÅŸ və ÆksinÉ™") == "Gün 1: Giriş və Əksinə"
    assert repair_mojibake("ok line\nGÃ¼n\nşəhər") == "ok line\nGün\nşəhər"
    # Russian read as cp1254: a run of two-byte sequences, one-letter words included.
    assert repair_mojibake(cp1254("Привет, мир и дом")) == "Привет, мир и дом"
    # я is D1 8F and 8F was dropped: a Cyrillic letter is missing, but not which one (с, я,
    # ю, э all fit), so it is marked, not guessed.
    assert repair_mojibake(cp1254("мир и друзья")) == "мир и друзь\ufffd"


@pytest.mark.parametrize(
    "text",
    [
        "GENÇ” dedi",  # Ç” is C7 9D = ǝ if read as bytes: correct Turkish must not change
        "DAĞ” ve ÇOK”",
        "Æble og Åse",  # Danish/Swedish: a lone Æ or Å without any other evidence stays
        "Ärger über Äpfel",
        "Ça va? À bientôt, NAÏVE café",
        "São Paulo, año, Ğ“",
        "Æ",
    ],
)
def test_correct_text_with_lookalike_bytes_is_left_alone(text):
    assert repair_mojibake(text) == text


def test_normalize_schwa_lookalikes_and_homoglyphs():
    assert normalize_az("Azǝrbaycan ƎLİ") == "Azərbaycan ƏLİ"
    assert normalize_az("Azәrbaycan Әli") == "Azərbaycan Əli"  # Cyrillic ә/Ә in Latin words
    assert normalize_az("tərki-сan etməz") == "tərki-can etməz"  # Cyrillic с among Latin
    assert normalize_az("Бакы шәһәри") == "Бакы шәһәри"  # Cyrillic words stay Cyrillic


def test_normalize_controls_whitespace_nfc():
    assert normalize_az("a\x00b\u200bc\u00add\ufeff") == "abcd"
    assert normalize_az("e\u0301v") == "év" and unicodedata.is_normalized("NFC", "év")
    assert normalize_az("a\tb\u00a0c\u2009d  \r\nx \r\n\n\n\n\ny\n") == "a b c d\nx\n\ny"
    assert normalize_az("one   two\t\tthree") == "one two three"
    assert normalize_az("👩\u200d💻") == "👩\u200d💻"  # ZWJ sequences survive
    assert normalize_az("  indented verse") == "  indented verse"


def test_azerbaijani_casing():
    assert "İSTANBUL".lower() != "istanbul"  # why az_lower exists
    assert az_lower("İSTANBUL") == "istanbul"
    assert az_lower("IŞIQ VƏ İŞ") == "ışıq və iş"
    assert az_upper("ılıq iş") == "ILIQ İŞ"
    assert az_upper("azərbaycan") == "AZƏRBAYCAN"
    assert az_lower(az_upper("işıqlı ilıq")) == "işıqlı ilıq"


def test_cyrillic_to_latin():
    assert cyrillic_to_latin("Азәрбајҹан Республикасы") == "Azərbaycan Respublikası"
    assert cyrillic_to_latin("Мән Бакыда јашајырам.") == "Mən Bakıda yaşayıram."
    assert cyrillic_to_latin("Һәр ҝүн китаб охујурам, ағ ҝүл.") == "Hər gün kitab oxuyuram, ağ gül."
    assert cyrillic_to_latin("ЈАШАСЫН ИШЫГ! Јусиф") == "YAŞASIN İŞIQ! Yusif"
    assert cyrillic_to_latin("ЮСИФ вә Юсиф") == "YUSİF və Yusif"
    assert cyrillic_to_latin("ЮСИФ Юсиф") == "ЮСИФ Юсиф"  # no Azerbaijani letter: not converted
    assert is_az_cyrillic("Азәрбајҹан") and not is_az_cyrillic("Я живу в Москве.")
    assert not is_az_cyrillic("Қазақстан Республикасы әсем")  # Kazakh: қ is not Azerbaijani
    assert cyrillic_to_latin("Я живу в Москве.") == "Я живу в Москве."
    # Line by line: an Azerbaijani line converts, the Russian line beside it stays.
    mixed = "Бу ҝүн һава јахшыдыр.\nЭто русский текст."
    assert cyrillic_to_latin(mixed) == "Bu gün hava yaxşıdır.\nЭто русский текст."


def test_clean_text_chain_order():
    # Repair must come first: Cyrillic Azerbaijani that was also read as cp1254.
    broken = cp1254("Бакы   \t шәһәри")
    assert clean_text(broken, transliterate=True) == "Bakı şəhəri"
    assert clean_text(broken) == "Бакы шәһәри"
    assert clean_text("ÆksinÉ™", repair=False) == "ÆksinÉ™"


def test_clean_text_on_a_seed():
    fixed = clean_text(seed("001"))
    assert "Ən əsas yol" in fixed and "\n\n\n" not in fixed
