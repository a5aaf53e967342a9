"""Download recipes against a real HTTP server on 127.0.0.1 (never the internet).

The handler implements Range/If-Range itself, and can misbehave on purpose: cut a response
short, ignore Range, or change the file under a download.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import random
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from azllm.corpus import download as dl
from azllm.errors import AzllmError

DATE = "20240601"
DUMP = f"azwiki-{DATE}-pages-articles.xml.bz2"


class Handler(BaseHTTPRequestHandler):
    """Serves server.files {path: bytes}; honours Range and If-Range unless told otherwise."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        etag = '"' + hashlib.md5(body).hexdigest() + '"'
        start, status = 0, 200
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and not srv.ignore_range and (if_range is None or if_range == etag):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        cut = srv.cut_after.pop(self.path, None)  # one broken response, then healthy ones
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        srv.bytes_sent[self.path] = srv.bytes_sent.get(self.path, 0) + len(payload)
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.cut_after = {}, [], {}
    srv.ignore_range, srv.bytes_sent = False, {}
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fake_dump(n_pages: int = 400) -> bytes:
    rng = random.Random(n_pages)  # varied words, so bz2 cannot shrink the dump to nothing
    words = "Bakı şəhər Azərbaycan dil Xəzər dəniz Əksinə çay göl dağ kənd il".split()
    pages = "".join(
        f"<page><title>Səhifə {i}</title><ns>0</ns><revision><text>"
        f"{' '.join(rng.choice(words) + str(rng.randrange(999)) for _ in range(12))}"
        "</text></revision></page>\n"
        for i in range(n_pages)
    )
    return bz2.compress(f"<mediawiki>\n{pages}</mediawiki>\n".encode())


def publish_wiki(srv, body: bytes, sha1: str | None = None) -> None:
    """Lay out a dump like dumps.wikimedia.org: dated files, a latest/ sums file."""
    sha1 = sha1 or hashlib.sha1(body).hexdigest()
    sums = "\n".join(
        [
            f"{'1' * 40}  azwiki-{DATE}-pages-articles-multistream.xml.bz2",
            f"{sha1}  {DUMP}",
            f"{'2' * 40}  azwiki-{DATE}-pages-meta-current.xml.bz2",
        ]
    )
    srv.files["/azwiki/latest/azwiki-latest-sha1sums.txt"] = sums.encode()
    srv.files[f"/azwiki/{DATE}/azwiki-{DATE}-sha1sums.txt"] = sums.encode()
    srv.files[f"/azwiki/{DATE}/{DUMP}"] = body


def get(srv, source, out, **kw):
    kw.setdefault("retries", 0)
    return dl.download(source, "az", out, base_url=srv.base, progress=False, backoff_s=0, **kw)


def test_wikipedia_dump_is_fetched_from_the_dated_folder_and_sha1_checked(server, tmp_path):
    body = fake_dump()
    publish_wiki(server, body)
    path = get(server, "wikipedia", tmp_path / "raw")
    assert path == tmp_path / "raw" / DUMP
    assert path.read_bytes() == body
    assert [p for p, _, _ in server.requests] == [
        "/azwiki/latest/azwiki-latest-sha1sums.txt",
        f"/azwiki/{DATE}/{DUMP}",
    ]
    assert sorted(p.name for p in path.parent.iterdir()) == [DUMP]  # no .part/.meta left
    # A rerun finds the verified file and does not download again.
    n = len(server.requests)
    assert get(server, "wikipedia", tmp_path / "raw") == path
    assert [p for p, _, _ in server.requests[n:]] == ["/azwiki/latest/azwiki-latest-sha1sums.txt"]


def test_explicit_dump_date_uses_that_dates_sums_file(server, tmp_path):
    publish_wiki(server, fake_dump())
    get(server, "wikipedia", tmp_path, date=DATE)
    assert server.requests[0][0] == f"/azwiki/{DATE}/azwiki-{DATE}-sha1sums.txt"
    with pytest.raises(AzllmError, match="--date"):
        get(server, "wikipedia", tmp_path, date="2024-06")


def test_interrupted_download_leaves_part_and_rerun_resumes_with_range(server, tmp_path):
    body = fake_dump(3000)
    assert len(body) > 20_000
    publish_wiki(server, body)
    cut = len(body) // 3
    server.cut_after[f"/azwiki/{DATE}/{DUMP}"] = cut
    out = tmp_path / "raw"
    with pytest.raises(AzllmError, match="rerun the same command to resume") as exc:
        get(server, "wikipedia", out)
    assert "\n" not in str(exc.value)
    part = out / (DUMP + ".part")
    assert part.read_bytes() == body[:cut]
    assert not (out / DUMP).exists()  # nothing half-written under the final name

    path = get(server, "wikipedia", out)
    assert path.read_bytes() == body
    assert server.requests[-1][1] == f"bytes={cut}-"
    assert server.requests[-1][2] is not None  # If-Range with the ETag saved on the first try
    # Only the missing tail travelled the second time.
    assert server.bytes_sent[f"/azwiki/{DATE}/{DUMP}"] == len(body) - cut
    assert not part.exists() and not (out / (DUMP + ".part.meta")).exists()


def test_retries_resume_within_one_call(server, tmp_path):
    server.files["/cc-100/az.txt.xz"] = body = bytes(range(256)) * 300
    server.cut_after["/cc-100/az.txt.xz"] = 1000
    path = get(server, "cc100", tmp_path, retries=2)
    assert path.name == "cc100-az.txt.xz" and path.read_bytes() == body
    assert [r for _, r, _ in server.requests] == [None, "bytes=1000-"]


def test_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    server.files["/cc-100/az.txt.xz"] = body = b"0123456789" * 5000
    server.ignore_range = True
    (tmp_path / "cc100-az.txt.xz.part").write_bytes(body[:1234])
    path = get(server, "cc100", tmp_path)
    assert server.requests[-1][1] == "bytes=1234-"  # we asked to resume ...
    assert path.read_bytes() == body  # ... got 200, so the old prefix was not kept twice


def test_file_changed_since_part_was_written_starts_over(server, tmp_path):
    server.files["/cc-100/az.txt.xz"] = new = b"new version " * 4000
    part = tmp_path / "cc100-az.txt.xz.part"
    part.write_bytes(b"old version " * 100)
    url = f"{server.base}/cc-100/az.txt.xz"
    meta = json.dumps({"url": url, "validator": '"x"'})
    (tmp_path / "cc100-az.txt.xz.part.meta").write_text(meta)
    path = get(server, "cc100", tmp_path)
    assert server.requests[-1][2] == '"x"'  # If-Range sent; the server's ETag differs -> 200
    assert path.read_bytes() == new


def test_complete_part_answered_416_is_finished_not_refetched(server, tmp_path):
    body = fake_dump()
    publish_wiki(server, body)
    (tmp_path / (DUMP + ".part")).write_bytes(body)
    path = get(server, "wikipedia", tmp_path)
    assert path.read_bytes() == body and f"/azwiki/{DATE}/{DUMP}" not in server.bytes_sent


def test_checksum_mismatch_is_one_line_and_removes_the_bad_part(server, tmp_path):
    body = fake_dump()
    publish_wiki(server, body, sha1="f" * 40)
    with pytest.raises(AzllmError, match="checksum mismatch") as exc:
        get(server, "wikipedia", tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and "f" * 40 in msg and hashlib.sha1(body).hexdigest() in msg
    assert list(tmp_path.iterdir()) == []


def test_corrupt_prefix_in_part_is_caught_by_the_checksum(server, tmp_path):
    body = fake_dump()
    publish_wiki(server, body)
    (tmp_path / (DUMP + ".part")).write_bytes(b"X" * 100)  # not a prefix of the real dump
    with pytest.raises(AzllmError, match="checksum mismatch"):
        get(server, "wikipedia", tmp_path)
    assert get(server, "wikipedia", tmp_path).read_bytes() == body  # the rerun starts clean


def test_leipzig_tarball_becomes_plain_sentences(server, tmp_path):
    name = "aze_wikipedia_2021_300K"
    sentences = ["Bakı Azərbaycanın paytaxtıdır.", "Xəzər dənizi böyükdür.", "Əksinə, belə deyil."]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, text in [
            (f"{name}/{name}-words.txt", "1\tBakı\t10\n"),
            (
                f"{name}/{name}-sentences.txt",
                "".join(f"{i}\t{s}\n" for i, s in enumerate(sentences, 1)),
            ),
        ]:
            data = text.encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    server.files[f"/corpora/{name}.tar.gz"] = buf.getvalue()
    path = get(server, "leipzig", tmp_path)
    assert path == tmp_path / f"{name}-sentences.txt"
    assert path.read_text(encoding="utf-8").splitlines() == sentences
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # archive removed

    # Size/year/genre flags pick other real names; a missing one is a one-line HTTP 404.
    with pytest.raises(AzllmError, match=r"HTTP 404 .*aze_newscrawl_2013_1M\.tar\.gz"):
        get(server, "leipzig", tmp_path, genre="newscrawl", size="1M")


def test_leipzig_names():
    assert dl.leipzig_name("az") == "aze_wikipedia_2021_300K"
    assert dl.leipzig_name("az", "newscrawl", size="100K") == "aze_newscrawl_2013_100K"
    assert dl.leipzig_name("az", year=2016, size="30K") == "aze_wikipedia_2016_30K"
    with pytest.raises(AzllmError, match="--size"):
        dl.leipzig_name("az", size="300k sentences")


def test_corrupt_leipzig_archive_is_a_clear_error(server, tmp_path):
    server.files["/corpora/aze_wikipedia_2021_300K.tar.gz"] = b"not a tarball at all" * 10
    with pytest.raises(AzllmError, match="cannot read the archive"):
        get(server, "leipzig", tmp_path)


def test_real_urls_by_default(monkeypatch):
    monkeypatch.delenv(dl.BASE_URL_ENV, raising=False)
    assert dl.cc100_file("az", dl.base_url_for("cc100")).url == (
        "https://data.statmt.org/cc-100/az.txt.xz"
    )
    assert dl.leipzig_file("aze_wikipedia_2021_300K", dl.base_url_for("leipzig")).url == (
        "https://downloads.wortschatz-leipzig.de/corpora/aze_wikipedia_2021_300K.tar.gz"
    )
    assert dl.base_url_for("wikipedia") == "https://dumps.wikimedia.org"


def test_env_var_points_recipes_at_a_mirror(server, tmp_path, monkeypatch):
    server.files["/cc-100/az.txt.xz"] = b"abc" * 10
    monkeypatch.setenv(dl.BASE_URL_ENV, server.base + "/")
    path = dl.download("cc100", "az", tmp_path, progress=False, retries=0)
    assert path.read_bytes() == b"abc" * 10


def test_no_network_is_one_line_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused, like a machine offline
    with pytest.raises(AzllmError, match="cannot reach 127.0.0.1") as exc:
        dl.download(
            "cc100",
            "az",
            tmp_path,
            base_url=f"http://127.0.0.1:{port}",
            retries=1,
            backoff_s=0,
            progress=False,
        )
    assert "\n" not in str(exc.value)


def test_http_error_and_bad_arguments(server, tmp_path):
    with pytest.raises(AzllmError, match="HTTP 404"):
        get(server, "wikipedia", tmp_path)  # no sums file published
    server.files["/azwiki/latest/azwiki-latest-sha1sums.txt"] = b"abc  azwiki-x-stub.xml.gz\n"
    with pytest.raises(AzllmError, match="lists no azwiki-.*--date"):
        get(server, "wikipedia", tmp_path)
    with pytest.raises(AzllmError, match="--lang"):
        dl.download("cc100", "Azerbaijani", tmp_path, base_url=server.base)
    with pytest.raises(AzllmError, match="not an http"):
        dl.download("cc100", "az", tmp_path, base_url="ftp://example.org")


def test_cli_parser(server, tmp_path, capsys):
    server.files["/cc-100/az.txt.xz"] = b"xyz" * 10
    parser = argparse.ArgumentParser(prog="azllm corpus")
    dl.register_download(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(
        ["download", "cc100", "--out", str(tmp_path), "--base-url", server.base, "--no-progress"]
    )
    assert args.func(args) == 0
    assert (tmp_path / "cc100-az.txt.xz").read_bytes() == b"xyz" * 10
    assert "next: azllm corpus build" in capsys.readouterr().out
    args = parser.parse_args(["download", "cc100", "--out", str(tmp_path), "--size", "1M"])
    with pytest.raises(AzllmError, match="--size applies to leipzig only"):
        args.func(args)


def test_part_longer_than_remote_file_starts_over(server, tmp_path):
    server.files["/cc-100/az.txt.xz"] = body = b"short file " * 100
    (tmp_path / "cc100-az.txt.xz.part").write_bytes(b"?" * (len(body) + 50))
    path = get(server, "cc100", tmp_path)
    assert [r for _, r, _ in server.requests] == [f"bytes={len(body) + 50}-", None]  # 416, then 200
    assert path.read_bytes() == body
