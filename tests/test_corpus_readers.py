"""Readers: every format from real files written here, corrupt files skipped, wiki markup gone."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import shared_path

from azllm.corpus.filters import FilterConfig, clean_lines
from azllm.corpus.formats import detect_format
from azllm.corpus.process import html_to_text
from azllm.corpus.readers import ReaderOptions, expand_inputs, read_documents
from azllm.corpus.wiki import strip_wiki_markup, wikitext_to_text
from azllm.errors import AzllmError

AZ = (
    "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir. Şəhər Xəzər dənizinin sahilində, "
    "Abşeron yarımadasının cənubunda yerləşir və ölkənin elm, mədəniyyət və sənaye mərkəzidir."
)
BLOCKS = f"{AZ}\nİkinci sətir.\n\nÜçüncü blok bir sətirdir.\n\n\nSonuncu blok.\n"


def read_all(inputs, **opts):
    files, skipped = expand_inputs(
        [str(p) for p in inputs], text_field=opts.get("text_field", "text")
    )
    errors: list[tuple[str, str]] = []
    bad: list[tuple[str, str]] = []
    docs = list(
        read_documents(
            files,
            ReaderOptions(**opts),
            on_error=lambda s, r: errors.append((s, r)),
            on_bad_record=lambda s, r: bad.append((s, r)),
        )
    )
    return docs, errors + skipped, bad


def test_text_blocks_lines_and_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text(BLOCKS, encoding="utf-8")
    docs, errors, _ = read_all([p])
    assert [d.text for d in docs] == [
        f"{AZ}\nİkinci sətir.",
        "Üçüncü blok bir sətirdir.",
        "Sonuncu blok.",
    ]
    assert [d.id for d in docs] == ["a.txt#0", "a.txt#1", "a.txt#2"] and not errors
    assert docs[0].source == "a.txt" and docs[0].kind == "text"
    assert len(read_all([p], text_unit="line")[0]) == 4
    assert [d.text for d in read_all([p], text_unit="file")[0]] == [BLOCKS.strip()]


def test_file_without_blank_lines_is_cut_into_chunks_of_whole_lines(tmp_path):
    lines = [f"Bu {i}-ci misradır, uzunluğu bir az çoxdur." for i in range(200)]
    p = tmp_path / "verses.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs, _, _ = read_all([p], max_doc_chars=1000)
    assert 5 < len(docs) < 20
    assert all(len(d.text) <= 1000 for d in docs)
    assert "\n".join(d.text for d in docs).split("\n") == lines  # nothing lost, no line cut


@pytest.mark.parametrize(
    "name,compress",
    [
        ("a.txt.gz", gzip.compress),
        ("a.txt.bz2", bz2.compress),
        ("a.txt.xz", lzma.compress),
        ("a.txt.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
        ("no_extension", gzip.compress),  # found by its magic bytes
        ("b.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    ],
)
def test_compressed(tmp_path, name, compress):
    raw = BLOCKS.encode()
    if "jsonl" in name:
        raw = "".join(json.dumps({"text": t}) + "\n" for t in ("bir", "iki")).encode()
    (tmp_path / name).write_bytes(compress(raw))
    docs, errors, _ = read_all([tmp_path / name])
    assert not errors
    assert [d.text for d in docs][-1] == ("iki" if "jsonl" in name else "Sonuncu blok.")


def test_jsonl_json_array_and_nested_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"text": "bir"}\n\n{"text": "iki", "x": 1}\nnot json\n{"other": 3}\n', encoding="utf-8"
    )
    docs, errors, bad = read_all([tmp_path / "a.jsonl"])
    assert [d.text for d in docs] == ["bir", "iki"] and not errors
    assert sorted(r for _, r in bad) == ["invalid JSON", "no text field"]
    records = [{"meta": {"body": f"mətn {i} " + "x" * 70_000}} for i in range(3)]  # > 64 KB each
    (tmp_path / "b.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    docs, errors, _ = read_all([tmp_path / "b.json"], text_field="meta.body")
    assert [d.text[:6] for d in docs] == ["mətn 0", "mətn 1", "mətn 2"] and not errors
    # a .json holding JSON Lines (how `datasets.to_json` writes) is read as such
    (tmp_path / "c.json").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [d.text for d in read_all([tmp_path / "c.json"])[0]] == ["a", "b"]


def test_missing_text_field_names_field_and_fix(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"content": "bir"}\n', encoding="utf-8")
    with pytest.raises(AzllmError, match=r"a\.jsonl.*'text'.*content.*--text-field"):
        expand_inputs([tmp_path / "a.jsonl"])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(AzllmError, match=r"b\.parquet.*'text'.*body.*--text-field"):
        expand_inputs([tmp_path / "b.parquet"])


def test_parquet_in_batches(tmp_path):
    texts = [f"sənəd {i}" for i in range(2500)] + [None]
    pq.write_table(pa.table({"text": texts, "n": list(range(2501))}), tmp_path / "d.parquet",
                   row_group_size=1000)  # fmt: skip
    docs, errors, bad = read_all([tmp_path / "d.parquet"])
    assert [d.text for d in docs] == texts[:-1] and not errors and len(bad) == 1
    assert docs[2499].id == "d.parquet#2499"


WIKI_DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Vikipediya</sitename></siteinfo>
  <page><title>Makemo</title><ns>0</ns><id>7</id>
    <revision><id>1</id><text xml:space="preserve">{{Infobox atoll|ad=Makemo|şəkil=M.jpg}}
'''Makemo''' ({{lang-fr|Makemo}}) — [[Tuamotu]] arxipelaqına daxil olan kiçik [[atoll]].\
&lt;ref name="a"&gt;{{cite web|url=http://x}}&lt;/ref&gt;
[[Şəkil:Makemo.jpg|thumb|200px|left|Atollun [[kosmos]]dan təsviri.]]
[[File:Map.png|mini|upright=1.2|Xəritə]]
== Coğrafiya ==
Atoll dairəvi formaya malikdir.&lt;ref&gt;Mənbə&lt;/ref&gt; Diametri 7 km-dir.
{| class="wikitable"
|-
! İl !! Əhali
|-
| 2007 || 0
|}
* Laqun okean suları ilə birləşir.
== İstinadlar ==
{{reflist}}
* [http://example.org Sayt]
[[Kateqoriya:Atollar]]
[[en:Makemo]]</text></revision></page>
  <page><title>Makemo atollu</title><ns>0</ns><id>8</id><redirect title="Makemo"/>
    <revision><id>2</id><text>#İSTİQAMƏTLƏNDİRMƏ [[Makemo]]</text></revision></page>
  <page><title>Müzakirə:Makemo</title><ns>1</ns><id>9</id>
    <revision><id>3</id><text>Müzakirə səhifəsi.</text></revision></page>
</mediawiki>
"""


def test_mediawiki_dump_bz2_to_plain_text(tmp_path):
    p = tmp_path / "azwiki-latest-pages-articles.xml.bz2"
    p.write_bytes(bz2.compress(WIKI_DUMP.encode()))
    assert detect_format(p) == ("wiki", "bz2")
    docs, errors, _ = read_all([p])
    assert len(docs) == 1 and not errors  # redirect and talk page skipped
    assert docs[0].kind == "wikitext"
    text = wikitext_to_text(docs[0].text)
    assert text.splitlines()[0] == "Makemo — Tuamotu arxipelaqına daxil olan kiçik atoll."
    assert "Atoll dairəvi formaya malikdir. Diametri 7 km-dir." in text
    assert "Laqun okean suları ilə birləşir." in text
    for junk in ("thumb", "px", "[[", "{{", "'''", "Infobox", "Kateqoriya", "Mənbə", "Sayt",
                 "Əhali", "Xəritə", "kosmos", "en:", "<ref", "()"):  # fmt: skip
        assert junk not in text, junk


def test_html_and_warc(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    body = " ".join([AZ] * 3)
    html = (
        "<html><head><title>Xəbər</title></head><body><nav><a href='/'>Ana səhifə</a> "
        f"<a href='/x'>Əlaqə</a></nav><article><h1>Bakı</h1><p>{body}</p><p>{AZ}</p></article>"
        "<footer>© 2024 Bütün hüquqlar qorunur.</footer></body></html>"
    )
    (tmp_path / "page.html").write_text(html, encoding="utf-8")
    with open(tmp_path / "crawl.warc.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for i in range(2):
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                       protocol="HTTP/1.1")  # fmt: skip
            writer.write_record(writer.create_warc_record(
                f"https://az.example/{i}", "response", payload=io.BytesIO(html.encode()),
                http_headers=headers))  # fmt: skip
        request = io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")
        writer.write_record(writer.create_warc_record("https://az.example/", "request", request))
    docs, errors, _ = read_all([tmp_path])
    assert not errors
    warc, page = f"{tmp_path.name}/crawl.warc.gz", f"{tmp_path.name}/page.html"  # relative names
    assert [(d.source, d.kind) for d in docs] == [(warc, "html"), (warc, "html"), (page, "html")]
    text = html_to_text(docs[0].text)
    assert AZ in text and "Ana səhifə" not in text and "hüquqlar" not in text


def test_corrupt_archive_is_skipped_and_the_rest_read(tmp_path):
    (tmp_path / "a_good.txt").write_text(BLOCKS, encoding="utf-8")
    whole = gzip.compress((BLOCKS * 2000).encode())
    (tmp_path / "b_bad.txt.gz").write_bytes(whole[: len(whole) // 2])  # truncated download
    (tmp_path / "c_bad.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"garbage" * 10)
    (tmp_path / "d_image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (tmp_path / "e_good.txt.xz").write_bytes(lzma.compress(b"Son fayl."))
    docs, errors, _ = read_all([tmp_path])
    reasons = {name.split("/")[-1]: why for name, why in errors}
    assert set(reasons) == {"b_bad.txt.gz", "c_bad.jsonl.zst", "d_image.png"}
    assert "EOFError" in reasons["b_bad.txt.gz"] and "unsupported" in reasons["d_image.png"]
    assert docs[0].text.startswith(AZ) and docs[-1].text == "Son fayl."


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(AzllmError, match="no such file"):
        expand_inputs([tmp_path / "missing.txt"])
    (tmp_path / "x.bin").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(AzllmError, match=r"x\.bin: unknown format"):
        expand_inputs([tmp_path / "x.bin"])
    (tmp_path / "notwiki.xml").write_text("<rss><item>x</item></rss>", encoding="utf-8")
    with pytest.raises(AzllmError, match="not a MediaWiki dump"):
        expand_inputs([tmp_path / "notwiki.xml"])


def test_azwiki_sentences_raw_comes_out_without_markup():
    raw = shared_path("data", "az", "pretrain", "azwiki_sentences_raw.txt").read_text("utf-8")
    assert re.search(r"thumb\||px\|", raw)  # the file does carry leftover markup
    cleaned, removed = clean_lines(raw, FilterConfig())
    for junk in ("thumb|", "px|", "[[", "{{", "'''", "{|", "|}", 'style="'):
        assert junk not in cleaned, junk
    assert not re.search(r"\b\d+px\b|\bthumb", cleaned)
    assert "Atollun kosmosdan təsviri." in cleaned.split("\n")
    assert "Tuamotu arxipelaqına daxil olan kiçik atoll" in cleaned
    # prose lines without markup pass through untouched
    assert "Diametri 7 km-dir." in cleaned.split("\n")
    assert len(cleaned) > 0.95 * len(raw)
    assert strip_wiki_markup("Normal sətir, heç nə dəyişmir.") == "Normal sətir, heç nə dəyişmir."
