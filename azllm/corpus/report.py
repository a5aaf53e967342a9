"""Output: the corpus files, and the report of what came in, what each stage removed and why.

`SplitWriter` writes DIR/train.jsonl.zst and DIR/val.jsonl.zst, one `{"text", "source", "id"}`
per line, a document going to val when a hash of its text falls below `val_fraction`: the
split depends on the text alone, not on input order or worker count.

`Report` is filled by the pipeline as documents stream by (everything in it is bounded: counts,
at most a few examples per reason, the top duplicate clusters), written to DIR/report.json and
summarised for people by `summary()`.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from azllm.batch import in_val
from azllm.errors import AzllmError

STAGES = ("read", "extract", "clean", "lines", "language", "filters", "dedup", "output")
MAX_EXAMPLES = 3
MAX_SKIPPED_LISTED = 1000
SNIPPET_CHARS = 160


@dataclass
class StageStats:
    docs: int = 0
    bytes: int = 0


@dataclass
class SourceStats:
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    lines: int = 0  # non-empty lines that reached deduplication
    dup_lines: int = 0  # of those, lines already seen in an earlier document


def _jsonable(o):
    return sorted(o) if isinstance(o, set | frozenset) else str(o)


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


@dataclass
class Report:
    config: dict = field(default_factory=dict)
    stages: dict[str, StageStats] = field(default_factory=lambda: {s: StageStats() for s in STAGES})
    removed_docs: Counter[str] = field(default_factory=Counter)
    removed_bytes: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    removed_lines: Counter[str] = field(default_factory=Counter)
    languages: Counter[str] = field(default_factory=Counter)
    sources: dict[str, SourceStats] = field(default_factory=lambda: defaultdict(SourceStats))
    skipped_files: list[dict] = field(default_factory=list)
    skipped_file_count: int = 0
    bad_records: Counter[str] = field(default_factory=Counter)
    splits: dict[str, StageStats] = field(
        default_factory=lambda: {"train": StageStats(), "val": StageStats()}
    )
    duplicate_clusters: list[dict] = field(default_factory=list)
    line_overlap: list[dict] = field(default_factory=list)
    dedup_memory_bytes: int = 0
    dedup_index_full: bool = False
    seconds: float = 0.0

    # --- filled while streaming ---

    def file_error(self, source: str, reason: str) -> None:
        self.skipped_file_count += 1
        if len(self.skipped_files) < MAX_SKIPPED_LISTED:
            self.skipped_files.append({"source": source, "reason": reason})

    def bad_record(self, source: str, reason: str) -> None:
        self.bad_records[f"{source}: {reason}"] += 1

    def stage(self, name: str, nbytes: int, docs: int = 1) -> None:
        st = self.stages[name]
        st.docs += docs
        st.bytes += nbytes

    def removed(self, reason: str, doc_id: str, text: str, nbytes: int) -> None:
        self.removed_docs[reason] += 1
        self.removed_bytes[reason] += nbytes
        if len(self.examples[reason]) < MAX_EXAMPLES:
            self.examples[reason].append({"id": doc_id, "text": _snippet(text)})

    # --- views ---

    def to_dict(self) -> dict:
        total_in = self.stages["read"].bytes
        return {
            "config": self.config,
            "stages": [
                {"stage": name, "docs": st.docs, "bytes": st.bytes}
                for name, st in self.stages.items()
            ],
            "removed": [
                {
                    "reason": reason,
                    "docs": n,
                    "bytes": self.removed_bytes[reason],
                    "examples": self.examples.get(reason, []),
                }
                for reason, n in self.removed_docs.most_common()
            ],
            "removed_lines": dict(self.removed_lines.most_common()),
            "languages": dict(self.languages.most_common()),
            "splits": {k: vars(v) for k, v in self.splits.items()},
            "sources": {k: vars(v) for k, v in sorted(self.sources.items())},
            "duplicate_clusters": self.duplicate_clusters,
            "line_overlap": self.line_overlap,
            "skipped_files": self.skipped_files,
            "skipped_file_count": self.skipped_file_count,
            "bad_records": dict(self.bad_records.most_common(100)),
            "dedup_memory_bytes": self.dedup_memory_bytes,
            "dedup_index_full": self.dedup_index_full,
            "seconds": round(self.seconds, 2),
            "mb_per_s": round(total_in / 1e6 / self.seconds, 3) if self.seconds else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2, default=_jsonable) + "\n"

    def summary(self, top: int = 8) -> str:
        def mb(n: int) -> str:
            return f"{n / 1e6:,.2f} MB"

        out = ["corpus build report", "", f"{'stage':<10}{'docs':>12}{'bytes':>16}"]
        for name, st in self.stages.items():
            out.append(f"{name:<10}{st.docs:>12,}{mb(st.bytes):>16}")
        for split, st in self.splits.items():
            out.append(f"  {split:<8}{st.docs:>12,}{mb(st.bytes):>16}")
        if self.removed_docs:
            out += ["", "documents removed (top reasons):"]
            for reason, n in self.removed_docs.most_common(top):
                ex = self.examples.get(reason) or [{}]
                out.append(f"  {reason:<32}{n:>9,}  {mb(self.removed_bytes[reason])}")
                if ex[0]:
                    out.append(f"      e.g. {ex[0]['id']}: {ex[0]['text'][:90]}")
        if self.removed_lines:
            lines = ", ".join(f"{k} {v:,}" for k, v in self.removed_lines.most_common(top))
            out += ["", f"lines removed: {lines}"]
        if self.languages:
            langs = ", ".join(f"{k} {v:,}" for k, v in self.languages.most_common(top))
            out.append(f"languages detected: {langs}")
        if self.line_overlap:
            out += ["", "line overlap between sources (lines of A already seen in B):"]
            for row in self.line_overlap[:top]:
                out.append(
                    f"  {row['source']} <- {row['earlier_source']}: {row['lines']:,} lines "
                    f"({100 * row['fraction']:.1f}% of A, ~{100 * row['fraction_of_earlier']:.1f}%"
                    " of B)"
                )
        if self.duplicate_clusters:
            out += ["", "largest duplicate clusters:"]
            for c in self.duplicate_clusters[:5]:
                out.append(f"  {c['id']}: {c['duplicates']:,} duplicates")
        if self.skipped_file_count:
            out += ["", f"files skipped: {self.skipped_file_count:,}"]
            for s in self.skipped_files[:top]:
                out.append(f"  {s['source']}: {s['reason']}")
        if self.bad_records:
            out.append(f"records without text: {sum(self.bad_records.values()):,}")
        if self.dedup_index_full:
            out.append("warning: a dedup index reached --max-dedup-keys; later duplicates missed")
        if self.seconds:
            rate = self.stages["read"].bytes / 1e6 / self.seconds
            out += ["", f"{self.seconds:,.1f} s, {rate:,.2f} MB/s"]
        return "\n".join(out)


class SplitWriter:
    """train.jsonl.zst and val.jsonl.zst, the split decided by a hash of the text."""

    def __init__(self, folder: Path, val_fraction: float, level: int = 3):
        self.val_fraction = val_fraction
        self._files = {}
        self._writers = {}
        for split in ("train", "val"):
            f = open(folder / f"{split}.jsonl.zst", "wb")
            self._files[split] = f
            cctx = zstandard.ZstdCompressor(level=level)  # single-threaded: same bytes every run
            self._writers[split] = cctx.stream_writer(f, closefd=False)

    def split_of(self, text: str) -> str:
        # the split rule's one home; the same key as `azllm tokenize` (shards.py) hashes
        return "val" if in_val(text.encode("utf-8"), self.val_fraction) else "train"

    def write(self, text: str, source: str, doc_id: str) -> str:
        split = self.split_of(text)
        record = {"text": text, "source": source, "id": doc_id}
        self._writers[split].write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        return split

    def close(self) -> None:
        for split in ("train", "val"):
            self._writers[split].close()
            self._files[split].flush()
            os.fsync(self._files[split].fileno())
            self._files[split].close()


def nothing_read(inputs: list, skipped: list[dict], skipped_count: int) -> AzllmError:
    """The error for a build that read no document at all (an empty corpus helps nobody)."""
    names = ", ".join(map(str, inputs[:3])) + (" ..." if len(inputs) > 3 else "")
    if skipped:
        first = skipped[0]
        why = f"{skipped_count} file(s) skipped, e.g. {first['source']}: {first['reason']}"
    else:
        why = "the input files hold no text"
    return AzllmError(f"--input {names}: no document could be read ({why}); check the inputs")
