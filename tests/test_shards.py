import json

import numpy as np
import pytest

from azllm.documents import DOC_CHARS, iter_all_documents
from azllm.errors import AzllmError
from azllm.shards import TokenBatches, read_meta, tokenize_to_shards


def _docs_from_split(data_dir, tok, split):
    meta = read_meta(data_dir)
    ids = np.concatenate(
        [
            np.fromfile(data_dir / s["file"], dtype=meta["dtype"])
            for s in meta["splits"][split]["shards"]
        ]
    )
    docs, cur = [], []
    for t in ids.tolist():
        if t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == [], "every document ends with EOS"
    return docs


def test_meta_matches_shards_and_documents_round_trip(data_dir, tok):
    from conftest import SAMPLE

    meta = read_meta(data_dir)
    assert meta["tokenizer_sha256"] == tok.sha256()
    assert meta["dtype"] == "uint16" and meta["eos_id"] == tok.eos_id
    for split in ("train", "val"):
        info = meta["splits"][split]
        sizes = [(data_dir / s["file"]).stat().st_size // 2 for s in info["shards"]]
        assert sum(sizes) == info["tokens"] == sum(s["tokens"] for s in info["shards"])
    train = _docs_from_split(data_dir, tok, "train")
    val = _docs_from_split(data_dir, tok, "val")
    source = list(iter_all_documents([SAMPLE]))
    assert sorted(train + val) == sorted(source)
    assert meta["splits"]["val"]["documents"] == len(val) > 0
    assert meta["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val)
    assert 0.03 < len(val) / len(source) < 0.25  # asked for 10%


def test_split_is_deterministic_and_order_independent(tmp_path, tok):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    # blank lines between: a document per paragraph (without them, lines form long chunks)
    a.write_text("\n\n".join(f"Birinci fayl, sətir {i}: gözəl gün." for i in range(300)))
    b.write_text("\n\n".join(f"İkinci fayl, sətir {i}: çox soyuq." for i in range(300)))
    tokenize_to_shards(tok, [a, b], tmp_path / "x", val_fraction=0.2, progress=False)
    tokenize_to_shards(tok, [b, a], tmp_path / "y", val_fraction=0.2, progress=False)
    vx = sorted(_docs_from_split(tmp_path / "x", tok, "val"))
    vy = sorted(_docs_from_split(tmp_path / "y", tok, "val"))
    assert vx == vy and 80 < len(vx) < 160  # 20% of 600


def test_file_without_blank_lines_is_running_text_with_its_line_breaks(tmp_path, tok):
    """A verse-per-line file was a document per line (EOS between lines), so the model never
    saw a line break in such text; now it is chunks of whole lines that keep them."""
    lines = [f"Bu {i}-ci sətirdir, Bakıda hava bu gün çox gözəldir." for i in range(400)]
    f = tmp_path / "verses.txt"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenize_to_shards(tok, [f], tmp_path / "d", val_fraction=0.0, progress=False)
    docs = _docs_from_split(tmp_path / "d", tok, "train")
    assert "\n".join(docs).split("\n") == lines  # every line, in order, none cut
    assert 3 <= len(docs) <= 10  # ~21 KB in chunks of about DOC_CHARS, not 400 documents
    assert all(len(d) <= DOC_CHARS and d.count("\n") > 10 for d in docs)


def test_refuses_non_empty_output_and_empty_corpus(tmp_path, tok):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    src = tmp_path / "s.txt"
    src.write_text("salam\n")
    with pytest.raises(AzllmError, match="--force"):
        tokenize_to_shards(tok, [src], tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"  # nothing lost
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(AzllmError, match="empty"):
        tokenize_to_shards(tok, [empty], tmp_path / "new", val_fraction=0.0, progress=False)
    assert not (tmp_path / "new").exists()  # a failed run leaves no half folder


def test_batches_are_a_function_of_the_key(data_dir):
    data = TokenBatches(data_dir, block_size=32, seed=7)
    a = data.global_batch("train", 5, 8)
    assert a.shape == (8, 33)
    assert (data.global_batch("train", 5, 8) == a).all()
    assert not (data.global_batch("train", 6, 8) == a).all()
    assert (data.global_batch("train", 5, 8, slice(4, 8)) == a[4:]).all()
    # each row is a contiguous window of the train shard
    meta = read_meta(data_dir)
    flat = np.fromfile(data_dir / meta["splits"]["train"]["shards"][0]["file"], dtype=np.uint16)
    row = a[0].numpy()
    starts = np.flatnonzero(flat == row[0])
    assert any((flat[s : s + 33] == row).all() for s in starts)


def test_truncated_shard_is_reported(tmp_path, data_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / read_meta(copy)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(AzllmError, match="truncated"):
        TokenBatches(copy, 32, 0)
    (copy / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(AzllmError, match="not an azllm shard folder"):
        TokenBatches(copy, 32, 0)


def test_a_corpus_folder_keeps_its_own_split(tmp_path, tok):
    # `azllm corpus build` decided train/val (near-duplicates kept on one side); tokenizing its
    # folder must not re-split by hash, whatever --val-fraction says.
    import zstandard

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = {
        s: [f"{s} sənədi {i}: Bakıda gözəl bir gün." for i in range(40)] for s in ("train", "val")
    }
    for split, texts in docs.items():
        lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
        (corpus / f"{split}.jsonl.zst").write_bytes(zstandard.compress(lines.encode("utf-8")))
    (corpus / "report.json").write_text(json.dumps({"counts": {"in": 80}}, indent=2))
    tokenize_to_shards(tok, [corpus], tmp_path / "d", val_fraction=0.5, progress=False)
    for split in ("train", "val"):
        assert sorted(_docs_from_split(tmp_path / "d", tok, split)) == sorted(docs[split])
