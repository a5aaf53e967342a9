"""Retrieval (azllm/rag): Azerbaijani normalisation, sentence chunks, the index folder (built
atomically, added to without a rebuild), search through the real CLI, and the prompt with
sources (only the last user message is searched; the sources are trimmed to the budget)."""

import json
import sqlite3
import subprocess
import sys

import pytest
from chat_fixtures import REPO

from azllm.errors import AzllmError
from azllm.rag.chunk import Chunking, chunk_text, sentences
from azllm.rag.index import DB, META, Index
from azllm.rag.normalise import Normalisation, az_lower
from azllm.rag.prompt import add_sources, last_user_text, retrieve, system_text

DOCS = {
    "ismayilli.txt": "İsmayıllı rayonu meşələri ilə məşhurdur. "
    "Rayonun mərkəzi dağların ətəyindədir. Lahıc kəndi misgərlik sənəti ilə tanınır.",
    "baki.txt": "Bakı Xəzər dənizinin sahilində yerləşir. Şəhərdə metro 1967-ci ildə açılıb.",
    "quba.txt": "Quba alma bağları ilə məşhurdur. Qırmızı Qəsəbə Qudyalçayın sahilindədir.",
    "ismail.txt": "İsmail adlı oğlan məktəbdə riyaziyyatı sevir. O, hər gün kitab oxuyur.",
}


def cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "azllm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text + "\n", encoding="utf-8")
    return folder


def test_az_lower_gets_both_is_right_where_str_lower_does_not():
    assert az_lower("İSMAYILLI") == az_lower("ismayıllı") == "ismayıllı"
    assert az_lower("BAKI") == "bakı" and az_lower("Bakı") == "bakı"
    assert "İSMAYILLI".lower() != "ismayıllı" and "BAKI".lower() == "baki"  # Python's lower()
    assert az_lower("I\u0307stanbul") == "istanbul"  # decomposed İ, joined by NFC first
    norm = Normalisation(stem=False)
    assert norm.terms("Bakı'nın küçələri, Bakı’da") == ["bakı", "küçələri", "bakı"]
    assert Normalisation().terms("şəhərlərində şəhərə ŞƏHƏRİ") == ["şəhər"] * 3


# Correct Azerbaijani capitals: i <-> İ and ı <-> I. "LAHIC" (from Lahıc) has a dotless I that
# str.lower() turns into i, "İSMAYILLI" has both; each must find the same chunk as lower case.
@pytest.mark.parametrize(
    "query", ["İSMAYILLI", "ismayıllı", "İsmayıllı", "İSMAYILLININ", "LAHIC KƏNDİ", "lahıc"]
)
def test_dotted_and_dotless_i_in_either_case_find_the_chunk(docs, tmp_path, query):
    Index.create(tmp_path / "idx", [docs])
    with Index.open(tmp_path / "idx") as ix:
        hits = ix.search(query, 2)
    assert hits and hits[0].source.endswith("ismayilli.txt"), hits
    assert "İsmayıllı rayonu" in hits[0].text


def test_python_lower_would_miss_the_capitalised_query(docs, tmp_path):
    Index.create(tmp_path / "py", [docs], Normalisation(casing="python", stem=False))
    with Index.open(tmp_path / "py") as ix:
        # "LAHIC".lower() is "lahic", not "lahıc" (its İ mistakes, i + a combining dot, happen
        # to split off a lone "i" that still matches: the capitals-recall figure counts both)
        assert not any(h.source.endswith("ismayilli.txt") for h in ix.search("LAHIC", 4))


def test_chunks_are_whole_sentences_that_overlap():
    text = " ".join(f"Bu {i}-ci cümlədir və burada bir az söz var." for i in range(1, 40))
    text += " H. Əliyev adına küçə və s. yerlər də var. Son cümlə!"
    sents = sentences(text)
    assert "H. Əliyev adına küçə və s. yerlər də var." in sents  # initials, abbreviations
    cfg = Chunking(size=200, overlap=60)
    chunks = chunk_text(text, cfg)
    assert len(chunks) > 5
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert len(a) <= cfg.size
        assert a.endswith((".", "!")) and sents.index(b.split(". ")[0] + ".") >= 0
        first_of_b = next(s for s in sents if b.startswith(s))
        assert first_of_b in a  # b starts with a sentence that a ended with: the overlap
    assert set(sents) <= {s for c in chunks for s in sentences(c)}  # nothing lost
    assert chunk_text("söz " * 400, cfg)[0].count(" ") < 60  # one long "sentence" is cut


def test_add_appends_without_touching_what_is_indexed(docs, tmp_path):
    idx, extra = tmp_path / "idx", tmp_path / "extra"
    extra.mkdir()
    (extra / "seki.txt").write_text("Şəki xan sarayı şəbəkə ilə bəzədilib.\n", encoding="utf-8")
    Index.create(idx, [docs])
    db = sqlite3.connect(idx / DB)
    before = db.execute("SELECT id, doc, ord, text FROM chunks ORDER BY id").fetchall()
    db.close()
    with Index.open(idx) as ix:
        stats = ix.add([extra, docs])  # the old files again: skipped by their content
        assert (stats.docs, stats.skipped) == (1, len(DOCS))
        hits = ix.search("şəbəkə sarayı", 1)
        scores = {h.id: h.score for h in ix.search("məşhurdur sahilində", 5)}
    assert hits[0].source.endswith("seki.txt")
    db = sqlite3.connect(idx / DB)
    after = db.execute("SELECT id, doc, ord, text FROM chunks ORDER BY id").fetchall()
    db.close()
    assert after[: len(before)] == before and len(after) == len(before) + 1
    # BM25 statistics after the add equal a fresh build's over the same documents
    Index.create(tmp_path / "fresh", [docs, extra])
    with Index.open(tmp_path / "fresh") as ix:
        fresh = {h.text: h.score for h in ix.search("məşhurdur sahilində", 5)}
    with Index.open(idx) as ix:
        added = {h.text: h.score for h in ix.search("məşhurdur sahilində", 5)}
    assert added == pytest.approx(fresh, rel=1e-9) and len(scores) == len(fresh)


def test_a_failed_add_leaves_the_index_as_it_was(docs, tmp_path, monkeypatch):
    Index.create(tmp_path / "idx", [docs])
    extra = tmp_path / "more"
    extra.mkdir()
    for i in range(3):
        (extra / f"{i}.txt").write_text(f"Yeni sənəd nömrə {i} burada.\n", encoding="utf-8")
    real, calls = Index._add_document, []

    def dies_on_the_third(self, source, text, stats):
        calls.append(source)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C half way through
        real(self, source, text, stats)

    monkeypatch.setattr(Index, "_add_document", dies_on_the_third)
    with Index.open(tmp_path / "idx") as ix, pytest.raises(KeyboardInterrupt):
        ix.add([extra])
    monkeypatch.undo()
    with Index.open(tmp_path / "idx") as ix:
        assert ix.stats()["documents"] == len(DOCS) and not ix.search("sənəd nömrə", 3)
    # a build that fails leaves no folder at all
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(Index, "_add_document", dies_on_the_third)
        calls.clear()
        Index.create(tmp_path / "new", [docs])
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))


def test_cli_index_search_and_add(docs, tmp_path):
    idx = tmp_path / "idx"
    out = cli("rag", "index", docs / "baki.txt", "--out", idx, "--chunk-chars", "120").stdout
    assert "+1 documents" in out and (idx / META).is_file()
    out = cli("rag", "index", docs, "--out", idx).stdout  # adds the rest
    assert f"+{len(DOCS) - 1} documents" in out and "1 already indexed" in out
    out = cli("rag", "search", idx, "İSMAYILLI", "-k", "2").stdout
    assert out.startswith("[1] score ") and "ismayilli.txt (chunk 0)" in out.splitlines()[0]
    rows = [json.loads(x) for x in cli("rag", "search", idx, "QUBA", "--json").stdout.splitlines()]
    assert rows[0]["source"].endswith("quba.txt") and rows[0]["score"] > 0
    bad = cli("rag", "index", docs, "--out", idx, "--chunk-chars", "300", check=False)
    assert bad.returncode == 2 and "keeps the chunking" in bad.stderr


def test_a_folder_that_is_not_an_index_is_one_line(tmp_path):
    kinds = {k: tmp_path / k for k in ("missing", "file", "folder", "garbage", "future")}
    kinds["file"].write_text("x")
    kinds["folder"].mkdir()
    (kinds["folder"] / "notes.txt").write_text("x")
    for name in ("garbage", "future"):
        kinds[name].mkdir()
        meta = {"format": "azllm-rag-index", "version": 1 if name == "garbage" else 99,
                "normalisation": {}, "chunking": {}}  # fmt: skip
        (kinds[name] / META).write_text(json.dumps(meta))
        (kinds[name] / DB).write_bytes(b"not a database at all" * 100)
    for name, path in kinds.items():
        with pytest.raises(AzllmError) as e:
            Index.open(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
        assert ("version 99" if name == "future" else "not an azllm RAG index") in str(e.value)
    proc = cli("rag", "search", kinds["folder"], "sual", check=False)  # the real command
    assert proc.returncode == 2 and proc.stdout == ""
    assert (
        proc.stderr.strip() == f"azllm: error: {kinds['folder']}: not an azllm RAG index "
        f"(no index.json in it); build one with `azllm rag index DOCS --out {kinds['folder']}`"
    )


def test_bad_index_fails_chat_and_serve_before_the_model_loads(tmp_path):
    for cmd in ("chat", "serve"):
        proc = cli(cmd, "--run", tmp_path / "no-run", "--rag", tmp_path, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        assert "not an azllm RAG index" in proc.stderr, proc.stderr


def test_only_the_last_user_message_is_searched(docs, tmp_path, tok):
    Index.create(tmp_path / "idx", [docs])
    messages = [
        {"role": "system", "content": "Quba Quba Quba alma"},
        {"role": "user", "content": "Bakı metrosu"},
        {"role": "assistant", "content": "Quba alma bağları"},
        {"role": "user", "content": "İsmayıllı meşələri"},
    ]
    assert last_user_text(messages) == "İsmayıllı meşələri"
    with Index.open(tmp_path / "idx") as ix:
        hits = retrieve(ix, messages, 4)
        assert hits and all(not h.source.endswith(("quba.txt", "baki.txt")) for h in hits)
        assert retrieve(ix, messages[:1], 4) == []  # no user message: nothing searched
        new, used = add_sources(tok, messages, hits, 10_000)
    assert [m["role"] for m in new] == ["system", "user", "assistant", "user"]
    assert new[0]["content"].startswith("Quba Quba Quba alma\n\n")  # the user's system first
    assert new[0]["content"] == system_text("Quba Quba Quba alma", used)
    assert "[1] (docs/ismayilli.txt) İsmayıllı rayonu" in new[0]["content"]
    assert new[1:] == messages[1:]


def test_sources_are_trimmed_to_the_budget(docs, tmp_path, tok):
    Index.create(tmp_path / "idx", [docs])
    messages = [{"role": "user", "content": "məşhurdur sahilində kitab"}]
    with Index.open(tmp_path / "idx") as ix:
        hits = ix.search(messages[0]["content"], 4)
    assert len(hits) >= 3

    def length(msgs):
        return len(tok.encode_chat(msgs, add_generation_prompt=True)[0])

    alone = length(messages)
    sizes = []
    for budget in (alone + 5, alone + 80, alone + 160, alone + 100_000):
        new, used = add_sources(tok, messages, hits, budget)
        assert length(new) <= budget or not used
        sizes.append(len(used))
        if used and budget < alone + 100_000:
            assert used[-1].text.endswith(" …") or len(used) < len(hits)
    assert sizes[0] == 0 and sizes == sorted(sizes) and sizes[-1] == len(hits)
    # a question longer than the whole budget gets no sources (the caller's context check
    # then reports it as too long)
    long = [{"role": "user", "content": "İsmayıllı " * 400}]
    assert add_sources(tok, long, hits, 100) == (long, [])


def test_jsonl_parquet_and_html_documents_are_read_by_the_corpus_readers(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = tmp_path / "mixed"
    folder.mkdir()
    rows = ["Naxçıvan duz mağarası ilə tanınır.", "Gəncədə Nizami məqbərəsi var."]
    (folder / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8"
    )
    pq.write_table(pa.table({"text": ["Şuşa Qarabağın tacıdır."]}), folder / "b.parquet")
    (folder / "c.html").write_text(
        "<html><body><nav>Menyu</nav><article><h1>Göygöl</h1><p>Göygöl Kəpəz dağının ətəyində "
        "yerləşən gözəl bir göldür. Gölün suyu çox təmizdir və turistlər onu çox sevir. "
        "Göl 1139-cu ildə zəlzələ nəticəsində yaranıb.</p></article></body></html>",
        encoding="utf-8",
    )
    Index.create(tmp_path / "idx", [folder])
    with Index.open(tmp_path / "idx") as ix:
        assert ix.stats()["documents"] == 4
        assert ix.search("NAXÇIVAN", 1)[0].source == "mixed/a.jsonl#0"
        assert ix.search("Gəncə", 1)[0].source == "mixed/a.jsonl#1"
        assert ix.search("şuşa", 1)[0].source == "mixed/b.parquet#0"
        hit = ix.search("Göygöl zəlzələ", 1)[0]
    assert hit.source == "mixed/c.html" and "<p>" not in hit.text and "Menyu" not in hit.text


def test_qa_through_the_harness_with_and_without_sources(tokenizer_path, tmp_path):
    import dataclasses

    from chat_fixtures import make_run

    from azllm.evaluate.backends import RunBackend
    from azllm.evaluate.tasks import load_tasks
    from azllm.rag.evaluate import BUNDLED, RagBackend, qa_scores, recall_at_k, with_passages

    run = make_run(tokenizer_path, tmp_path / "run", block_size=256)
    backend = RunBackend.from_run(run, "cpu", "model", "fp32")
    (task,) = load_tasks(str(BUNDLED / "questions.jsonl"))
    assert task.kind == "qa" and len(task.test) >= 30
    task = dataclasses.replace(task, test=task.test[:3])
    Index.create(tmp_path / "idx", [BUNDLED / "docs"], chunking=Chunking(200, 50))
    with Index.open(tmp_path / "idx") as ix:
        questions = [json.loads(x) for x in (BUNDLED / "questions.jsonl").open(encoding="utf-8")]
        assert recall_at_k(ix, questions, (5,))[5] >= 0.9  # measured 1.00 (bench/rag_speed.py)
        rag = RagBackend(backend, ix, 2, 24)
        msgs = [{"role": "user", "content": task.test[0].question}]
        ids = rag.chat_ids(msgs)
        assert len(ids) > len(backend.chat_ids(msgs)) and len(ids) <= 256 - 24
        assert "Mənbələr:" in backend.decode(ids) and "İsmayıllı" in backend.decode(ids)
        assert "İsmayıllı" in with_passages(task, ix, 1).test[0].passage
        for index in (None, ix):
            for chat in (False, True):
                scores = qa_scores(backend, task, index, k=2, chat=chat)
                assert scores["n"] == 3 and 0 <= scores["f1"] <= 1  # a random model: ~0
