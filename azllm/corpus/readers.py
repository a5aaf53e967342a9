"""Readers: files and folders in, a stream of `Document(text, source, id)` out.

Formats, chosen by extension, else by sniffing the first bytes:
- plain text (`.txt`, `.md`, anything that decodes as UTF-8): see `text_unit` below;
- JSON Lines (`.jsonl`, `.ndjson`, a `.json` starting with `{`) and JSON arrays of objects (a
  `.json` starting with `[`, streamed): the text is in `text_field` (default "text", dotted
  paths such as "meta.body" reach into nested objects) — this is how Hugging Face datasets
  saved with `to_json`/`to_parquet` come in;
- Parquet (`.parquet`), read one row group batch at a time, column `text_field`;
- MediaWiki XML dumps (`.xml`, e.g. `azwiki-latest-pages-articles.xml.bz2`), one document per
  article (namespace 0, redirects skipped); the wikitext is turned into text by the workers;
- HTML (`.html`, `.htm`) and WARC/WET (`.warc`, `.wet`): one document per page, main text
  extracted by trafilatura in the workers;
- any of these compressed with gzip, bz2, xz or zstd (by extension or magic bytes);
- folders, recursively, in sorted order (hidden files skipped).

`text_unit` for plain text:
- "block" (default): a document per blank-line-separated block, and a block longer than
  `max_doc_chars` is cut at line boundaries. A file with no blank lines at all (a sentence or a
  verse per line) therefore becomes chunks of consecutive lines of about `max_doc_chars`. We
  prefer that to one document per line: a single line is too short for language ID and quality
  rules to judge (poetry lines get called Turkish, sentences fail length rules), and it keeps
  the context a model learns from. Deduplication works on lines and blocks inside documents,
  so where the chunk boundaries fall does not matter for it. The cut also bounds memory.
- "line": a document per non-empty line. "file": the whole file is one document.

A file that cannot be read (corrupt archive, bad permissions, not the format it claims) is
reported through `on_error(source, reason)` and skipped; the documents it yielded before the
failure are kept. Records without a usable text field go to `on_bad_record`.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from azllm.errors import AzllmError

from .formats import UnknownFormat, detect_format, open_binary

MAX_LINE_CHARS = 1 << 20  # a longer "line" is read in pieces, so memory stays bounded
# A JSON Lines record longer than this is skipped while it streams by (a bad record), never
# held whole: a 50 MB line used to cost 38 s and 3.3 GB before the document was dropped as
# too long. 16 M characters is above what passes the length filter (max_words 200,000).
MAX_RECORD_CHARS = 16 << 20
MAX_HTML_BYTES = 32 << 20


@dataclass(slots=True)
class Document:
    text: str
    source: str
    id: str
    kind: str = "text"  # "text", or "wikitext"/"html" still to be turned into text


@dataclass(frozen=True)
class InputFile:
    path: Path
    source: str  # the name written to the corpus: path relative to the inputs' common folder
    fmt: str
    compression: str | None
    size: int


@dataclass(frozen=True)
class ReaderOptions:
    text_field: str = "text"
    text_unit: str = "block"  # block | line | file
    max_doc_chars: int = 5000
    wiki_namespaces: tuple[int, ...] = (0,)


def describe_error(e: BaseException) -> str:
    """`zlib.error: Error -3 while decompressing data: invalid block type`, at most 300 chars."""
    kind = type(e).__qualname__
    if type(e).__module__ not in ("builtins", "__main__"):
        kind = f"{type(e).__module__}.{kind}"
    return f"{kind}: {e}"[:300]


def _field(record, field: str):
    for part in field.split("."):
        if not isinstance(record, dict):
            return None
        record = record.get(part)
    return record


def _check_text_field(inp: InputFile, field: str) -> None:
    """Fail early (before hours of work) when the text field does not exist in the file."""
    if inp.fmt == "parquet":
        import pyarrow.parquet as pq

        names = pq.ParquetFile(inp.path).schema_arrow.names
        if field.split(".")[0] not in names:
            raise AzllmError(
                f"{inp.path}: no column {field!r} (columns: {', '.join(names)}); "
                "pick one with --text-field"
            )
        return
    with open_binary(inp.path, inp.compression) as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace")
        first = next(_iter_records(text, inp.fmt, strict=False), None)
    if isinstance(first, dict) and not isinstance(_field(first, field), str):
        keys = ", ".join(list(first)[:12])
        raise AzllmError(
            f"{inp.path}: first record has no text field {field!r} (fields: {keys}); "
            "pick one with --text-field"
        )


def expand_inputs(
    inputs: list[str | Path], *, text_field: str = "text", exclude: Path | None = None
) -> tuple[list[InputFile], list[tuple[str, str]]]:
    """The files to read, in a stable order, and (name, reason) of files found but skipped.

    Missing paths and named files of an unknown format are the user's mistake: AzllmError.
    Inside folders, files of unknown format are skipped (and reported), not fatal. Files
    below `exclude` (the output folder, when it sits inside an input folder) are left out.
    """
    exclude = exclude.resolve() if exclude is not None else None
    if not inputs:
        raise AzllmError("no input given; pass --input FILE_OR_FOLDER")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise AzllmError(f"{p}: no such file or folder (check --input)")
    base = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    files: list[InputFile] = []
    skipped: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for p in paths:
        named = not p.is_dir()
        found = [p] if named else sorted(
            f for f in p.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )  # fmt: skip
        for f in found:
            real = f.resolve()
            if real in seen or (exclude is not None and real.is_relative_to(exclude)):
                continue
            seen.add(real)
            source = real.relative_to(base).as_posix() if real.is_relative_to(base) else str(f)
            try:
                fmt, compression = detect_format(f)
            except UnknownFormat as e:
                if named:
                    raise AzllmError(
                        f"{f}: unknown format ({e}); supported: text, JSONL/JSON, Parquet, "
                        "MediaWiki XML, HTML, WARC, optionally .gz/.bz2/.xz/.zst"
                    ) from None
                skipped.append((source, f"unsupported format: {e}"))
                continue
            except Exception as e:  # a corrupt archive we could not even peek into
                skipped.append((source, describe_error(e)))
                continue
            inp = InputFile(real, source, fmt, compression, f.stat().st_size)
            if fmt in ("jsonl", "json", "parquet"):
                try:
                    _check_text_field(inp, text_field)
                except AzllmError:
                    raise
                except Exception:
                    pass  # unreadable: reported when the file is read
            files.append(inp)
    if not files and not skipped:
        raise AzllmError(f"no files found in {', '.join(map(str, paths))}")
    return files, skipped


# --- format readers -------------------------------------------------------------------------


def _lines(text: IO[str]) -> Iterator[str]:
    return iter(lambda: text.readline(MAX_LINE_CHARS), "")


def _text_docs(text: IO[str], unit: str, max_chars: int) -> Iterator[str]:
    if unit == "file":
        whole = "\n".join(ln.rstrip() for ln in _lines(text)).strip()
        if whole:
            yield whole
        return
    if unit == "line":
        for ln in _lines(text):
            if ln.strip():
                yield ln.strip()
        return
    yield from text_blocks(_lines(text), max_chars)


def text_blocks(lines: Iterable[str], max_chars: int) -> Iterator[str]:
    """Plain text's documents (the one rule, for `corpus build` and `azllm tokenize` alike):
    blank-line blocks, a block cut at the first line break past max_chars characters, so a file
    without blank lines is running text with its line breaks, in chunks."""
    block: list[str] = []
    size = 0
    for ln in lines:
        ln = ln.rstrip()
        if not ln.strip():
            if block:
                yield "\n".join(block)
                block, size = [], 0
            continue
        if block and size + len(ln) > max_chars:
            yield "\n".join(block)
            block, size = [], 0
        block.append(ln)
        size += len(ln) + 1
    if block:
        yield "\n".join(block)


_WS_COMMA = re.compile(r"[\s,]*")


def _iter_json_array(text: IO[str]) -> Iterator[object]:
    """Objects of a top-level JSON array, decoded one by one from a growing buffer."""
    decoder = json.JSONDecoder()
    buf, pos, chunk = text.read(1 << 16).lstrip("\ufeff \t\r\n"), 1, 1 << 16
    if not buf.startswith("["):
        raise ValueError("not a JSON array")
    while True:
        pos = _WS_COMMA.match(buf, pos).end()
        if pos >= len(buf) - 1:
            more = text.read(chunk)
            if not more and pos >= len(buf):
                raise ValueError("JSON array not closed (truncated file?)")
            buf, pos = buf[pos:] + more, 0
            if not more and buf.strip() == "]":
                return
            continue
        if buf[pos] == "]":
            return
        try:
            obj, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if len(buf) - pos > MAX_RECORD_CHARS:  # not streamable record by record: skip file
                raise RecordTooLong(f"JSON array element over {MAX_RECORD_CHARS:,} chars") from None
            more = text.read(chunk)
            if not more:
                raise
            buf, pos, chunk = buf[pos:] + more, 0, min(chunk * 2, 1 << 26)
            continue
        yield obj
        pos, chunk = end, 1 << 16
        if pos > 1 << 20:
            buf, pos = buf[pos:], 0


class RecordTooLong(ValueError):
    pass


def _bounded_lines(text: IO[str]) -> Iterator[str | RecordTooLong]:
    """Lines of at most MAX_RECORD_CHARS, read in pieces; a longer line is read through and
    dropped piece by piece, and a RecordTooLong stands in its place."""
    pieces: list[str] = []
    size = 0
    for piece in _lines(text):
        if size <= MAX_RECORD_CHARS:
            pieces.append(piece)
            size += len(piece)
            if size > MAX_RECORD_CHARS:
                pieces = []  # let it go now: the rest of the line is only counted
        else:
            size += len(piece)
        if piece.endswith("\n"):
            yield "".join(pieces) if size <= MAX_RECORD_CHARS else RecordTooLong(size)
            pieces, size = [], 0
    if size:
        yield "".join(pieces) if size <= MAX_RECORD_CHARS else RecordTooLong(size)


def _iter_records(text: IO[str], fmt: str, strict: bool = True) -> Iterator[object]:
    """Records of a JSON Lines file ("jsonl") or of a top-level JSON array ("json")."""
    if fmt == "json":
        yield from _iter_json_array(text)
        return
    for ln in _bounded_lines(text):
        if isinstance(ln, RecordTooLong):
            if not strict:
                return
            yield ln  # the caller counts it as a bad record
            continue
        if not ln.strip():
            continue
        try:
            yield json.loads(ln)
        except json.JSONDecodeError as e:
            if not strict:
                return
            yield e  # the caller counts it as a bad record


def _decode_html(raw: bytes, charset: str | None = None) -> str:
    try:
        return raw.decode(charset or "utf-8")
    except (UnicodeDecodeError, LookupError):
        m = re.search(rb"charset=[\"']?([\w-]+)", raw[:4096], re.IGNORECASE)
        enc = m.group(1).decode("ascii") if m else "utf-8"
        try:
            return raw.decode(enc, errors="replace")
        except LookupError:
            return raw.decode("utf-8", errors="replace")


def _charset(content_type: str | None) -> str | None:
    m = re.search(r"charset=[\"']?([\w-]+)", content_type or "", re.IGNORECASE)
    return m.group(1) if m else None


def _warc_docs(stream: IO[bytes]) -> Iterator[tuple[str, str]]:
    from warcio.archiveiterator import ArchiveIterator

    for record in ArchiveIterator(stream):
        if record.rec_type == "response" and record.http_headers is not None:
            ctype = record.http_headers.get_header("Content-Type") or ""
            if "html" in ctype.lower():
                yield _decode_html(record.content_stream().read(), _charset(ctype)), "html"
        elif record.rec_type in ("conversion", "resource"):
            ctype = (record.rec_headers.get_header("Content-Type") or "").lower()
            body = record.content_stream().read()
            if "html" in ctype:
                yield _decode_html(body, _charset(ctype)), "html"
            elif ctype.startswith("text/"):
                yield body.decode(_charset(ctype) or "utf-8", errors="replace"), "text"


def iter_file(
    inp: InputFile,
    opts: ReaderOptions,
    on_bad_record: Callable[[str, str], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[Document]:
    """Documents of one file (exceptions from a corrupt file propagate to the caller)."""
    src, n = inp.source, 0
    if inp.fmt == "parquet":
        import pyarrow.parquet as pq

        column = opts.text_field.split(".")[0]
        pf = pq.ParquetFile(inp.path)
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if isinstance(value, str):
                    yield Document(value, src, f"{src}#{n}")
                elif on_bad_record:
                    on_bad_record(src, f"no string in column {column!r}")
                n += 1
        if on_bytes:
            on_bytes(inp.size)
        return
    with open_binary(inp.path, inp.compression, on_bytes) as stream:
        if inp.fmt == "wiki":
            from .wiki import iter_pages  # mwparserfromhell: the corpus extra, not the core

            for _page_id, _title, wikitext in iter_pages(stream, opts.wiki_namespaces):
                yield Document(wikitext, src, f"{src}#{n}", "wikitext")
                n += 1
            return
        if inp.fmt == "warc":
            for body, kind in _warc_docs(stream):
                yield Document(body, src, f"{src}#{n}", kind)
                n += 1
            return
        if inp.fmt == "html":
            raw = stream.read(MAX_HTML_BYTES)
            yield Document(_decode_html(raw), src, f"{src}#0", "html")
            return
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="replace", newline=None)
        if inp.fmt == "text":
            for body in _text_docs(text, opts.text_unit, opts.max_doc_chars):
                yield Document(body, src, f"{src}#{n}")
                n += 1
            return
        for record in _iter_records(text, inp.fmt):
            value = None if isinstance(record, Exception) else _field(record, opts.text_field)
            if isinstance(value, str):
                yield Document(value, src, f"{src}#{n}")
            elif on_bad_record:
                why = "no text field"
                if isinstance(record, RecordTooLong):
                    why = f"record longer than {MAX_RECORD_CHARS:,} characters"
                elif isinstance(record, Exception):
                    why = "invalid JSON"
                on_bad_record(src, why)
            n += 1


def read_documents(
    files: list[InputFile],
    opts: ReaderOptions = ReaderOptions(),  # noqa: B008 (frozen dataclass)
    *,
    on_error: Callable[[str, str], None] | None = None,
    on_bad_record: Callable[[str, str], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_file_done: Callable[[InputFile], None] | None = None,
) -> Iterator[Document]:
    """All documents of all files, in order; an unreadable file is reported and skipped."""
    for inp in files:
        try:
            yield from iter_file(inp, opts, on_bad_record, on_bytes)
        except (AzllmError, KeyboardInterrupt, GeneratorExit):
            raise
        except Exception as e:  # corrupt archive, truncated dump, permissions: skip the file
            if on_error is None:
                raise
            on_error(inp.source, describe_error(e))
        if on_file_done:
            on_file_done(inp)
