"""Download recipes for public Azerbaijani raw text: Wikipedia dumps, Leipzig corpora, CC-100.

`azllm corpus download wikipedia|leipzig|cc100 --lang az --out DIR` fetches one source into DIR,
ready for `azllm corpus build --input DIR/...`. Standard library HTTP only (urllib), and:
- resumable: bytes land in `NAME.part`, continued with `Range: bytes=N-`; a server that answers
  200 instead of 206 (ignores Range) or whose file changed (If-Range) makes us start over;
- verified: the Wikipedia dump against the SHA-1 that Wikimedia publishes beside it; Leipzig and
  CC-100 publish no checksums, so for them we can only check the announced length;
- atomic: `NAME.part` is renamed to `NAME` only once complete and verified.
Every failure a user can meet (no network, HTTP errors, checksum mismatch) is one AzllmError line.

The base URL (scheme + host, the path layout is kept) can point every recipe at a mirror or a
test server: `--base-url URL` or the AZLLM_DOWNLOAD_BASE_URL environment variable.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

from azllm import __version__
from azllm.atomic import temp_path
from azllm.errors import AzllmError

SOURCES = ("wikipedia", "leipzig", "cc100")
BASE_URL_ENV = "AZLLM_DOWNLOAD_BASE_URL"
DEFAULT_BASE_URLS = {
    "wikipedia": "https://dumps.wikimedia.org",
    "leipzig": "https://downloads.wortschatz-leipzig.de",
    "cc100": "https://data.statmt.org",
}
# Wikimedia refuses generic clients (urllib's default agent) at times; its policy asks for a name.
USER_AGENT = f"azllm/{__version__} (corpus download; Python urllib)"
# Leipzig names corpora by ISO 639-3 code; others: pass --corpus with the full name.
ISO639_3 = {"az": "aze", "tr": "tur", "ru": "rus", "en": "eng", "kk": "kaz", "uz": "uzb"}
# Leipzig years that exist for Azerbaijani per genre (aze_wikipedia_2021_*, aze_newscrawl_2013_*).
LEIPZIG_DEFAULT_YEAR = {"wikipedia": 2021, "newscrawl": 2013}
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: where from, the name to save it under, and its published digest."""

    url: str
    filename: str
    checksum: tuple[str, str] | None = None  # (hashlib algorithm, hex digest)


class _Transient(Exception):
    """A failure worth retrying (dropped connection, timeout, 5xx): the .part file is kept."""


# ---------------------------------------------------------------- recipes (URLs and checksums)


def base_url_for(source: str, override: str | None = None) -> str:
    """The scheme+host to use for `source`: --base-url, then $AZLLM_DOWNLOAD_BASE_URL, then real."""
    base = override or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URLS[source]
    if urlsplit(base).scheme not in ("http", "https"):
        raise AzllmError(f"--base-url/{BASE_URL_ENV}: {base!r} is not an http(s) URL")
    return base.rstrip("/")


def wikipedia_file(lang: str, base: str, date: str = "latest", **net) -> RemoteFile:
    """The pages-articles dump of `{lang}wiki` and its SHA-1 from Wikimedia's sha1sums file.

    The `latest/` sums file lists *dated* names (azwiki-20240601-pages-articles.xml.bz2), so we
    read the date from it and download from the dated folder: a `latest` link that moves to a new
    dump mid-download would otherwise splice two different files into one .part.
    """
    wiki = f"{lang}wiki"
    if date != "latest" and not re.fullmatch(r"\d{8}", date):
        raise AzllmError(f"--date: {date!r} is neither 'latest' nor a dump date like 20240601")
    sums_url = f"{base}/{wiki}/{date}/{wiki}-{date}-sha1sums.txt"
    pattern = re.compile(rf"([0-9a-f]{{40}})\s+\*?({wiki}-(\d{{8}})-pages-articles\.xml\.bz2)")
    for line in fetch_text(sums_url, **net).splitlines():
        m = pattern.fullmatch(line.strip())
        if m:
            digest, name, dump_date = m.groups()
            url = f"{base}/{wiki}/{dump_date}/{name}"
            return RemoteFile(url, name, ("sha1", digest))
    raise AzllmError(
        f"{sums_url} lists no {wiki}-*-pages-articles.xml.bz2 (that dump may still be running); "
        "pick a finished dump with --date YYYYMMDD"
    )


def leipzig_name(
    lang: str, genre: str = "wikipedia", year: int | None = None, size: str = "300K"
) -> str:
    """Leipzig Corpora Collection name, e.g. aze_wikipedia_2021_300K or aze_newscrawl_2013_1M."""
    if lang not in ISO639_3:
        raise AzllmError(f"--lang {lang}: no Leipzig language code known; pass --corpus NAME")
    if not re.fullmatch(r"\d+[KM]", size):
        raise AzllmError(f"--size: {size!r} is not a Leipzig size such as 10K, 30K, 100K, 300K, 1M")
    year = year or LEIPZIG_DEFAULT_YEAR.get(genre)
    if year is None:
        raise AzllmError(f"--genre {genre}: no default year; pass --year")
    return f"{ISO639_3[lang]}_{genre}_{year}_{size}"


def leipzig_file(name: str, base: str) -> RemoteFile:
    if not re.fullmatch(r"[a-z]{3}[A-Za-z0-9_.-]*", name):
        raise AzllmError(f"--corpus: {name!r} does not look like a Leipzig corpus name")
    return RemoteFile(f"{base}/corpora/{name}.tar.gz", f"{name}.tar.gz")


def cc100_file(lang: str, base: str) -> RemoteFile:
    return RemoteFile(f"{base}/cc-100/{lang}.txt.xz", f"cc100-{lang}.txt.xz")


# ---------------------------------------------------------------- HTTP


def _open(url: str, headers: dict[str, str], timeout: float) -> http.client.HTTPResponse:
    """urlopen with our User-Agent; maps errors to AzllmError (permanent) or _Transient."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:
            raise  # the caller decides: a complete .part or a stale one
        e.close()
        if e.code == 429 or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        hint = " (check the name/date/--lang, or the mirror's layout)" if e.code == 404 else ""
        raise AzllmError(f"HTTP {e.code} {e.reason} for {url}{hint}") from None
    except urllib.error.URLError as e:
        raise _Transient(f"cannot reach {urlsplit(url).netloc} ({e.reason}); no network?") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise _Transient(f"{type(e).__name__} from {urlsplit(url).netloc}: {e}") from None


def _with_retries(what: str, fn, retries: int, backoff_s: float, on_give_up=lambda: ""):
    for attempt in range(retries + 1):
        try:
            return fn()
        except _Transient as e:
            if attempt == retries:
                raise AzllmError(f"{what}: {e}{on_give_up()}") from None
            time.sleep(backoff_s * 2**attempt)


def fetch_text(url: str, *, timeout: float = 60.0, retries: int = 3, backoff_s: float = 1.0) -> str:
    """A small text file (checksum lists), whole, in memory."""

    def once() -> str:
        with _open(url, {}, timeout) as resp:
            try:
                return resp.read(1 << 22).decode("utf-8", errors="replace")
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                raise _Transient(f"{type(e).__name__}: {e}") from None

    return _with_retries(f"fetching {url}", once, retries, backoff_s)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/200' -> (100, 200); 'bytes */200' -> (None, 200); unknown total -> None."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    start, total = m.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _download_once(remote: RemoteFile, part: Path, timeout: float, progress: bool) -> None:
    """One request: continue `part` from its size (or start over); raises _Transient if cut."""
    meta_path = part.with_name(part.name + ".meta")
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except (ValueError, OSError):
        meta = {}  # unreadable bookkeeping: resume without If-Range, the checksum still guards
    offset = part.stat().st_size if part.exists() else 0
    if offset and meta.get("url") not in (None, remote.url):
        offset = 0  # a .part of some other URL: nothing to continue
    headers = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if meta.get("validator"):  # the server sends the whole file (200) if it changed since
            headers["If-Range"] = meta["validator"]
    try:
        resp = _open(remote.url, headers, timeout)
    except urllib.error.HTTPError as e:  # 416: our offset is at or past the end of the file
        _, total = _content_range(e.headers.get("Content-Range"))
        e.close()
        if total == offset:
            return  # the .part was complete already (interrupted before the rename)
        part.unlink(missing_ok=True)  # longer than the remote file: not a prefix of it
        return _download_once(remote, part, timeout, progress)  # from byte 0: no second 416
    with resp:
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:  # not the bytes we asked for: start over without Range
                resp.close()
                part.unlink(missing_ok=True)
                return _download_once(remote, part, timeout, progress)
            mode = "ab"
        else:  # 200: the server ignored Range, or If-Range said the file changed
            length = resp.headers.get("Content-Length")
            total, offset, mode = (int(length) if length else None), 0, "wb"
            validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            meta_path.write_text(json.dumps({"url": remote.url, "validator": validator}))
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=remote.filename,
            disable=None if progress else True,  # None: off when stderr is not a terminal
        )
        with open(part, mode) as f, bar:
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
                raise _Transient(f"connection lost ({type(e).__name__})") from None
            finally:
                f.flush()
                os.fsync(f.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Transient(f"connection closed at {size} of {total} bytes")


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(
    remote: RemoteFile,
    out_dir: Path,
    *,
    timeout: float = 60.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download `remote` into out_dir (resuming a .part), verify, rename; return the final path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / remote.filename
    part = dest.with_name(dest.name + ".part")
    meta = part.with_name(part.name + ".meta")
    if dest.exists():
        if remote.checksum and file_digest(dest, remote.checksum[0]) != remote.checksum[1]:
            raise AzllmError(
                f"{dest} exists but its {remote.checksum[0]} differs from the published one; "
                "delete it and rerun"
            )
        print(f"{dest}: already downloaded")
        return dest
    _with_retries(
        f"downloading {remote.url}",
        lambda: _download_once(remote, part, timeout, progress),
        retries,
        backoff_s,
        lambda: (
            f"; {part} keeps {part.stat().st_size} bytes: rerun the same command to resume"
            if part.exists() and part.stat().st_size
            else ""
        ),
    )
    if remote.checksum:
        algorithm, expected = remote.checksum
        got = file_digest(part, algorithm)
        if got != expected:
            part.unlink()  # a corrupt prefix would poison every resume: start clean next time
            meta.unlink(missing_ok=True)
            raise AzllmError(
                f"checksum mismatch for {remote.filename}: {algorithm} {got}, "
                f"published {expected}; the partial file was removed, rerun to download it again"
            )
    os.replace(part, dest)
    meta.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------- Leipzig tarball -> text


def extract_leipzig_sentences(archive: Path, out_path: Path) -> int:
    """Write the `*-sentences.txt` member of a Leipzig tarball as plain text, one sentence a
    line, without Leipzig's leading `id<TAB>` column; atomic. Returns the sentence count.

    Leipzig shuffles sentences (no document order survives), so there are no documents to keep.
    """
    count = 0
    # a hidden .NAME.PID.tmp: removed on any exit Python sees, and by the next run after a kill
    with temp_path(out_path) as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                member = next((m for m in tar if m.name.endswith("-sentences.txt")), None)
                if member is None:
                    raise AzllmError(
                        f"{archive}: no *-sentences.txt inside; is it a Leipzig corpus?"
                    )
                src = tar.extractfile(member)
                with src, open(tmp, "w", encoding="utf-8") as out:
                    for raw in src:
                        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                        text = line.split("\t", 1)[1] if "\t" in line else line
                        if text.strip():
                            out.write(text + "\n")
                            count += 1
        except (tarfile.TarError, EOFError, OSError) as e:
            raise AzllmError(
                f"{archive}: cannot read the archive ({e}); delete it and rerun"
            ) from None
        os.replace(tmp, out_path)
    return count


# ---------------------------------------------------------------- recipes, end to end


def download(
    source: str,
    lang: str,
    out_dir: Path,
    *,
    base_url: str | None = None,
    date: str = "latest",
    genre: str = "wikipedia",
    year: int | None = None,
    size: str = "300K",
    corpus: str | None = None,
    keep_archive: bool = False,
    timeout: float = 60.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    progress: bool = True,
) -> Path:
    """Run one recipe; return the path to give `azllm corpus build --input`."""
    if source not in SOURCES:
        raise AzllmError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if not re.fullmatch(r"[a-z]{2,3}", lang):
        raise AzllmError(f"--lang: {lang!r} is not a language code such as az")
    base = base_url_for(source, base_url)
    net = dict(timeout=timeout, retries=retries, backoff_s=backoff_s)
    if source == "wikipedia":
        remote = wikipedia_file(lang, base, date, **net)
    elif source == "cc100":
        remote = cc100_file(lang, base)
    else:
        name = corpus or leipzig_name(lang, genre, year, size)
        text_path = Path(out_dir) / f"{name}-sentences.txt"
        if text_path.exists():
            print(f"{text_path}: already downloaded")
            return text_path
        archive = fetch(leipzig_file(name, base), out_dir, progress=progress, **net)
        n = extract_leipzig_sentences(archive, text_path)
        if not keep_archive:  # a .tar.gz beside the text would be read as gzip text by a build
            archive.unlink()
        print(f"{text_path}: {n} sentences")
        return text_path
    return fetch(remote, out_dir, progress=progress, **net)


def run_download(args: argparse.Namespace) -> int:
    if args.source != "leipzig":
        used = [k for k in ("genre", "year", "size", "corpus") if getattr(args, k) is not None]
        if used or args.keep_archive:
            raise AzllmError(f"--{(used or ['keep-archive'])[0]} applies to leipzig only")
    if args.source != "wikipedia" and args.date is not None:
        raise AzllmError("--date applies to wikipedia only")
    path = download(
        args.source,
        args.lang,
        Path(args.out),
        base_url=args.base_url,
        date=args.date or "latest",
        genre=args.genre or "wikipedia",
        year=args.year,
        size=args.size or "300K",
        corpus=args.corpus,
        keep_archive=args.keep_archive,
        timeout=args.timeout,
        retries=args.retries,
        progress=not args.no_progress,
    )
    print(f"done: {path}\nnext: azllm corpus build --input {path} --out CORPUS_DIR")
    return 0


def register_download(corpus_subparsers: argparse._SubParsersAction) -> None:
    """Add `download` under `azllm corpus`."""
    p = corpus_subparsers.add_parser(
        "download",
        help="download public raw text (Wikipedia dump, Leipzig, CC-100); resumable",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("source", choices=SOURCES)
    p.add_argument("--lang", default="az", help="language code (default az)")
    p.add_argument("--out", required=True, help="directory to download into (created)")
    p.add_argument("--base-url", help=f"mirror or test server root (env {BASE_URL_ENV})")
    p.add_argument("--date", help="wikipedia: dump date YYYYMMDD or 'latest' (default)")
    p.add_argument("--genre", help="leipzig: wikipedia (default) or newscrawl")
    p.add_argument("--year", type=int, help="leipzig: corpus year (wikipedia 2021, newscrawl 2013)")
    p.add_argument("--size", help="leipzig: sentences, e.g. 30K, 100K, 300K (default), 1M")
    p.add_argument("--corpus", help="leipzig: full corpus name, e.g. aze_wikipedia_2016_300K")
    p.add_argument("--keep-archive", action="store_true", help="leipzig: keep the .tar.gz")
    p.add_argument("--retries", type=int, default=3, help="resume attempts after a dropped link")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before retry")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_download)
