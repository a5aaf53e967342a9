"""The whole build: languages dropped, poetry kept, deterministic output, errors, interruption."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard
from conftest import REPO, shared_path

from azllm.corpus.pipeline import build_corpus
from azllm.corpus.process import BuildConfig, _init_worker, process_document
from azllm.corpus.readers import Document, ReaderOptions, expand_inputs, read_documents
from azllm.errors import AzllmError

AZ = [
    "Azərbaycan Cənubi Qafqazda yerləşən bir ölkədir. Onun paytaxtı Bakı şəhəridir və ölkənin ən "
    "böyük şəhəri də budur. Ölkənin şərqində Xəzər dənizi, şimalında isə Böyük Qafqaz dağları "
    "yerləşir. Azərbaycanda müxtəlif iqlim qurşaqları var, buna görə də burada çox zəngin təbiət "
    "və bitki örtüyü mövcuddur.",
    "Azərbaycan dili türk dilləri ailəsinin oğuz qrupuna aiddir. Bu dildə on milyonlarla insan "
    "danışır. Müasir Azərbaycan əlifbası latın qrafikası əsasında qurulub və otuz iki hərfdən "
    "ibarətdir. Dilin zəngin ədəbi ənənəsi var, Füzuli, Nəsimi və Xətai kimi şairlər bu dildə "
    "gözəl əsərlər yaradıblar.",
    "Novruz bayramı yazın gəlişini bildirir və hər il mart ayında qeyd olunur. Bayramdan əvvəl "
    "dörd çərşənbə keçirilir: su, od, yel və torpaq çərşənbələri. İnsanlar evlərini təmizləyir, "
    "səməni göyərdir, şəkərbura və paxlava bişirirlər. Uşaqlar qapı-qapı gəzib papaq atır, "
    "tonqal üstündən tullanırlar.",
]
TR = [
    "Türkiye, Anadolu ve Trakya'da yer alan bir ülkedir. Başkenti Ankara, en kalabalık şehri ise "
    "İstanbul'dur. Ülkenin üç tarafı denizlerle çevrilidir ve bu nedenle kıyı şeritleri oldukça "
    "uzundur. Türk mutfağı dünyanın en zengin mutfaklarından biri olarak kabul edilir.",
    "Bugün hava çok güzeldi, bu yüzden arkadaşlarımla birlikte sahilde uzun bir yürüyüş yaptık. "
    "Akşam olunca küçük bir lokantada yemek yedik ve çay içtik. Ertesi gün erkenden kalkıp müzeyi "
    "gezmeye karar verdik, çünkü orada yeni bir sergi açılmıştı.",
]
RU = (
    "Москва является столицей России и крупнейшим городом страны. Город расположен на реке Москве "
    "в центре Восточно-Европейской равнины. В Москве находится множество музеев, театров и "
    "университетов, а также знаменитый Кремль и Красная площадь."
)
EN = (
    "The quick development of language technology has made it possible to build useful models "
    "for languages with fewer resources. However, collecting and cleaning the data remains the "
    "most important and time-consuming step of the whole process."
)
BOILERPLATE = "© 2024 Xəbər.az. Bütün hüquqlar qorunur."


def read_corpus(out: Path) -> dict[str, list[dict]]:
    splits = {}
    for split in ("train", "val"):
        raw = zstandard.ZstdDecompressor().stream_reader(open(out / f"{split}.jsonl.zst", "rb"))
        text = io.TextIOWrapper(raw, encoding="utf-8")
        splits[split] = [json.loads(line) for line in text]
    return splits


def mixed_folder(tmp_path: Path) -> Path:
    src = tmp_path / "raw"
    src.mkdir()
    paragraphs = [AZ[0], TR[0], AZ[1] + "\n" + BOILERPLATE, RU, AZ[2], TR[1], EN]
    (src / "mixed.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    header = gzip.compress(b"x")[:10]
    (src / "broken.txt.gz").write_bytes(header + bytes(range(7, 250)) * 40)  # bad deflate data
    return src


def test_mixed_languages_are_dropped_and_reported(tmp_path):
    out = tmp_path / "corpus"
    report = build_corpus([mixed_folder(tmp_path)], out, workers=1, progress=False)
    texts = [r["text"] for split in read_corpus(out).values() for r in split]
    assert sorted(texts) == sorted(AZ)  # the boilerplate line left AZ[1] too
    assert report.removed_docs["language:tr"] == 2
    assert report.removed_docs["language:ru"] == 1
    assert report.removed_docs["language:en"] == 1
    assert report.removed_lines["boilerplate"] == 1
    assert report.skipped_file_count == 1
    assert report.skipped_files[0]["source"] == "raw/broken.txt.gz"
    assert report.skipped_files[0]["reason"].startswith("zlib.error: ")
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    stages = {s["stage"]: s["docs"] for s in saved["stages"]}
    assert stages["read"] == 7 and stages["language"] == 3 and stages["output"] == 3
    assert {r["reason"] for r in saved["removed"]} >= {"language:tr", "language:ru"}
    ex = next(r for r in saved["removed"] if r["reason"] == "language:ru")["examples"][0]
    assert ex["id"] == "raw/mixed.txt#3" and ex["text"].startswith("Москва")
    summary = report.summary()
    assert "language:tr" in summary and "broken.txt.gz" in summary
    for split in read_corpus(out).values():
        for r in split:
            assert r["source"] == "raw/mixed.txt" and r["id"].startswith("raw/mixed.txt#")


def many_docs(folder: Path, n: int, seed: int) -> None:
    sentences = [s.strip() + "." for p in AZ for s in p.split(".") if s.strip()]
    rng = random.Random(seed)
    docs = [" ".join(rng.sample(sentences, 5)) for _ in range(n)]
    half = n // 2
    (folder / "a.txt").write_text("\n\n".join(docs[:half]), encoding="utf-8")
    (folder / "b.jsonl").write_text(
        "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[half:]),
        encoding="utf-8",
    )


def test_output_is_deterministic_and_split_by_content(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    many_docs(src, 60, seed=1)
    runs = {}
    for name, workers in (("one", 1), ("two", 2)):
        build_corpus(
            [src],
            tmp_path / name,
            workers=workers,
            val_fraction=0.3,
            progress=False,
            batch_bytes=2000,
        )  # many small batches: results come back out of order
        runs[name] = {
            f: (tmp_path / name / f).read_bytes() for f in ("train.jsonl.zst", "val.jsonl.zst")
        }
    assert runs["one"] == runs["two"]  # same bytes whatever the number of workers
    first = read_corpus(tmp_path / "one")
    assert len(first["val"]) >= 5 and len(first["train"]) >= 20
    # inputs in the other order, alone: each text still lands in the same split
    build_corpus([src / "b.jsonl", src / "a.txt"], tmp_path / "swapped", workers=1,
                 val_fraction=0.3, dedup="none", progress=False)  # fmt: skip
    swapped = read_corpus(tmp_path / "swapped")
    for split in ("train", "val"):
        assert {r["text"] for r in first[split]} <= {r["text"] for r in swapped[split]}


@pytest.mark.parametrize("name", ["wikisource_classical_poems.txt", "fuzuli_divan_vol1.txt"])
def test_poetry_survives_the_filters(name):
    path = shared_path("data", "az", "pretrain", name)
    cfg = BuildConfig(dedup="none")
    _init_worker(cfg, in_child=False)
    files, _ = expand_inputs([path])
    docs = list(read_documents(files, ReaderOptions()))
    results = [process_document(d, cfg, None) for d in docs]
    removed = [(r.id, r.reason) for r in results if r.reason]
    assert len(removed) <= 0.01 * len(docs), removed  # one-line poems may go as too short
    assert not [r for r in removed if r[1].startswith(("language", "quality", "repetition:dup_l"))]


def test_bad_arguments_are_one_line_errors(tmp_path):
    (tmp_path / "a.txt").write_text(AZ[0], encoding="utf-8")
    with pytest.raises(AzllmError, match="no such file"):
        build_corpus([tmp_path / "missing"], tmp_path / "out", progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(AzllmError, match="not empty.*--force"):
        build_corpus([tmp_path / "a.txt"], tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "keep.txt").exists()
    with pytest.raises(AzllmError, match="--val-fraction"):
        build_corpus([tmp_path / "a.txt"], tmp_path / "o", val_fraction=1.5, progress=False)
    build_corpus([tmp_path / "a.txt"], tmp_path / "full", force=True, workers=1, progress=False)
    assert not (tmp_path / "full" / "keep.txt").exists()
    assert (tmp_path / "full" / "report.json").exists()
    # rebuilding with the output inside the input folder does not read the old output
    again = build_corpus([tmp_path], tmp_path / "full", force=True, workers=1, progress=False)
    assert set(again.sources) == {f"{tmp_path.name}/a.txt"}
    (tmp_path / "x.bin").write_bytes(bytes(range(256)) * 8)
    for args in (["--input", str(tmp_path / "nope")], ["--input", str(tmp_path / "x.bin")]):
        proc = subprocess.run(
            [sys.executable, "-m", "azllm.corpus", "build", *args, "--out", str(tmp_path / "o")],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_no_output(tmp_path, sig):
    rng = random.Random(0)
    vocab = [w.strip(".,:") for p in AZ for w in p.split()]
    work = tmp_path / "work"
    work.mkdir()
    with open(work / "big.txt", "w", encoding="utf-8") as f:
        for _ in range(4_000):  # several batches: the build is paused after the first
            f.write(" ".join(rng.choices(vocab, k=14)) + ".\n")
    out, paused = work / "out", tmp_path / "paused"
    proc = subprocess.Popen(
        [sys.executable, "-m", "azllm.corpus", "build", "--input", str(work / "big.txt"),
         "--out", str(out), "--workers", "2", "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "AZLLM_TEST_PAUSE": str(paused)},  # the build waits there for us
    )  # fmt: skip
    deadline = time.time() + 120
    while not paused.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    assert any(p.name.startswith(".out.") for p in work.iterdir())  # inside the build
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert not out.exists()
    assert sorted(p.name for p in work.iterdir()) == ["big.txt"]  # no temporary left
    assert "Traceback" not in err


def test_interrupting_a_forced_rebuild_keeps_the_old_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(AZ), encoding="utf-8")
    build_corpus([tmp_path / "a.txt"], tmp_path / "out", workers=1, progress=False)
    before = (tmp_path / "out" / "train.jsonl.zst").read_bytes()

    def docs_then_ctrl_c(*args, **kwargs):
        yield Document(AZ[0], "a.txt", "a.txt#0")
        raise KeyboardInterrupt

    import azllm.corpus.pipeline as pipeline

    real = pipeline.read_documents
    pipeline.read_documents = docs_then_ctrl_c
    try:
        with pytest.raises(KeyboardInterrupt):
            build_corpus([tmp_path / "a.txt"], tmp_path / "out", force=True, workers=1,
                         progress=False)  # fmt: skip
    finally:
        pipeline.read_documents = real
    assert (tmp_path / "out" / "train.jsonl.zst").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "out"]


def test_a_document_that_breaks_a_stage_is_counted_not_fatal(tmp_path, monkeypatch):
    import azllm.corpus.process as process

    (tmp_path / "a.txt").write_text("\n\n".join(AZ), encoding="utf-8")
    real = process.clean_text

    def flaky(text, **kw):
        if text.startswith("Novruz"):
            raise ValueError("extractor bug")
        return real(text, **kw)

    monkeypatch.setattr(process, "clean_text", flaky)
    report = build_corpus([tmp_path / "a.txt"], tmp_path / "out", workers=1, progress=False)
    assert report.removed_docs == {"error:ValueError: extractor bug": 1}
    texts = [r["text"] for split in read_corpus(tmp_path / "out").values() for r in split]
    assert sorted(texts) == sorted(AZ[:2])
