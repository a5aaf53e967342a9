"""Retrieval: index build speed, query speed and peak memory of SQLite FTS5 (what azllm uses)
and bm25s on a generated Azerbaijani-like corpus; recall@k of each normalisation choice, and of
both engines, on the bundled question set (azllm/data/rag).

    python bench/rag_speed.py                  # 8 MB corpus (about a minute on 2 busy cores)
    python bench/rag_speed.py --mb 100         # the 100 MB figure of issue 15
    python bench/rag_speed.py --skip-speed     # recall only
    python bench/rag_speed.py --skip-speed --qa-run RUN [--chat]   # + answers' EM/F1

Corpus: files of ~1 MB of sentences drawn word by word from the word frequencies of the bundled
sample texts (azllm/data/sample), so word lengths, letters and the Zipf curve are Azerbaijani.
Each engine is timed in its own child process (its peak RSS from getrusage is then its own):
- fts5: `Index.create` on the folder (reading, chunking, normalising, inserting; one
  transaction), then queries through `Index.search` (terms OR-ed, BM25, top 5);
- bm25s: the same chunks and normalised terms (the same Python code as fts5, timed apart),
  then `bm25s.BM25().index` and `retrieve` in batches (bm25s's intended use) and one by one
  (what a server does).
MB/s = megabytes of input text / wall seconds; queries/s over 300 queries of 2-6 words drawn
from the corpus vocabulary. The recall rows index the 20 bundled documents plus the 16 bundled
sample texts as distractors in 200-character chunks, and ask each of the 43 questions as
written and in capitals (Azerbaijani upper case: i→İ, ı→I), which Python's lower() undoes wrong.
With --qa-run, the 43 questions are answered by that run through the evaluation harness
(greedy, exact match and token F1), without and with the top --qa-k chunks of the bundled
documents (200-character chunks) in the prompt: azllm.rag.evaluate.qa_scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from azllm.rag.chunk import Chunking, chunk_text  # noqa: E402
from azllm.rag.evaluate import BUNDLED, recall_at_k  # noqa: E402
from azllm.rag.index import Index  # noqa: E402
from azllm.rag.normalise import Normalisation, az_lower  # noqa: E402

SAMPLE = REPO / "azllm" / "data" / "sample"
HAVE_BM25S = importlib.util.find_spec("bm25s") is not None  # the comparison only: azllm uses FTS5
N_QUERIES = 300


def az_upper(text: str) -> str:
    return text.replace("i", "İ").replace("ı", "I").upper()


def make_corpus(folder: Path, mb: float, seed: int = 0) -> list[str]:
    """~mb MB of generated text in 1 MB files under folder; returns the vocabulary."""
    words = Counter(w for f in sorted(SAMPLE.glob("*.txt")) for w in f.read_text().split())
    vocab, weights = list(words), list(words.values())
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total, n = int(mb * 1e6), 0
    while n * 1_000_000 < total:
        path = folder / f"doc_{n:04d}.txt"
        if not path.exists():
            paras, size = [], 0
            while size < 1_000_000:
                sents = []
                for _ in range(rng.randint(3, 8)):
                    s = rng.choices(vocab, weights, k=rng.randint(6, 20))
                    sents.append(s[0][:1].upper() + " ".join(s)[1:].rstrip(".,") + ".")
                paras.append(" ".join(sents))
                size += len(paras[-1].encode()) + 2
            path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
        n += 1
    return [w.strip(".,!?:;\"'()«»") for w in vocab if len(w) > 3]


def queries(vocab: list[str], seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(vocab, rng.randint(2, 6))) for _ in range(N_QUERIES)]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_fts5(corpus: Path, qs: list[str]) -> dict:
    mb = sum(f.stat().st_size for f in corpus.glob("*.txt")) / 1e6
    out = Path(tempfile.mkdtemp()) / "index"
    t0 = time.perf_counter()
    Index.create(out, [corpus])
    build = time.perf_counter() - t0
    with Index.open(out) as ix:
        t0 = time.perf_counter()
        for q in qs:
            ix.search(q, 5)
        qtime = time.perf_counter() - t0
        chunks = ix.stats()["chunks"]
    extra = corpus.parent / "extra.txt"  # one more 1 MB file: added, not rebuilt
    extra.write_text((corpus / "doc_0000.txt").read_text().replace("a", "ə"), encoding="utf-8")
    t0 = time.perf_counter()
    with Index.open(out) as ix:
        ix.add([extra])
    add = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    return {
        "engine": "sqlite-fts5",
        "mb": round(mb, 1),
        "chunks": chunks,
        "build_mb_s": round(mb / build, 2),
        "queries_s": round(len(qs) / qtime, 1),
        "add_1mb_s": round(add, 2),
        "index_mb": round(size, 1),
        "peak_rss_mb": round(peak_mb()),
    }


def run_bm25s(corpus: Path, qs: list[str]) -> dict:
    import bm25s

    norm, chunking = Normalisation(), Chunking()
    files = sorted(corpus.glob("*.txt"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    t0 = time.perf_counter()
    tokens = [norm.terms(c) for f in files for c in chunk_text(f.read_text(), chunking)]
    prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    build = time.perf_counter() - t0
    vocab = retriever.vocab_dict
    qtok = [[t for t in norm.terms(q) if t in vocab] or [next(iter(vocab))] for q in qs]
    t0 = time.perf_counter()
    retriever.retrieve(qtok, k=5, show_progress=False, n_threads=1)
    batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in qtok[:100]:
        retriever.retrieve([q], k=5, show_progress=False, n_threads=1)
    single = (time.perf_counter() - t0) / 100
    return {
        "engine": "bm25s",
        "mb": round(mb, 1),
        "chunks": len(tokens),
        "build_mb_s": round(mb / (prep + build), 2),
        "build_mb_s_index_only": round(mb / build, 2),
        "queries_s": round(1 / single, 1),
        "queries_s_batched": round(len(qs) / batch, 1),
        "add_1mb_s": "rebuild",
        "peak_rss_mb": round(peak_mb()),
    }


def recall_rows() -> list[dict]:
    qs = [json.loads(line) for line in (BUNDLED / "questions.jsonl").open(encoding="utf-8")]
    caps = [dict(q, question=az_upper(q["question"])) for q in qs]
    choices = {
        "python lower()": Normalisation("python", apostrophes=False, stem=False),
        "az casing": Normalisation("az", apostrophes=False, stem=False),
        "az + apostrophes": Normalisation("az", apostrophes=True, stem=False),
        "az + apostrophes + stem (default)": Normalisation("az", apostrophes=True, stem=True),
    }
    rows = []
    for name, norm in choices.items():
        out = Path(tempfile.mkdtemp()) / "index"
        Index.create(out, [BUNDLED / "docs", SAMPLE], norm, Chunking(200, 60))
        with Index.open(out) as ix:
            rows.append(
                {"normalisation": name, "asked": recall_at_k(ix, qs), "caps": recall_at_k(ix, caps)}
            )
    if HAVE_BM25S:
        rows.append(bm25s_recall(qs, caps))
    return rows


def bm25s_recall(qs, caps) -> dict:
    """bm25s on the default normalisation and the same chunks, scored like recall_at_k."""
    import bm25s

    norm, chunks = Normalisation(), []
    for f in sorted((BUNDLED / "docs").glob("*.txt")) + sorted(SAMPLE.glob("*.txt")):
        chunks += [(f.name, c) for c in chunk_text(f.read_text(), Chunking(200, 60))]
    r = bm25s.BM25()
    r.index([norm.terms(c) for _, c in chunks], show_progress=False)

    def recall(questions):
        found = {1: 0, 3: 0, 5: 0}
        for q in questions:
            terms = [t for t in norm.terms(q["question"]) if t in r.vocab_dict]
            docs, _ = r.retrieve([terms], k=5, show_progress=False)
            answers = [az_lower(a) for a in q["answers"]]
            rank = next(
                (i for i, d in enumerate(docs[0]) if chunks[d][0] == q["source"]
                 and any(a in az_lower(chunks[d][1]) for a in answers)),
                None,
            )  # fmt: skip
            for k in found:
                found[k] += rank is not None and rank < k
        return {k: v / len(questions) for k, v in found.items()}

    return {"normalisation": "default, bm25s engine", "asked": recall(qs), "caps": recall(caps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="generated corpus size (100: the issue)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "azllm-rag-bench"))
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--qa-run", help="also score this run's answers with and without retrieval")
    ap.add_argument("--qa-k", type=int, default=2, help="chunks in the prompt for --qa-run")
    ap.add_argument("--chat", action="store_true", help="--qa-run is a chat (SFT) model")
    ap.add_argument("--engine", choices=["fts5", "bm25s"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    corpus = Path(args.work) / f"corpus-{args.mb:g}mb"
    if args.engine:  # a child: one engine, its own peak RSS
        vocab = make_corpus(corpus, args.mb)
        run = run_fts5 if args.engine == "fts5" else run_bm25s
        print(json.dumps(run(corpus, queries(vocab))))
        return
    if not args.skip_speed:
        make_corpus(corpus, args.mb)
        if not HAVE_BM25S:
            print("(bm25s not installed: pip install bm25s; only fts5 is measured)")
        for engine in ("fts5", "bm25s") if HAVE_BM25S else ("fts5",):
            cmd = [sys.executable, __file__, "--engine", engine, "--mb", str(args.mb)]
            out = subprocess.run(cmd + ["--work", args.work], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            print(out.stdout.strip().splitlines()[-1], flush=True)
    print("recall@k (k=1, 3, 5) on azllm/data/rag, 43 questions; as asked | in capitals")
    for row in recall_rows():
        a, c = row["asked"], row["caps"]
        print(
            f"  {row['normalisation']:<36} "
            + " ".join(f"{a[k]:.2f}" for k in (1, 3, 5))
            + "  |  "
            + " ".join(f"{c[k]:.2f}" for k in (1, 3, 5))
        )
    if args.qa_run:
        qa(Path(args.qa_run), args.qa_k, args.chat)


def qa(run: Path, k: int, chat: bool) -> None:
    from azllm.evaluate.backends import RunBackend
    from azllm.evaluate.tasks import load_tasks
    from azllm.rag.evaluate import qa_scores

    backend = RunBackend.from_run(run, "cpu", "model", "fp32")
    (task,) = load_tasks(str(BUNDLED / "questions.jsonl"))
    out = Path(tempfile.mkdtemp()) / "index"
    Index.create(out, [BUNDLED / "docs"], chunking=Chunking(200, 50))
    form = "chat" if chat else "base"
    print(f"answers of {run} ({form} form, context {backend.block_size}), {len(task.test)} q")
    with Index.open(out) as ix:
        for name, index in (("no retrieval", None), (f"top {k} chunks", ix)):
            r = qa_scores(backend, task, index, k=k, chat=chat)
            print(f"  {name:<14} exact match {r['exact_match']:.3f}  F1 {r['f1']:.3f}  "
                  f"e.g. {r['examples'][:2]}")  # fmt: skip


if __name__ == "__main__":
    main()
