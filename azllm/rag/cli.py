"""`azllm rag index` and `azllm rag search`: their parsers and commands (wired into cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

from azllm.errors import AzllmError


def cmd_index(args) -> int:
    from azllm.rag.chunk import Chunking
    from azllm.rag.index import META, Index
    from azllm.rag.normalise import Normalisation

    out = Path(args.out)
    t0 = time.perf_counter()
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    if fresh:
        norm = Normalisation(stem=not args.no_stem)
        size = args.chunk_chars or Chunking.size
        overlap = args.overlap_chars
        if overlap is None:  # the default, or a quarter of a smaller --chunk-chars
            overlap = min(Chunking.overlap, size // 4)
        chunking = Chunking(size, overlap)
        stats = Index.create(out, args.docs, norm, chunking)
        verb = "built"
    else:
        if args.chunk_chars is not None or args.overlap_chars is not None or args.no_stem:
            raise AzllmError(
                f"--out {out}: the index exists and keeps the chunking and normalisation it "
                f"was built with (its {META}); leave those flags out to add, or pick a new --out"
            )
        with Index.open(out) as index:
            stats = index.add(args.docs)
        verb = "updated"
    with Index.open(out) as index:
        total = index.stats()
    secs = time.perf_counter() - t0
    print(
        f"azllm: {verb} {out}: +{stats.docs} documents, +{stats.chunks} chunks"
        f"{f', {stats.skipped} already indexed' if stats.skipped else ''}"
        f"{f', {stats.empty} empty' if stats.empty else ''}; now {total['documents']} documents, "
        f"{total['chunks']} chunks ({secs:.1f} s)"
    )
    return 0


def cmd_search(args) -> int:
    from azllm.rag.index import Index

    with Index.open(args.index) as index:
        hits = index.search(args.query, args.k)
    if args.json:
        for h in hits:
            print(json.dumps(h.__dict__, ensure_ascii=False))
        return 0
    if not hits:
        print("(no chunk shares a word with the question)")
    for i, h in enumerate(hits, 1):
        print(f"[{i}] score {h.score:.3f}  {h.source} (chunk {h.chunk})")
        print(textwrap.indent(textwrap.fill(h.text, 96), "    "))
    sys.stdout.flush()
    return 0


def register(subparsers) -> None:
    rag = subparsers.add_parser("rag", help="retrieval over your documents (BM25 index)")
    sub = rag.add_subparsers(dest="rag_cmd", required=True)
    p = sub.add_parser(
        "index",
        help="build an index from documents, or add documents to one",
        description="Read documents (txt, md, jsonl, json, parquet, html, compressed too; "
        "folders recursively), split them into overlapping chunks on sentence boundaries and "
        "index them for BM25. An existing --out index gets the new documents added.",
    )
    p.add_argument("docs", nargs="+", help="files or folders")
    p.add_argument("--out", required=True, help="the index folder (made, or added to)")
    p.add_argument(
        "--chunk-chars", type=int, default=None, help="longest chunk in characters (default 600)"
    )
    p.add_argument(
        "--overlap-chars",
        type=int,
        default=None,
        help="sentences repeated from the previous chunk, in characters (default 150, at "
        "most a quarter of --chunk-chars)",
    )
    p.add_argument("--no-stem", action="store_true", help="keep word endings (no suffix stripping)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="the chunks that best match a question")
    p.add_argument("index", help="an index folder (azllm rag index)")
    p.add_argument("query", help="the question, in quotes")
    p.add_argument("-k", type=int, default=5, help="how many chunks (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per chunk")
    p.set_defaults(func=cmd_search)


def rag_flags(p: argparse.ArgumentParser) -> None:
    """--rag INDEX --rag-k N of `azllm chat` and `azllm serve`."""
    from azllm.rag.prompt import DEFAULT_K

    p.add_argument(
        "--rag",
        default=None,
        metavar="INDEX",
        help="answer from documents: put the best chunks of this index (azllm rag index) "
        "into the prompt",
    )
    p.add_argument(
        "--rag-k", type=int, default=DEFAULT_K, help=f"chunks per question (default {DEFAULT_K})"
    )


def open_rag(path: str | None, k: int):
    """The index of --rag (None without it), opened and checked before the model loads."""
    if path is None:
        return None
    if not 1 <= k <= 20:
        raise AzllmError(f"--rag-k {k}: must be in [1, 20]")
    from azllm.rag.index import Index

    return Index.open(path)
