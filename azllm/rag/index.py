"""The retrieval index: a folder holding `index.json` (format, normalisation, chunking) and
`chunks.sqlite` (documents, chunks, and an SQLite FTS5 full-text index of their terms).

Building: `Index.create` writes the whole folder beside its final name and renames it into place
(azllm/atomic.py), so a crash leaves no half-built index. Adding: `Index.add` inserts into the
existing database in one SQLite transaction, so a kill mid-way leaves the index as it was (the
journal is rolled back on the next open); no chunk already indexed is touched, and a document
whose text is already in the index (same SHA-256) is skipped, so running `rag index` again on a
grown folder adds only the new files. FTS5 keeps its statistics (document count, lengths, term
frequencies) per insert, so BM25 scores after an add equal those of a fresh build.

The FTS5 table is contentless: it indexes the normalised terms (normalise.py) under the
chunk's id, and the chunk's text is stored once, in `chunks`. Terms are put in as space-separated
words that `unicode61 remove_diacritics 0` splits back unchanged (ş, ç, ö, ü, ğ, ə, ı are
letters of their own in Azerbaijani: folding them to s, c, o... would merge words).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from azllm.atomic import atomic_dir, atomic_write_text, writing
from azllm.errors import AzllmError
from azllm.rag.chunk import Chunking, chunk_text
from azllm.rag.normalise import Normalisation

FORMAT, VERSION = "azllm-rag-index", 1
META, DB = "index.json", "chunks.sqlite"
SCHEMA = """
CREATE TABLE docs(id INTEGER PRIMARY KEY, source TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
                  chars INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE chunks(id INTEGER PRIMARY KEY, doc INTEGER NOT NULL REFERENCES docs(id),
                    ord INTEGER NOT NULL, text TEXT NOT NULL);
CREATE VIRTUAL TABLE terms USING fts5(body, content='', tokenize='unicode61 remove_diacritics 0');
"""


@dataclass
class Hit:
    """One retrieved chunk: its BM25 score (higher is better), where it comes from and its text."""

    score: float
    source: str  # the file (and "#n" for the n-th record of a JSONL/Parquet file)
    chunk: int  # the chunk's position in its document, from 0
    text: str
    id: int  # the chunk's id in the index


@dataclass
class AddStats:
    docs: int = 0
    chunks: int = 0
    skipped: int = 0  # documents already in the index
    empty: int = 0  # documents with no text
    chars: int = 0


def _not_index(path: Path, why: str) -> AzllmError:
    return AzllmError(
        f"{path}: not an azllm RAG index ({why}); "
        f"build one with `azllm rag index DOCS --out {path}`"
    )


def query_expression(terms: Iterable[str]) -> str:
    """An FTS5 MATCH expression: any of the terms (each quoted, so no word is an operator)."""
    unique = dict.fromkeys(terms)
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in unique)


class Index:
    def __init__(self, path: Path, norm: Normalisation, chunking: Chunking, db: sqlite3.Connection):
        self.path, self.norm, self.chunking, self.db = path, norm, chunking, db
        self._lock = threading.Lock()  # the server searches from worker threads

    # ---- opening and creating -----------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> Index:
        """An existing index folder; a one-line AzllmError if it is not one."""
        path = Path(path)
        if not path.is_dir():
            what = "a file, not a folder" if path.exists() else "no such folder"
            raise _not_index(path, what)
        try:
            meta = json.loads((path / META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise _not_index(path, f"no {META} in it") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _not_index(path, f"{META} is unreadable: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _not_index(path, f"{META} does not say format {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise AzllmError(
                f"{path}: index version {meta.get('version')!r}, this azllm reads {VERSION}; "
                "build it again with `azllm rag index`"
            )
        if not (path / DB).is_file():
            raise _not_index(path, f"no {DB} in it")
        try:
            norm = Normalisation.from_dict(meta["normalisation"])
            chunking = Chunking(**meta["chunking"]).check()
            db = sqlite3.connect(path / DB, check_same_thread=False)
            db.execute("SELECT count(*) FROM chunks").fetchone()
        except (KeyError, TypeError) as e:
            raise _not_index(path, f"{META} lacks a field ({e})") from None
        except sqlite3.DatabaseError as e:
            raise _not_index(path, f"{DB}: {e}") from None
        return cls(path, norm, chunking, db)

    @classmethod
    def create(
        cls,
        path: str | Path,
        inputs: list[str | Path],
        norm: Normalisation = Normalisation(),  # noqa: B008 (frozen)
        chunking: Chunking = Chunking(),  # noqa: B008 (frozen)
        on_file: Callable[[str], None] | None = None,
    ) -> AddStats:
        """Build a new index folder at `path` from documents, atomically."""
        path = Path(path)
        norm, chunking = norm.check(), chunking.check()
        files = _input_files(inputs, path)  # bad inputs fail before anything is written
        with writing(path), atomic_dir(path) as tmp:
            db = sqlite3.connect(tmp / DB)
            db.executescript(SCHEMA)
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "engine": f"sqlite-fts5 {sqlite3.sqlite_version}",
                "normalisation": norm.to_dict(),
                "chunking": chunking.to_dict(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            atomic_write_text(tmp / META, json.dumps(meta, indent=2) + "\n")
            index = cls(tmp, norm, chunking, db)
            try:
                stats = index._add_files(files, on_file)
            finally:
                db.close()
        return stats

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- adding --------------------------------------------------------------------------------

    def add(self, inputs: list[str | Path], on_file: Callable[[str], None] | None = None):
        """Add documents in one transaction: all of them, or (killed, an error) none."""
        return self._add_files(_input_files(inputs, self.path), on_file)

    def _add_files(self, files, on_file) -> AddStats:
        stats = AddStats()
        try:
            with self.db:  # one transaction: committed at the end, rolled back on any exception
                for source, text in _documents(files, on_file):
                    self._add_document(source, text, stats)
        except sqlite3.OperationalError as e:  # disk full, read-only folder, locked
            raise AzllmError(f"{self.path / DB}: cannot write ({e}); nothing was added") from None
        return stats

    def _add_document(self, source: str, text: str, stats: AddStats) -> None:
        text = text.strip()
        if not text:
            stats.empty += 1
            return
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO docs(source, sha256, chars, added) VALUES (?, ?, ?, ?)",
            (source, digest, len(text), time.time()),
        )
        if cur.rowcount == 0:
            stats.skipped += 1
            return
        doc = cur.lastrowid
        for i, chunk in enumerate(chunk_text(text, self.chunking)):
            cid = self.db.execute(
                "INSERT INTO chunks(doc, ord, text) VALUES (?, ?, ?)", (doc, i, chunk)
            ).lastrowid
            body = " ".join(self.norm.terms(chunk))
            self.db.execute("INSERT INTO terms(rowid, body) VALUES (?, ?)", (cid, body))
            stats.chunks += 1
        stats.docs += 1
        stats.chars += len(text)

    # ---- reading -------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The k chunks with the highest BM25 score for the query's terms (any of them)."""
        if k < 1:
            raise AzllmError(f"-k {k}: must be at least 1")
        terms = self.norm.terms(query)
        if not terms:
            return []
        with self._lock:
            # the top k first (FTS5 sorts by its rank, bm25(), inside), then their chunks:
            # joining before the LIMIT looked up every match's chunk (1.5x slower at 8 MB)
            rows = self.db.execute(
                "SELECT t.rowid, t.rank, d.source, c.ord, c.text FROM "
                "(SELECT rowid, rank FROM terms WHERE terms MATCH ? ORDER BY rank LIMIT ?) t "
                "JOIN chunks c ON c.id = t.rowid JOIN docs d ON d.id = c.doc "
                "ORDER BY t.rank, t.rowid",
                (query_expression(terms), k),
            ).fetchall()
        return [Hit(-score, source, ord_, text, cid) for cid, score, source, ord_, text in rows]

    def stats(self) -> dict:
        docs, chars = self.db.execute(
            "SELECT count(*), coalesce(sum(chars), 0) FROM docs"
        ).fetchone()
        (chunks,) = self.db.execute("SELECT count(*) FROM chunks").fetchone()
        return {"documents": docs, "chunks": chunks, "chars": chars}


# ---- reading documents with the corpus readers ------------------------------------------------


def _input_files(inputs: list[str | Path], out: Path):
    from azllm.corpus.readers import expand_inputs

    if not inputs:
        raise AzllmError("no documents given: azllm rag index FILE_OR_FOLDER... --out INDEX")
    files, skipped = expand_inputs(list(inputs), exclude=out)
    for source, reason in skipped:
        print(f"azllm: skipping {source} ({reason})")
    if not files:
        raise AzllmError(f"{', '.join(map(str, inputs))}: no documents to index")
    return files


def _documents(files, on_file) -> Iterator[tuple[str, str]]:
    """(source, text) of every document: a text or HTML file is one document, a JSONL/Parquet
    record another ("file.jsonl#3"). HTML, wikitext and WARC go through the corpus extractors."""
    from azllm.corpus.readers import ReaderOptions, describe_error, iter_file

    opts = ReaderOptions(text_unit="file")
    for inp in files:
        if on_file is not None:
            on_file(inp.source)
        try:
            for doc in iter_file(inp, opts):
                text = doc.text
                if doc.kind != "text":
                    text = _extract(doc.kind, text)
                yield (doc.source if inp.fmt in ("text", "html") else doc.id), text
        except (AzllmError, KeyboardInterrupt, GeneratorExit):
            raise
        except Exception as e:  # a corrupt archive, a truncated file
            raise AzllmError(
                f"{inp.path}: cannot read ({describe_error(e)}); nothing was added"
            ) from None


def _extract(kind: str, raw: str) -> str:
    from azllm.errors import require

    needs = ["mwparserfromhell"] if kind == "wikitext" else ["trafilatura", "lxml_html_clean"]
    require("corpus", f"azllm rag index on {kind} documents", needs)
    if kind == "wikitext":
        from azllm.corpus.wiki import wikitext_to_text

        return wikitext_to_text(raw)
    from azllm.corpus.process import html_to_text

    return html_to_text(raw)
