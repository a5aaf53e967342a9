"""Deduplication: hash index, normalisation, exact/line/near decisions, the Füzuli overlap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared_path

from azllm.corpus.clean import az_upper
from azllm.corpus.dedup import (
    Deduplicator,
    HashIndex,
    dedup_keys,
    normalize,
    normalize_lines,
    pack_ref,
    unpack_ref,
    words,
)
from azllm.corpus.minhash import MinHasher
from azllm.corpus.pipeline import build_corpus


def test_hash_index_across_merges_and_cap():
    idx = HashIndex(buffer_size=100, max_run=300)
    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**63), 2**63 - 1, size=1050, dtype=np.int64).tolist()
    for i, k in enumerate(keys):
        assert idx.add(k, i)
    assert len(idx) == 1050 and len(idx.buffer) == 50  # the rest in sorted runs
    assert all(len(k) <= 300 for k, _ in idx.runs) and len(idx.runs) >= 4
    assert all(np.all(np.diff(k) > 0) for k, _ in idx.runs)
    assert [idx.get(k) for k in keys] == list(range(1050))
    assert idx.get_many([keys[5], 12345, keys[1049], keys[700]]) == [5, None, 1049, 700]
    capped = HashIndex(max_keys=3)
    assert [capped.add(k, 0) for k in range(5)] == [True, True, True, False, False]
    assert capped.full and capped.get(4) is None


def test_normalize_folds_case_punctuation_and_apostrophes():
    assert normalize("İLHAM  Iğdır,  ŞƏKİ!") == "ilham ığdır şəki"
    assert normalize("Şəm’vəş  məhrəmi-bəzm") == normalize("şəmvəş məhrəmi bəzm")
    assert normalize_lines("Bir, iki.\n\nÜÇ") == ["bir iki", "", "üç"]
    w = words(normalize("Salam dünya! Salam, dünyə 1820-ci"))
    assert w.hashes[0] == w.hashes[2] and w.hashes[1] != w.hashes[3]
    assert w.lengths.tolist() == [5, 5, 5, 5, 4, 2] and w.alpha.tolist() == [1, 1, 1, 1, 0, 1]


POEM = """Aşiq oldum yenə bir tazə güli-rənayə
Ki, salır al ilə hər dəm məni yüz qovğayə.
Müşt urub, qalibi-fərsudəmi gəh həbs qılır,
Gəh sərasiməvü üryan buraxır səhrayə.
Üzümün qani ilə sinəmi al etdim kim,
Aləti-sənət ola ol büti-bipərvayə."""


def keys_of(text, mh=None):
    return dedup_keys(text, mh, min_line_chars=20)


def test_exact_documents_and_lines():
    d = Deduplicator("exact")
    assert d.check(keys_of(POEM), pack_ref(0, 0)).reason is None
    v = d.check(keys_of(az_upper(POEM).replace(",", " ,")), pack_ref(1, 3))
    assert v.reason == "duplicate:exact" and unpack_ref(v.head) == (0, 0)
    # a new document that repeats two of the poem's lines: those two go, the rest stays
    new = "Bu gün hava çox gözəl idi, biz hamımız birlikdə şəhər parkına getdik.\n"
    new += "\n".join(POEM.split("\n")[:2])
    new += "\nAxşam evə qayıdıb çay içdik, sonra uzun müddət maraqlı kitab oxuduq."
    v = d.check(keys_of(new), pack_ref(1, 4))
    assert v.reason is None and v.drop_lines == {1, 2} and v.dup_lines == 2
    # a refrain repeated inside one document is not a duplicate of itself
    refrain = "Gözüm, canım, əfəndim, sevdiyim, dövlətli sultanım!"
    song = "\n".join(["Birinci misra burada yazılıb durur.", refrain,
                      "İkinci misra da burada yazılıb durur.", refrain])  # fmt: skip
    assert d.check(keys_of(song), pack_ref(2, 0)).drop_lines == frozenset()


def test_variant_lines_of_a_known_poem_go_too():
    d = Deduplicator("exact")
    d.check(keys_of(POEM), pack_ref(0, 0))
    lines = POEM.split("\n")
    variant = lines[:2] + ["Müşt urub, qalibi-fərsudəmi gah həbs qilir,"] + lines[3:]  # edition
    new_poem = [f"Bu təzə şeirin {w} misrası heç yerdə yoxdur." for w in
                ("birinci", "ikinci", "üçüncü", "dördüncü", "beşinci")]  # fmt: skip
    v = d.check(keys_of("\n".join(new_poem + variant)), pack_ref(1, 0))
    assert v.reason is None
    assert v.drop_lines == {5, 6, 7, 8, 9, 10} and v.variant_lines == 1  # the new poem stays
    # what is left of a known poem alone is too little to keep
    only = lines[:3] + ["Gəh sərasiməvü üryan buraxır səhrayə!!", "Yeni misra, heç kəs bilmir."]
    assert d.check(keys_of("\n".join(only)), pack_ref(1, 1)).reason == "duplicate:lines"


def test_near_duplicates_with_minhash():
    mh = MinHasher(threshold=0.7)
    assert mh.bands * mh.rows <= mh.num_perm
    base = " ".join(f"söz{i % 97}x{i}" for i in range(300))
    edited = base.replace("söz5x5 ", "dəyişdi ").replace("söz50x50 ", "")
    other = " ".join(f"başqa{i}" for i in range(300))
    d = Deduplicator("near")
    assert d.check(keys_of(base, mh), pack_ref(0, 0)).reason is None
    v = d.check(keys_of(edited, mh), pack_ref(0, 1))
    assert v.reason == "duplicate:near" and unpack_ref(v.head) == (0, 0)
    assert d.check(keys_of(other, mh), pack_ref(0, 2)).reason is None
    assert Deduplicator("exact").check(keys_of(edited, mh), pack_ref(0, 1)).reason is None
    assert Deduplicator("none").check(keys_of(base, mh), 0).reason is None


@pytest.mark.parametrize("dedup", ["near"])
def test_fuzuli_overlap_with_classical_poems_is_found(tmp_path, dedup):
    pretrain = shared_path("data", "az", "pretrain")
    poems, fuzuli = pretrain / "wikisource_classical_poems.txt", pretrain / "fuzuli_divan_vol1.txt"
    report = build_corpus([poems, fuzuli], tmp_path / "out", dedup=dedup, workers=2, progress=False)
    rows = {(r["source"], r["earlier_source"]): r for r in report.line_overlap}
    row = rows[("fuzuli_divan_vol1.txt", "wikisource_classical_poems.txt")]
    # 2,494 of the divan's 5,323 lines with letters (5,866 with page numbers) are in the poems
    assert 0.43 <= row["fraction"] <= 0.50, row
    src = report.sources["fuzuli_divan_vol1.txt"]
    assert src.bytes_out < 0.6 * src.bytes_in  # the overlap and its variant lines are gone
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["line_overlap"][0]["lines"] == row["lines"]
    # the other direction of the same run: nothing of the poems was removed for the divan
    assert ("wikisource_classical_poems.txt", "fuzuli_divan_vol1.txt") not in rows
