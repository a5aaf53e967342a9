"""`azllm corpus ...`: the command line of the corpus builder.

    azllm corpus build --input RAW... --out DIR [--lang az] [--dedup near|exact|none]
                       [--workers N] [--text-field text] [--min-chars 50] [--force]

`register(subparsers)` adds the `corpus` command to azllm's parser; `add_subcommands` adds its
subcommands to any parser (also used by `python -m azllm.corpus`). Users' mistakes raise
AzllmError, which the caller prints on one line with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .filters import FilterConfig
from .pipeline import build_corpus
from .process import BuildConfig
from .readers import ReaderOptions


def _lang(value: str) -> str | None:
    return None if value.lower() in ("none", "any", "off") else value


def add_build_parser(sub: argparse._SubParsersAction) -> None:
    d, f, r = BuildConfig(), FilterConfig(), ReaderOptions()
    p = sub.add_parser(
        "build",
        help="raw sources -> clean, deduplicated DIR/train.jsonl.zst, val.jsonl.zst, report.json",
        description="Build a training corpus: read, clean, filter, deduplicate, split, report.",
    )
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="SRC",
                   help="files or folders: text, JSONL/JSON, Parquet, MediaWiki XML, HTML, WARC "
                        "(optionally .gz/.bz2/.xz/.zst)")  # fmt: skip
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder")
    p.add_argument("--force", action="store_true", help="replace DIR if it is not empty")
    p.add_argument("--lang", default=d.lang, type=_lang,
                   help="keep documents in this language (lid.176 code); none: all")  # fmt: skip
    p.add_argument("--lang-threshold", type=float, default=None,
                   help="minimum language probability (default: langid's)")  # fmt: skip
    p.add_argument("--lang-lines", action="store_true",
                   help="also drop confidently foreign lines inside kept documents")  # fmt: skip
    p.add_argument("--dedup", choices=("near", "exact", "none"), default=d.dedup)
    p.add_argument("--near-threshold", type=float, default=d.near_threshold,
                   help="MinHash Jaccard threshold for near duplicates")  # fmt: skip
    p.add_argument("--no-line-dedup", action="store_true",
                   help="do not remove lines already seen in earlier documents")  # fmt: skip
    p.add_argument("--max-dup-line-fraction", type=float, default=d.max_dup_line_fraction,
                   help="drop a document when this share of it is lines seen before")  # fmt: skip
    p.add_argument("--max-dedup-keys", type=int, default=d.max_dedup_keys,
                   help="cap each dedup index at this many keys (0: no cap)")  # fmt: skip
    p.add_argument("--workers", "-j", type=int, default=d.workers, help="0: one per core")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--text-field", default=r.text_field,
                   help="JSON/Parquet field with the text (dotted for nested)")  # fmt: skip
    p.add_argument("--text-unit", choices=("block", "line", "file"), default=r.text_unit,
                   help="plain text: a document per blank-line block (long blocks cut at "
                        "--max-doc-chars), per line, or per file")  # fmt: skip
    p.add_argument("--max-doc-chars", type=int, default=r.max_doc_chars)
    p.add_argument("--min-chars", type=int, default=f.min_chars)
    p.add_argument("--min-words", type=int, default=f.min_words)
    p.add_argument("--no-repair", action="store_true", help="skip mojibake repair")
    p.add_argument("--transliterate", action="store_true",
                   help="convert Azerbaijani Cyrillic to Latin")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    from .datatrove_exec import add_datatrove_arguments

    add_datatrove_arguments(p)
    p.set_defaults(func=run_build)


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    filters = replace(FilterConfig(), min_chars=args.min_chars, min_words=args.min_words)
    reader = ReaderOptions(
        text_field=args.text_field, text_unit=args.text_unit, max_doc_chars=args.max_doc_chars
    )
    return BuildConfig(
        lang=args.lang,
        lang_threshold=args.lang_threshold,
        lang_lines=args.lang_lines,
        dedup=args.dedup,
        near_threshold=args.near_threshold,
        line_dedup=not args.no_line_dedup,
        max_dup_line_fraction=args.max_dup_line_fraction,
        max_dedup_keys=args.max_dedup_keys,
        val_fraction=args.val_fraction,
        repair=not args.no_repair,
        transliterate=args.transliterate,
        filters=filters,
        reader=reader,
        workers=args.workers,
    )


def run_build(args: argparse.Namespace) -> int:
    from azllm.errors import require

    require("corpus", "azllm corpus build")
    if args.executor == "datatrove":
        require("datatrove", "azllm corpus build --executor datatrove")
        from .datatrove_exec import run_build_datatrove

        return run_build_datatrove(args, config_from_args(args))
    report = build_corpus(
        args.input, args.out, config_from_args(args), force=args.force,
        progress=not args.no_progress,
    )  # fmt: skip
    print(report.summary())
    print(f"\nwrote {args.out}/train.jsonl.zst, val.jsonl.zst, report.json", file=sys.stderr)
    return 0


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    add_build_parser(sub)
    # `azllm corpus download` (azllm/corpus/download.py) is registered here:
    # -------------------------------------------------------------------------------------------
    from .download import register_download

    register_download(sub)
    # -------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `corpus` with its subcommands to azllm's top-level parser."""
    p = subparsers.add_parser("corpus", help="build a training corpus from raw text")
    sub = p.add_subparsers(dest="corpus_command", metavar="{build,...}", required=True)
    add_subcommands(sub)
