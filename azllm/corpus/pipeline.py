"""The corpus build: read → extract → clean → line cleanup → language → filters → dedup → write.

    report = build_corpus(["raw/"], "corpus/", lang="az", dedup="near", workers=4)

Streaming and parallel: the main process reads documents and hands them in batches to a
pool of workers, at most a few batches per worker in flight (memory stays bounded whatever
the input size). Workers do the per-document work — wikitext/HTML extraction, `clean_text`,
line cleanup, language ID, quality filters, dedup keys and MinHash signatures
(`process.process_document`). The main process takes the results back *in input order* and does what
needs global state: deduplication, the deterministic train/val split and writing. The output
therefore does not depend on the number of workers.

Output, in DIR: `train.jsonl.zst`, `val.jsonl.zst` (see report.SplitWriter) and
`report.json`. Everything is written into a temporary folder beside DIR that is renamed to DIR
only when complete; an error, Ctrl-C or SIGTERM removes it and leaves DIR as it was.

The stages are plain functions (`process.process_document`, `Deduplicator.check`,
`SplitWriter.write`) so another executor (e.g. datatrove) can wrap them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

from tqdm import tqdm

from azllm.atomic import atomic_dir
from azllm.errors import AzllmError

from .clean import BLANK_RUNS
from .dedup import Deduplicator, pack_ref, unpack_ref
from .process import BuildConfig, Processed, _init_worker, _nbytes, process_batch
from .readers import Document, expand_inputs, read_documents
from .report import Report, SplitWriter, nothing_read


def _batches(docs: Iterable[Document], max_bytes: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= max_bytes or len(batch) >= 512:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _run_parallel(docs: Iterable[Document], cfg: BuildConfig, workers: int) -> Iterator[Processed]:
    """Processed documents in input order; at most 3 batches per worker in flight."""
    # Set up in the main process first: forked workers then inherit the imports and the
    # language model (lid.176) instead of loading them each.
    _init_worker(cfg, in_child=False)
    if workers <= 1:
        for batch in _batches(docs, cfg.batch_bytes):
            yield from process_batch(batch)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,))
    try:
        pending: deque = deque()
        for batch in _batches(docs, cfg.batch_bytes):
            pending.append(pool.apply_async(process_batch, (batch,)))
            while len(pending) >= 3 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()
    finally:
        # close + join, never terminate: terminate kills workers that may hold the result
        # queue's lock, and the pool's own clean-up then waits on that lock forever (seen when
        # a build was stopped). With at most 3 batches per worker in flight this waits ~a second.
        pool.close()
        pool.join()


# --- the build ------------------------------------------------------------------------------


def _check_args(out_dir: Path, cfg: BuildConfig, force: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise AzllmError(f"{out_dir}: exists and is not a folder; pick another --out")
        if any(out_dir.iterdir()) and not force:
            raise AzllmError(f"{out_dir}: folder is not empty; pass --force to replace it")
    if cfg.dedup not in ("near", "exact", "none"):
        raise AzllmError(f"--dedup must be near, exact or none, not {cfg.dedup!r}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise AzllmError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if not 0.0 < cfg.near_threshold <= 1.0:
        raise AzllmError(f"--near-threshold must be in (0, 1], got {cfg.near_threshold}")
    if cfg.workers < 0:
        raise AzllmError(f"--workers must be 0 (all cores) or more, got {cfg.workers}")
    if cfg.reader.text_unit not in ("block", "line", "file"):
        raise AzllmError(f"--text-unit must be block, line or file, not {cfg.reader.text_unit!r}")
    if cfg.reader.max_doc_chars < 1:
        raise AzllmError("--max-doc-chars must be positive")
    if cfg.lang is not None and not (cfg.lang.isalpha() and 2 <= len(cfg.lang) <= 3):
        raise AzllmError(f"--lang must be a language code such as az, or none; got {cfg.lang!r}")


def deduplicator_for(cfg: BuildConfig) -> Deduplicator:
    """The Deduplicator a build with `cfg` uses (shared with other executors)."""
    return Deduplicator(
        cfg.dedup,
        lines=cfg.line_dedup,
        max_dup_line_fraction=cfg.max_dup_line_fraction,
        min_keep_chars=cfg.min_keep_chars,
        max_keys=cfg.max_dedup_keys,
    )


class _Terminated(KeyboardInterrupt):
    pass


_STOP = threading.Event()


def _on_signal(signum, frame):
    # Only a flag, which the loop checks after every document: an exception raised here could
    # land inside an at-fork hook (while a worker starts), where Python prints it as "Exception
    # ignored" with a traceback and drops it, and the build would go on to the end.
    if _STOP.is_set():  # asked twice: stop now, the signal's own way (a temporary folder stays)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _STOP.set()


def _check_stop() -> None:
    if _STOP.is_set():
        raise _Terminated()


def _pause_for_tests() -> None:
    # With AZLLM_TEST_PAUSE=FILE the build creates FILE once its first document is accounted for
    # (temporary folder made, workers running) and waits there for SIGINT/SIGTERM: tests
    # interrupt it at this known point instead of after a guessed delay.
    path = os.environ.get("AZLLM_TEST_PAUSE")
    if path and not os.path.exists(path):
        Path(path).touch()
        _STOP.wait(timeout=600)


def build_corpus(
    inputs: list[str | Path],
    out_dir: str | Path,
    config: BuildConfig | None = None,
    *,
    force: bool = False,
    progress: bool = True,
    **overrides,
) -> Report:
    """Build DIR/train.jsonl.zst, DIR/val.jsonl.zst and DIR/report.json from `inputs`.

    `config` holds every setting; keyword overrides replace its top-level fields, e.g.
    `build_corpus(["raw"], "out", lang="az", dedup="exact", workers=2, val_fraction=0.02)`.
    """
    cfg = replace(config or BuildConfig(), **overrides)
    out_dir = Path(out_dir)
    _check_args(out_dir, cfg, force)
    files, skipped = expand_inputs(list(inputs), text_field=cfg.reader.text_field, exclude=out_dir)
    workers = cfg.workers or len(os.sched_getaffinity(0))
    report = Report(config={"inputs": [str(i) for i in inputs], **asdict(cfg)})
    report.config["workers"] = workers
    for source, reason in skipped:
        report.file_error(source, reason)
    file_index = {f.source: i for i, f in enumerate(files)}
    dedup = deduplicator_for(cfg)
    members: dict[int, list[str]] = {}
    started = time.time()

    in_main = threading.current_thread() is threading.main_thread()
    _STOP.clear()
    old = {}
    if in_main:
        old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with atomic_dir(out_dir, replace=force) as tmp:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; DIR is an ordinary folder
            bar = tqdm(
                total=sum(f.size for f in files),
                unit="B",
                unit_scale=True,
                desc="corpus",
                disable=None if progress else True,
            )
            docs = read_documents(
                files,
                cfg.reader,
                on_error=report.file_error,
                on_bad_record=report.bad_record,
                on_bytes=bar.update,
            )
            writer = SplitWriter(tmp, cfg.val_fraction, cfg.zstd_level)
            results = _run_parallel(docs, cfg, workers)
            try:
                for p in results:
                    _check_stop()
                    _account(p, report, dedup, writer, file_index, members)
                    _pause_for_tests()
                _check_stop()
            finally:
                results.close()  # stops the worker pool now, not at interpreter exit (can hang)
                bar.close()
                writer.close()
            if report.stages["read"].docs == 0:  # raised here, the temporary folder goes too
                raise nothing_read(list(inputs), report.skipped_files, report.skipped_file_count)
            report.seconds = time.time() - started
            _finish(report, dedup, files, members)
            (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return report


def _account(
    p: Processed,
    report: Report,
    dedup: Deduplicator,
    writer: SplitWriter,
    file_index: dict[str, int],
    members: dict[int, list[str]],
) -> None:
    """Fold one processed document into the report, dedup it, write it."""
    src = report.sources[p.source]
    src.docs_in += 1
    src.bytes_in += p.bytes_in
    report.stage("read", p.bytes_in)
    for stage, nbytes in p.passed:
        report.stage(stage, nbytes)
    for reason, n in p.lines_removed.items():
        report.removed_lines[reason] += n
    if p.lang:
        report.languages[p.lang] += 1
    if p.reason:
        report.removed(p.reason, p.id, p.text, p.removed_bytes)
        return
    text = p.text
    if p.keys is not None:
        ref = pack_ref(file_index[p.source], int(p.id.rpartition("#")[2]))
        verdict = dedup.check(p.keys, ref)
        src.lines += sum(1 for ln in text.split("\n") if ln.strip())
        src.dup_lines += verdict.dup_lines
        if verdict.reason == "duplicate:lines":
            report.removed_lines["duplicate_in_dropped_docs"] += verdict.dup_lines
        if verdict.reason:
            report.removed(verdict.reason, p.id, text, _nbytes(text))
            if verdict.head is not None:
                if verdict.head in members or len(members) < 10_000:
                    ids = members.setdefault(verdict.head, [])
                    if len(ids) < 3:
                        ids.append(p.id)
            return
        if verdict.drop_lines:
            lines = text.split("\n")
            text = "\n".join(ln for i, ln in enumerate(lines) if i not in verdict.drop_lines)
            text = BLANK_RUNS.sub("\n\n", text).strip("\n")
            report.removed_lines["duplicate"] += verdict.dup_lines
            report.removed_lines["duplicate_variant"] += verdict.variant_lines
            other = len(verdict.drop_lines) - verdict.dup_lines - verdict.variant_lines
            if other:
                report.removed_lines["duplicate_between"] += other
            if not text.strip():
                report.removed("duplicate:lines", p.id, p.text, _nbytes(p.text))
                return
    nbytes = _nbytes(text)
    report.stage("dedup", nbytes)
    split = writer.write(text, p.source, p.id)
    report.stage("output", nbytes)
    report.splits[split].docs += 1
    report.splits[split].bytes += nbytes
    src.docs_out += 1
    src.bytes_out += nbytes


def _finish(report: Report, dedup: Deduplicator, files, members: dict[int, list[str]]) -> None:
    def name(ref: int) -> str:
        fi, n = unpack_ref(ref)
        return f"{files[fi].source}#{n}"

    report.duplicate_clusters = [
        {"id": name(head), "duplicates": n, "examples": members.get(head, [])}
        for head, n in dedup.clusters.most_common(10)
    ]
    rows = []
    for (fi, earlier), n in dedup.line_overlap.most_common():
        src = files[fi].source
        total = report.sources[src].lines
        other = report.sources[files[earlier].source].lines
        rows.append(
            {
                "source": src,
                "earlier_source": files[earlier].source,
                "lines": n,
                "fraction": round(n / total, 4) if total else 0.0,
                # the same count over B's lines: approximate (a line B has once may recur in A)
                "fraction_of_earlier": round(min(1.0, n / other), 4) if other else 0.0,
            }
        )
    report.line_overlap = rows[:50]
    report.dedup_memory_bytes = dedup.nbytes
    report.dedup_index_full = dedup.full
