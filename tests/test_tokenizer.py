import json
import unicodedata

import pytest
from conftest import SAMPLE, run_cli

from azllm.errors import AzllmError
from azllm.tokenizer import (
    ASSISTANT,
    END,
    SPECIAL_TOKENS,
    USER,
    load_tokenizer,
    train_tokenizer,
)

AZ_TEXT = "Əksinə, İlqar ığdır şəhərində çörək, südlü ğ, şüşə və ÖZÜ; Ümid 2024-cü ildə gəldi!"


def test_round_trip_azerbaijani_letters(tok):
    for text in [AZ_TEXT, "ə ı ğ ş ç ö ü İ Ə I Ğ Ş Ç Ö Ü", "  iki  boşluq\nyeni sətir\t tab 🚀"]:
        assert tok.decode(tok.encode(text)) == text


def test_text_never_seen_still_round_trips(tok):
    # byte-level BPE has all 256 bytes: Cyrillic, CJK and emoji come back intact
    text = "Москва 東京 🙂 ǝ"
    assert tok.decode(tok.encode(text)) == text


def test_nfc_normalisation(tok):
    decomposed = unicodedata.normalize("NFD", "gözəl Ömür çiçək")
    assert decomposed != "gözəl Ömür çiçək"
    assert tok.encode(decomposed) == tok.encode("gözəl Ömür çiçək")


def test_special_tokens_have_fixed_ids(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.tok.token_to_id(t) == i
    # control ids are put in by id (text never becomes one: test_special_tokens.py)
    user, end, assistant = (tok.tok.token_to_id(t) for t in (USER, END, ASSISTANT))
    ids = [user] + tok.encode("Salam") + [end, assistant]
    assert tok.decode(ids) == "Salam"  # special tokens dropped when decoding for display
    assert tok.decode(ids, skip_special=False) == "<|user|>Salam<|end|><|assistant|>"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)


def test_trained_merges_make_azerbaijani_words_cheaper_than_bytes(tok):
    text = (SAMPLE / sorted(p.name for p in SAMPLE.glob("*.txt"))[0]).read_text(encoding="utf-8")
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_vocab_size_too_small_is_refused():
    with pytest.raises(AzllmError, match="too small"):
        train_tokenizer(["salam"], 100)


def test_empty_corpus_is_refused():
    with pytest.raises(AzllmError, match="empty"):
        train_tokenizer([], 1000)


def test_cli_train_and_stats(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("Salam dünya.\n\nBu gün hava çox gözəldir.\n\nSabah görüşərik.\n" * 30)
    out = tmp_path / "tok.json"
    run_cli("tokenizer", "train", "--input", text, "--vocab-size", "300", "--out", out)
    tok = load_tokenizer(out)
    assert tok.vocab_size <= 300
    stats = json.loads(
        run_cli("tokenizer", "stats", "--tokenizer", out, "--text", text, "--json").stdout
    )
    words = len(text.read_text().split())
    tokens = sum(len(tok.encode(d.strip())) for d in text.read_text().split("\n\n") if d.strip())
    assert stats["words"] == words
    assert stats["tokens"] == tokens
    assert stats["fertility"] == pytest.approx(tokens / words)
    assert 0 < stats["vocab_used"] <= tok.vocab_size


def test_load_rejects_foreign_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "plain.json"
    path.write_text(Tokenizer(models.BPE()).to_str())
    with pytest.raises(AzllmError, match="special tokens"):
        load_tokenizer(path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AzllmError, match="not a valid tokenizer"):
        load_tokenizer(bad)
