"""What a corpus file is and how to open it: format by extension or by sniffing the first
bytes, compression by extension or magic bytes, and a decompressed binary stream that can report
the raw bytes read (for a progress bar over compressed input).

A compressed stream that ends before its end-of-stream marker (a truncated download, a copy cut
short) raises EOFError when read to the end, for every compression: gzip, bz2 and xz do so
themselves; zstandard's stream reader just stops, so zstd goes through `_ZstdReader`. The
readers turn that into a skipped file with its reason, never into silently partial data.
This module is the one place compressed input is opened (azllm/documents.py uses it too).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

import zstandard

FORMATS = ("text", "jsonl", "json", "parquet", "wiki", "html", "warc")
_COMPRESSION_EXT = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
_FORMAT_EXT = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".parquet": "parquet", ".pq": "parquet",
    ".xml": "wiki",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".warc": "warc", ".wet": "warc", ".arc": "warc",
}  # fmt: skip
_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


class UnknownFormat(ValueError):
    pass


# What reading a damaged file can raise (gzip: BadGzipFile is an OSError, zlib.error for bad
# data; bz2: OSError; xz: LZMAError; zstd: ZstdError; truncation: EOFError).
STREAM_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


class _ZstdReader(io.RawIOBase):
    """zstd frames one after another, decompressed; EOFError if the input ends inside a frame.

    The input is fed in small pieces: one piece's output is held at once, and zstd expands
    text by ~3-10x (at most 128 KiB out per few bytes in, for runs of one byte)."""

    _PIECE = 1 << 15

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # the decompressor of the frame being read
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            data = self._raw.read(self._PIECE)
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("zstd stream ended inside a frame (truncated file)")
                return 0
            out = []
            while data:
                if self._frame is None or self._frame.eof:
                    self._frame = self._dctx.decompressobj()
                out.append(self._frame.decompress(data))
                data = self._frame.unused_data if self._frame.eof else b""
            self._buf = memoryview(b"".join(out))
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _CountingReader(io.RawIOBase):
    """Passes reads through and reports how many raw (compressed) bytes went by."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[int], None]):
        self._raw, self._on_bytes = raw, on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._raw.readinto(b)
        if n:
            self._on_bytes(n)
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _ClosesItsFile:
    """close() also closes `owned`: GzipFile, BZ2File and LZMAFile given a file object leave it
    open (they close only files they opened), and it would warn unclosed when collected."""

    owned: IO[bytes] | None = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.owned is not None:
                self.owned.close()


class _GzipFile(_ClosesItsFile, gzip.GzipFile):
    pass


class _BZ2File(_ClosesItsFile, bz2.BZ2File):
    pass


class _LZMAFile(_ClosesItsFile, lzma.LZMAFile):
    pass


def open_binary(
    path: Path, compression: str | None, on_bytes: Callable[[int], None] | None = None
) -> IO[bytes]:
    """A buffered binary stream of the decompressed content."""
    raw: IO[bytes] = open(path, "rb", buffering=0)
    if on_bytes is not None:
        raw = _CountingReader(raw, on_bytes)
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)
    if compression is None:
        return io.BufferedReader(raw, buffer_size=1 << 20)
    if compression == "gzip":
        f = _GzipFile(fileobj=raw, mode="rb")
    else:
        f = {"bz2": _BZ2File, "xz": _LZMAFile}[compression](raw, "rb")
    f.owned = raw
    return f


def _compression_of(path: Path) -> str | None:
    ext = _COMPRESSION_EXT.get(path.suffix.lower())
    if ext:
        return ext
    with open(path, "rb") as f:
        head = f.read(8)
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _sniff(head: bytes) -> str:
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
    low = text[:2000].lower()
    if text.startswith("WARC/"):
        return "warc"
    if "<mediawiki" in low:
        return "wiki"
    if low.startswith(("<!doctype html", "<html")) or (low.startswith("<") and "<html" in low):
        return "html"
    if text.startswith("{"):
        return "jsonl"
    if text.startswith("["):
        return "json"
    if not head:
        return "text"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise UnknownFormat("binary content, not UTF-8 text") from None
    controls = sum(1 for c in text[:4096] if ord(c) < 32 and c not in "\t\r\n\f")
    if controls > 8:
        raise UnknownFormat("binary content, not text")
    return "text"


def detect_format(path: Path) -> tuple[str, str | None]:
    """(format, compression) of a file. Raises UnknownFormat, or OSError etc. if unreadable."""
    compression = _compression_of(path)
    name = path.name.lower()
    inner = Path(name[: -len(path.suffix)]) if path.suffix.lower() in _COMPRESSION_EXT else path
    fmt = _FORMAT_EXT.get(inner.suffix.lower())
    if fmt in (None, "json", "wiki"):  # decide by content
        with open_binary(path, compression) as f:
            head = f.read(4096)
        sniffed = _sniff(head)
        if fmt == "json":
            fmt = "json" if sniffed == "json" else "jsonl"
        elif fmt == "wiki" and sniffed != "wiki":
            raise UnknownFormat("XML that is not a MediaWiki dump")
        else:
            fmt = sniffed
    if fmt == "parquet" and compression:
        raise UnknownFormat("compressed Parquet; Parquet compresses itself, decompress the file")
    return fmt, compression
