"""`azllm corpus build --executor datatrove`: the same stages as blocks of HF datatrove pipelines.

For corpora that outgrow one machine. Two datatrove jobs, run by LocalPipelineExecutor here, or
by SlurmPipelineExecutor / RayPipelineExecutor on a cluster (WORK must then be a shared folder):

1. process (`tasks` tasks): task r reads input files r, r+tasks, r+2·tasks, … with our readers
   (`AzllmReader`), runs `process.process_document` on every document (`AzllmProcess`: wikitext
   and HTML extraction, cleaning, line cleanup, quality filters, language ID, and the dedup keys,
   MinHash signatures included) and writes every result, kept or removed, in input order to
   WORK/processed/{r:05d}.jsonl.zst (`ProcessedWriter`).
2. merge (1 task, `AzllmMergeDedupWrite`): merges the shards back into input order and runs the
   plain path's global steps on them: `Deduplicator.check`, the split and `SplitWriter`, the
   report, into DIR (atomically, as the plain path does).

What is the same as the plain path: train.jsonl.zst, val.jsonl.zst and report.json, byte for
byte, except the report's `config` (executor, tasks) and timings; the test checks that. Dedup is
*global*, with the same first-occurrence-wins rule, because it runs over the whole corpus in
input order in one task. What differs: that final task is serial and holds the whole dedup index
(as the plain path's main process does): the expensive per-document work, MinHash included, is
spread over the tasks, the index lookups are not. Work is split by file, so one huge file is one
task (split such inputs first). Shards hold the processed text, roughly the output's size again.

WORK (default: .DIR.datatrove beside DIR) holds shards, datatrove's logs and stats. Rerunning
the same command after a failure resumes: datatrove skips the tasks already completed. After a
good run the shards are deleted (and, locally, WORK too unless keep_work).

Only our own functions run inside datatrove: its LanguageFilter and token counters download
models at run time (fail offline), and its `language=` word splitters (spaCy) count punctuation
as words. So the core `datatrove` package is all this needs; no extras (its `processing` extra
would even pin trafilatura below 1.12, older than ours).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import heapq
import io
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import zstandard

from azllm.atomic import atomic_dir
from azllm.errors import AzllmError

from .dedup import DedupKeys, Deduplicator
from .minhash import MinHasher
from .pipeline import _account, _check_args, _finish  # the plain path's in-order tail
from .process import BuildConfig, Processed, process_document  # and its own stages
from .readers import Document, InputFile, expand_inputs, read_documents
from .report import Report, SplitWriter, nothing_read

try:  # an optional extra: this module imports without it, build_corpus_datatrove says what to do
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.base import PipelineStep

    MISSING = None
except ImportError as e:
    PipelineStep, MISSING = object, e.name

EXECUTORS = ("local", "slurm", "ray")
FINGERPRINT = "azllm-run.json"


# --- stage 1: per-document work, sharded by file ----------------------------------------------


class AzllmReader(PipelineStep):
    """Our readers as a datatrove reader; read errors travel as `event` documents, in order."""

    name = "azllm readers"
    type = "📖 - READER"

    def __init__(self, files: list[InputFile], cfg: BuildConfig):
        super().__init__()
        self.files, self.cfg = files, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[DTDocument]:
        events: list[tuple[str, str, str]] = []  # read errors, raised while reading the next doc

        def on_error(source: str, reason: str) -> None:
            events.append(("file_error", source, reason))

        def on_bad_record(source: str, reason: str) -> None:
            events.append(("bad_record", source, reason))

        for fi in range(rank, len(self.files), world_size):
            seq = 0  # (file, seq) orders every record of this file: docs and events alike
            docs = read_documents(
                [self.files[fi]], self.cfg.reader, on_error=on_error, on_bad_record=on_bad_record
            )
            for doc in itertools.chain(docs, [None]):  # streamed; None marks the end
                for kind, source, reason in events:
                    yield _event_doc(kind, source, reason, fi, seq)
                    seq += 1
                events.clear()
                if doc is None:  # the end: the events above came after the last document
                    break
                meta = {"source": doc.source, "kind": doc.kind, "file": fi, "seq": seq}
                seq += 1
                self.stat_update("documents")
                yield DTDocument(text=doc.text, id=doc.id, metadata=meta)


def _event_doc(kind: str, source: str, reason: str, fi: int, seq: int) -> DTDocument:
    meta = {"event": kind, "source": source, "reason": reason, "file": fi, "seq": seq}
    return DTDocument(text="", id=f"{source}!{seq}", metadata=meta)


class AzllmProcess(PipelineStep):
    """`process.process_document` as a datatrove step: the result rides in metadata."""

    name = "azllm process_document"
    type = "🔻 - FILTER"

    def __init__(self, cfg: BuildConfig):
        super().__init__()
        self.cfg = cfg

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[DTDocument]:
        cfg = self.cfg
        minhasher = (
            MinHasher(threshold=cfg.near_threshold, num_perm=cfg.num_perm)
            if cfg.dedup == "near"
            else None
        )
        for d in data:
            if "event" not in d.metadata:
                doc = Document(d.text, d.metadata["source"], d.id, d.metadata["kind"])
                with self.track_time():
                    p = process_document(doc, cfg, minhasher)
                self.stat_update(p.reason or "kept")
                d.metadata["processed"] = dataclasses.asdict(p)
            yield d


class ProcessedWriter(PipelineStep):
    """Writes stage-1 results to WORK/processed/{rank:05d}.jsonl.zst (temp name, then rename)."""

    name = "azllm shard writer"
    type = "💽 - WRITER"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work_dir = work_dir

    def run(self, data, rank: int = 0, world_size: int = 1) -> Iterator[DTDocument]:
        folder = Path(self.work_dir) / "processed"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{rank:05d}.jsonl.zst"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as z:
            for d in data:
                z.write((json.dumps(d.metadata, ensure_ascii=False) + "\n").encode())
                yield d
        os.replace(tmp, path)


# --- stage 2: global dedup, split, report (one task) -----------------------------------------


def _records(path: Path) -> Iterator[tuple[int, int, dict]]:
    with open(path, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for line in reader:
            m = json.loads(line)
            yield m["file"], m["seq"], m


def _processed(d: dict) -> Processed:
    keys = d.pop("keys")
    p = Processed(**d)
    p.keys = DedupKeys(**keys) if keys is not None else None
    return p


def merge_dedup_write(
    work_dir: Path,
    out_dir: Path,
    files: list[InputFile],
    skipped: list[tuple[str, str]],
    cfg: BuildConfig,
    report_config: dict,
    shards: int,
    force: bool,
) -> Report:
    """Stage 2 as a plain function: the shards, in input order, through the plain path's tail."""
    started = time.time()
    paths = [work_dir / "processed" / f"{r:05d}.jsonl.zst" for r in range(shards)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise AzllmError(f"{work_dir}: stage-1 shards missing ({', '.join(missing[:5])}); rerun")
    report = Report(config=report_config)
    for source, reason in skipped:
        report.file_error(source, reason)
    file_index = {f.source: i for i, f in enumerate(files)}
    dedup = Deduplicator(
        cfg.dedup,
        lines=cfg.line_dedup,
        max_dup_line_fraction=cfg.max_dup_line_fraction,
        max_keys=cfg.max_dedup_keys,
    )
    members: dict[int, list[str]] = {}
    with atomic_dir(out_dir, replace=force) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; DIR is an ordinary folder
        writer = SplitWriter(tmp, cfg.val_fraction, cfg.zstd_level)
        try:
            # each shard is in (file, seq) order already: a k-way merge restores input order
            for _f, _s, m in heapq.merge(*map(_records, paths), key=lambda r: r[:2]):
                if m.get("event") == "file_error":
                    report.file_error(m["source"], m["reason"])
                elif m.get("event") == "bad_record":
                    report.bad_record(m["source"], m["reason"])
                else:
                    p = _processed(m["processed"])
                    _account(p, report, dedup, writer, file_index, members)
        finally:
            writer.close()
        report.seconds = time.time() - started
        _finish(report, dedup, files, members)
        (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
    return report


class AzllmMergeDedupWrite(PipelineStep):
    """Stage 2 as a datatrove block (tasks=1), so Slurm/Ray can run it after stage 1."""

    name = "azllm merge + dedup + write"
    type = "💽 - WRITER"

    def __init__(self, work_dir, out_dir, files, skipped, cfg, report_config, shards, force):
        super().__init__()
        self.args = (Path(work_dir), Path(out_dir), files, skipped, cfg, report_config, shards)
        self.force = force

    def run(self, data=None, rank: int = 0, world_size: int = 1) -> Iterator[DTDocument]:
        if world_size != 1:
            raise ValueError("the merge stage must run as a single task")
        with self.track_time(unit="run"):
            report = merge_dedup_write(*self.args, force=self.force)
        work_dir = self.args[0]
        (work_dir / "summary.txt").write_text(report.summary() + "\n", encoding="utf-8")
        shutil.rmtree(work_dir / "processed", ignore_errors=True)  # the output has it all now
        (work_dir / "DONE").touch()  # the next run with this WORK starts fresh
        yield from ()


# --- the driver --------------------------------------------------------------------------------


def _prepare_work_dir(work_dir: Path, fingerprint: str) -> None:
    """Resume a WORK of the same run (datatrove skips completed tasks), else start it fresh."""
    marker = work_dir / FINGERPRINT
    if work_dir.exists():
        if not marker.exists():
            raise AzllmError(f"{work_dir}: exists and is not an azllm work folder; pick --work-dir")
        same = json.loads(marker.read_text()).get("fingerprint") == fingerprint
        if same and not (work_dir / "DONE").exists():
            return
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint}))


def build_corpus_datatrove(
    inputs: list[str | Path],
    out_dir: str | Path,
    config: BuildConfig | None = None,
    *,
    force: bool = False,
    tasks: int = 0,
    executor: str = "local",
    work_dir: str | Path | None = None,
    keep_work: bool = False,
    executor_options: dict | None = None,
    **overrides,
) -> str | None:
    """Build DIR as `pipeline.build_corpus` does, with datatrove running the stages.

    `tasks`: stage-1 tasks (0: one per core, capped at the number of files); `config.workers`
    is how many of them run at once locally. `executor_options` go to the Slurm/Ray executor
    (e.g. {"partition": "cpu", "time": "04:00:00"} for Slurm). Returns the report's summary, or
    None for Slurm (the jobs are queued; the report lands in DIR, the summary in WORK).
    With workers > 1 the local tasks are forkserver processes: call this from a script under
    `if __name__ == "__main__":` (the `azllm` command is).
    """
    if MISSING:
        raise AzllmError(
            f"--executor datatrove needs the datatrove package ({MISSING} is missing): "
            "pip install 'datatrove>=0.10'"
        )
    from datatrove.executor import LocalPipelineExecutor

    cfg = dataclasses.replace(config or BuildConfig(), **overrides)
    out_dir = Path(out_dir)
    if executor not in EXECUTORS:
        raise AzllmError(f"--datatrove-executor must be one of {', '.join(EXECUTORS)}")
    _check_args(out_dir, cfg, force)
    files, skipped = expand_inputs(list(inputs), text_field=cfg.reader.text_field)
    if not files:
        reasons = [{"source": s, "reason": r} for s, r in skipped]
        raise nothing_read(list(inputs), reasons, len(reasons))
    cores = len(os.sched_getaffinity(0))
    tasks = max(1, min(tasks or cores, len(files)))
    workers = min(cfg.workers or cores, tasks)
    work_dir = Path(work_dir) if work_dir else out_dir.parent / f".{out_dir.name}.datatrove"
    report_config = {"inputs": [str(i) for i in inputs], **dataclasses.asdict(cfg)}
    report_config.update(workers=workers, executor="datatrove", tasks=tasks)
    sources = [(f.source, f.size, f.path.stat().st_mtime_ns) for f in files]
    key = json.dumps([sources, report_config, str(out_dir)], default=str, sort_keys=True)
    _prepare_work_dir(work_dir, hashlib.sha256(key.encode()).hexdigest())

    stage1 = [AzllmReader(files, cfg), AzllmProcess(cfg), ProcessedWriter(str(work_dir))]
    stage2 = [
        AzllmMergeDedupWrite(work_dir, out_dir, files, skipped, cfg, report_config, tasks, force)
    ]
    opts = dict(executor_options or {})
    if executor == "local":
        LocalPipelineExecutor(
            stage1, tasks=tasks, workers=workers, logging_dir=str(work_dir / "logs-process")
        ).run()
        LocalPipelineExecutor(
            stage2, tasks=1, workers=1, logging_dir=str(work_dir / "logs-merge")
        ).run()
    elif executor == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        first = RayPipelineExecutor(
            stage1, tasks=tasks, workers=workers, logging_dir=str(work_dir / "logs-process"), **opts
        )
        RayPipelineExecutor(
            stage2, tasks=1, depends=first, logging_dir=str(work_dir / "logs-merge"), **opts
        ).run()
    else:
        from datatrove.executor.slurm import SlurmPipelineExecutor

        if not opts.get("partition"):
            raise AzllmError("--datatrove-executor slurm needs --slurm-partition")
        opts.setdefault("time", "24:00:00")
        if sys.prefix != sys.base_prefix:  # jobs run in this same virtual environment
            opts.setdefault("venv_path", f"{sys.prefix}/bin/activate")
        first = SlurmPipelineExecutor(
            stage1, tasks=tasks, logging_dir=str(work_dir / "logs-process"), **opts
        )
        SlurmPipelineExecutor(
            stage2, tasks=1, depends=first, logging_dir=str(work_dir / "logs-merge"), **opts
        ).run()
        return None
    summary = (work_dir / "summary.txt").read_text(encoding="utf-8")
    if not keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return summary


# --- command line (wired into `azllm corpus build` by cli.py) ---------------------------------


def add_datatrove_arguments(p: argparse.ArgumentParser) -> None:
    """`--executor datatrove` and its options, for the `corpus build` parser."""
    g = p.add_argument_group("scale-out with datatrove (optional: pip install datatrove)")
    g.add_argument("--executor", choices=("plain", "datatrove"), default="plain",
                   help="datatrove: run the stages as datatrove pipeline blocks")  # fmt: skip
    g.add_argument("--tasks", type=int, default=0,
                   help="datatrove: tasks for the per-document stage (0: one per core; "
                        "at most one per input file)")  # fmt: skip
    g.add_argument("--datatrove-executor", choices=EXECUTORS, default="local")
    g.add_argument("--work-dir", help="datatrove: shards and logs (shared disk on a cluster; "
                   "default: .DIR.datatrove beside DIR)")  # fmt: skip
    g.add_argument("--keep-work", action="store_true", help="datatrove: keep WORK after a run")
    g.add_argument("--slurm-partition", help="slurm: partition to submit to")
    g.add_argument("--slurm-time", default="24:00:00", help="slurm: time limit per job")
    g.add_argument("--cpus-per-task", type=int, default=1, help="slurm/ray: CPUs per task")


def run_build_datatrove(args: argparse.Namespace, config: BuildConfig) -> int:
    """`azllm corpus build --executor datatrove ...`, given the parsed BuildConfig."""
    opts: dict = {"cpus_per_task": args.cpus_per_task} if args.datatrove_executor != "local" else {}
    if args.datatrove_executor == "slurm":
        opts.update(partition=args.slurm_partition, time=args.slurm_time)
    summary = build_corpus_datatrove(
        args.input, args.out, config, force=args.force, tasks=args.tasks,
        executor=args.datatrove_executor, work_dir=args.work_dir, keep_work=args.keep_work,
        executor_options=opts,
    )  # fmt: skip
    if summary is None:
        print(f"submitted to slurm; {args.out}/report.json appears when the merge job ends")
    else:
        print(summary, end="")
        print(f"\nwrote {args.out}/train.jsonl.zst, val.jsonl.zst, report.json", file=sys.stderr)
    return 0
