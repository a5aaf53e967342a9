"""Wikipedia: MediaWiki XML dumps streamed page by page, wikitext turned into plain text.

Two entry points:
- `iter_pages(stream)` walks a `pages-articles.xml(.bz2)` dump with `iterparse`, clearing each
  page once read, so memory stays at one page whatever the dump size.
- `wikitext_to_text(wikitext)` parses with mwparserfromhell and drops what is not prose:
  templates (infoboxes, citations), tables, <ref> and other extension tags, comments, file and
  image links (their `thumb|200px|caption` options are where most leftover markup in scraped
  Wikipedia text comes from), categories, interlanguage links and the reference/"see also"
  sections at the end of an article.
- `strip_wiki_markup(line)` cleans text that was already flattened by someone else's tool and
  still carries markup (e.g. `thumb|200px|left|Atollun kosmosdan təsviri.`, flattened tables,
  `[[link|text]]`, `'''bold'''`). It is conservative on purpose: it is also applied to ordinary
  text files, so it only removes patterns that do not occur in prose.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import IO
from xml.etree.ElementTree import iterparse

# Namespaces whose links are not text: files, categories (English + Azerbaijani names).
_DROP_LINK_NS = {
    "file", "image", "media", "category", "fayl", "şəkil", "təsvir", "kateqoriya",
}  # fmt: skip
# Extension tags whose content is not running prose.
_DROP_TAGS = {
    "ref", "references", "gallery", "table", "math", "chem", "code", "syntaxhighlight", "source",
    "pre", "timeline", "imagemap", "score", "graph", "mapframe", "maplink",
    "templatedata", "nowiki",
}  # fmt: skip
# Trailing sections that hold links and citations rather than text.
_DROP_SECTIONS = {
    "istinadlar", "həmçinin bax", "xarici keçidlər", "mənbə", "mənbələr", "ədəbiyyat", "qeydlər",
    "ədəbiyyat siyahısı", "əlavə ədəbiyyat", "references", "see also", "external links", "notes",
    "further reading", "bibliography", "sources",
}  # fmt: skip
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)?:", re.IGNORECASE)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(
    stream: IO[bytes], namespaces: tuple[int, ...] = (0,)
) -> Iterator[tuple[str, str, str]]:
    """Yield (page id, title, wikitext) of each non-redirect page in `namespaces`."""
    context = iterparse(stream, events=("start", "end"))
    root = None
    for event, elem in context:
        if root is None and event == "start":
            root = elem
            if _local(root.tag) != "mediawiki":
                raise ValueError(f"not a MediaWiki dump (root element <{_local(root.tag)}>)")
            continue
        if event != "end" or _local(elem.tag) != "page":
            continue
        title = page_id = text = ""
        ns, redirect = 0, False
        for child in elem:
            name = _local(child.tag)
            if name == "title":
                title = child.text or ""
            elif name == "ns":
                ns = int(child.text or 0)
            elif name == "id":
                page_id = child.text or ""
            elif name == "redirect":
                redirect = True
            elif name == "revision":
                for sub in child:
                    if _local(sub.tag) == "text":
                        text = sub.text or ""
        first = text.lstrip().split("\n", 1)[0]
        redirect = redirect or (first.startswith("#") and "[[" in first)  # old dumps: #REDIRECT
        if ns in namespaces and not redirect and text:
            yield page_id, title, text
        elem.clear()
        root.clear()  # drop the cleared pages the root still references


def _is_dropped_link(title: str) -> bool:
    title = title.strip()
    if ":" in title:
        prefix = title.split(":", 1)[0].strip().lstrip(":").lower()
        if prefix in _DROP_LINK_NS:
            return True
        if _INTERWIKI.match(title) and not title.startswith(":"):
            return True  # [[en:Makemo]]: an interlanguage link, not text
    return False


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:
        pass  # already gone with a parent we removed


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of an article: prose paragraphs and headings, no markup."""
    # imported here: it is in the 'corpus' extra, and `azllm` builds its parser from this package
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    out: list[str] = []
    for section in code.get_sections(flat=True, include_lead=True):
        headings = section.filter_headings(recursive=False)
        title = headings[0].title.strip_code().strip() if headings else ""
        if title.replace("İ", "i").replace("I", "ı").lower() in _DROP_SECTIONS:
            continue
        for node in section.filter_templates(recursive=False):
            _remove(section, node)
        for node in section.filter_comments():
            _remove(section, node)
        for node in section.filter_tags():
            if str(node.tag).lower() in _DROP_TAGS:
                _remove(section, node)
        for node in section.filter_wikilinks():
            if _is_dropped_link(str(node.title)):
                _remove(section, node)
        text = section.strip_code(normalize=True, collapse=True)
        for line in text.split("\n"):
            line = _EMPTY_PARENS.sub("", strip_wiki_markup(line))  # "()" left by {{lang|..}}
            line = _SPACES.sub(" ", line).strip()
            if line:
                out.append(line)
    return "\n".join(out)


# --- leftover markup in already-flattened text -----------------------------------------------

# Image options: at least one "strong" option (thumb, 200px, frameless, upright) in a |-chain,
# possibly with weak ones (left, right, center, none) around it.
_WEAK = r"(?:left|right|center|centre|none|baseline|middle|sub|super|top|bottom|border|sol|sağ)"
_STRONG = (
    r"(?:thumbnail|thumb|miniatur|mini|frameless|framed|frame|upright(?:\s*=\s*[\d.]+)?"
    r"|\d*x?\d+\s*px|alt=[^|\n]*|link=[^|\n]*)"
)
_OPT = rf"(?:{_STRONG}|{_WEAK})"
_IMAGE_OPTIONS = re.compile(
    rf"(?:{_OPT}\s*\|\s*)*(?:thumbnail|thumb|\d*x?\d+\s*px|frameless|upright(?:\s*=\s*[\d.]+)?)"
    rf"(?:\s*\|\s*{_OPT})*(?:\s*\|)?",
    re.IGNORECASE,
)
_TABLE_ATTRS = re.compile(r'(?:[\w-]+\s*=\s*"[^"\n]*"\s*)+(?:\|(?![-}]))?')
_TABLE_MARKS = re.compile(r"\{\||\|\}|\|-+|^\s*!|\s!!?(?=\s|$)")
_TABLE_CELL = re.compile(r"\s*\|\|?\s*")
_PX = re.compile(r"\b\d*x?\d+px\b")
_LINK = re.compile(r"\[\[(?:[^\]|\[]*\|)?([^\]\[]*)\]\]")
_EXTLINK = re.compile(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.IGNORECASE | re.DOTALL)
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^\s*(={2,6})\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-ZİÇŞÖÜĞƏ]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")


def strip_wiki_markup(line: str) -> str:
    """Remove wiki markup left in one line of flattened text; returns the cleaned line."""
    if not line:
        return line
    orig = line
    if "&" in line:
        line = html.unescape(line)
    if "<" in line:
        line = _HTML_TAG.sub(" ", _REF.sub(" ", line))
    if "{{" in line:
        for _ in range(5):  # nested templates, innermost first
            line, n = _TEMPLATE.subn(" ", line)
            if not n:
                break
        line = line.replace("{{", " ").replace("}}", " ")
    if "[" in line:
        line = _LINK.sub(r"\1", _EXTLINK.sub(r"\1", line))
        line = line.replace("[[", "").replace("]]", "")
    if "''" in line:
        line = _QUOTES.sub("", line)
    if "=" in line:
        line = _HEADING.sub(r"\2", line)
    if "__" in line:
        line = _MAGIC.sub(" ", line)
    if "|" in line:
        if "{|" in line or "|-" in line or "|}" in line or '="' in line:
            line = _TABLE_ATTRS.sub(" ", line)
            line = _TABLE_MARKS.sub(" ", line)
            line = _IMAGE_OPTIONS.sub(" ", line)
            line = _TABLE_CELL.sub(" — ", line).strip(" —")  # cells of a flattened table row
        else:
            line = _IMAGE_OPTIONS.sub(" ", line)
    if "px" in line:
        line = _PX.sub(" ", line)  # "20px" never occurs in prose
    if "thumb" in line:
        line = re.sub(r"\bthumb(?:nail)?\b(?=\s*\()", " ", line)
    if "(" in line:
        line = _EMPTY_PARENS.sub(" ", line)  # "() —": what a removed {{lang|..}} leaves
    if line == orig:
        return line.strip()
    # something was removed: tidy the gaps it left ("() —", double spaces, " ,")
    line = _EMPTY_PARENS.sub(" ", line)
    line = _SPACES.sub(" ", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    return line.strip()
