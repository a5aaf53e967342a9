"""Inputs are read whole or reported, outputs are whole or absent (issue 11):
truncated compressed streams, damaged metrics.jsonl, unwritable export targets, empty or
unusable corpus inputs, over-long JSONL records, and temporary files left by killed runs."""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import json
import lzma
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from chat_fixtures import make_run
from conftest import SAMPLE, run_cli, shared_path

from azllm.cli import main
from azllm.errors import AzllmError

TEXT = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt")))


def run_main(capsys, *args) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


def refused(capsys, *args, match: str) -> str:
    code, err = run_main(capsys, *args)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("azllm: error:"), err
    assert match in err[0], err[0]
    return err[0]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def zstd_streamed(data: bytes) -> bytes:
    """Compressed as a stream with a block per 64 KiB (as `zstd` does for a pipe)."""
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False) as w:
        for i in range(0, len(data), 1 << 16):
            w.write(data[i : i + (1 << 16)])
            w.flush(zstandard.FLUSH_BLOCK)
    return buf.getvalue()


def corpus_build(capsys, inputs, out: Path) -> tuple[int, list[str]]:
    args = ["corpus", "build", "--out", out, "--workers", "1", "--no-progress"]
    return run_main(capsys, *args[:2], "--input", *inputs, *args[2:])


# --- 2. truncated compressed input -------------------------------------------------------------

COMPRESS = {
    "zst": zstd_streamed,
    "gz": gzip.compress,
    "bz2": lambda data: bz2.compress(data, 1),  # 100 kB blocks: the first ones decode
    "xz": lzma.compress,
}


@pytest.mark.parametrize("ext", COMPRESS)
def test_truncated_stream_is_a_skipped_file(tmp_path, capsys, ext):
    text = shared_path("data", "az", "pretrain", "quran_az_musayev.txt").read_bytes()[:300_000]
    data = COMPRESS[ext](text)
    src = tmp_path / "in" / f"a.txt.{ext}"
    src.parent.mkdir()
    src.write_bytes(data[: len(data) // 2])  # documents come out before the cut is found
    code, err = corpus_build(capsys, [src.parent], tmp_path / "c")
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert code == 0, err
    assert [s["source"] for s in report["skipped_files"]] == ["in/a.txt." + ext]
    assert "EOFError" in report["skipped_files"][0]["reason"]


def test_frame_truncated_zstd_alone_reads_nothing_and_fails(tmp_path, capsys):
    data = zstandard.ZstdCompressor().compress(TEXT.encode("utf-8"))  # one frame, one block
    src = tmp_path / "a.txt.zst"
    src.write_bytes(data[: len(data) - 40])
    refused(capsys, "tokenizer", "train", "--input", src, "--out", tmp_path / "t.json",
            "--vocab-size", "300", match="truncated")  # fmt: skip
    _, err = corpus_build(capsys, [src], tmp_path / "c")
    assert err[-1].startswith("azllm: error:") and "truncated" in err[-1], err
    assert not (tmp_path / "c").exists()


def test_tokenizer_refuses_a_stream_truncated_input(tmp_path, capsys):
    src = tmp_path / "a.txt.zst"
    data = zstd_streamed((TEXT * 4).encode("utf-8"))
    src.write_bytes(data[: len(data) // 2])
    refused(capsys, "tokenizer", "train", "--input", src, "--out", tmp_path / "t.json",
            "--vocab-size", "300", match="truncated")  # fmt: skip
    assert not (tmp_path / "t.json").exists()


# --- 5. nothing usable, over-long records ------------------------------------------------------


def test_corpus_of_nothing_usable_fails(tmp_path, capsys):
    empty = tmp_path / "x.txt.bz2"
    empty.write_bytes(b"")
    _, err = corpus_build(capsys, [empty], tmp_path / "c1")
    assert err[-1].startswith("azllm: error:") and "no document could be read" in err[-1], err
    binary = tmp_path / "bin"
    binary.mkdir()
    for i in range(3):
        (binary / f"b{i}.dat").write_bytes(bytes(range(256)) * 20)
    _, err = corpus_build(capsys, [binary], tmp_path / "c2")
    assert err[-1].startswith("azllm: error:") and "no document could be read" in err[-1], err
    assert "binary content" in err[-1]
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c2").exists()


def test_over_long_jsonl_record_is_skipped_in_bounded_memory(tmp_path, monkeypatch):
    from azllm.corpus import readers

    monkeypatch.setattr(readers, "MAX_RECORD_CHARS", 1 << 20, raising=False)
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "Salam dünya. " * ((24 << 20) // 13)}) + "\n")  # ~24 MB line
        f.write(json.dumps({"text": "Bakı gözəl şəhərdir."}) + "\n")
    files, _ = readers.expand_inputs([path])
    bad: list[str] = []
    tracemalloc.start()
    docs = [d.text for d in readers.read_documents(files, on_bad_record=lambda s, r: bad.append(r))]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 12 << 20, peak  # measured 4.2 MB; the line is 35 MB
    assert docs == ["Bakı gözəl şəhərdir."]
    assert len(bad) == 1 and "longer than" in bad[0]


def test_over_long_line_of_a_training_text_is_skipped_in_bounded_memory(
    tmp_path, monkeypatch, capsys
):
    from azllm.corpus import readers
    from azllm.documents import iter_all_documents

    monkeypatch.setattr(readers, "MAX_RECORD_CHARS", 1 << 20)
    huge = "Salam dünya. " * ((24 << 20) // 13)  # ~24 MB
    jsonl, txt = tmp_path / "a.jsonl", tmp_path / "b.txt"
    rows = [{"text": "Bakı gözəl şəhərdir."}, {"text": huge}, {"text": "Xəzər dənizi."}]
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    txt.write_text(f"Birinci abzas.\r\n\r\n{huge}\r\nSonuncu abzas.\r\n", encoding="utf-8")
    del huge
    tracemalloc.start()
    docs = list(iter_all_documents([jsonl, txt]))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 12 << 20, peak  # measured 4.2 MB; each file holds a 24 MB line
    assert docs == ["Bakı gözəl şəhərdir.", "Xəzər dənizi.", "Birinci abzas.", "Sonuncu abzas."]
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"azllm: warning: {jsonl}: skipped 1 line(s) longer than 1,048,576 characters (line 2)",
        f"azllm: warning: {txt}: skipped 1 line(s) longer than 1,048,576 characters (line 3)",
    ]
    with open(jsonl, "a") as f:  # line numbers count the skipped line
        f.write("{cut\n")
    with pytest.raises(AzllmError, match=r"a\.jsonl:4: not valid JSON"):
        list(iter_all_documents([jsonl]))


# --- 3. damaged metrics.jsonl ------------------------------------------------------------------

BAD_LINES = [b"[1, 2]", b"null", b'{"step": "x"}', b"\xff\xfe not utf-8", b'{"loss": 1}', b"{cut"]


def test_read_metrics_skips_damaged_lines_with_one_warning(tmp_path, capsys):
    from azllm.metrics import plot_loss, read_metrics

    good = [{"step": 1, "loss": 2.5}, {"step": 2, "val_loss": 2.4}]
    lines = [json.dumps(r).encode() for r in good]
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines[:1] + BAD_LINES + lines[1:]))
    assert read_metrics(tmp_path) == good
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 6 damaged line(s)" in err[0], err
    assert plot_loss(tmp_path) == tmp_path / "loss.png"


def test_plot_failure_is_a_warning(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    from azllm.metrics import plot_loss

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    assert plot_loss(tmp_path) is None
    assert "loss.png not written" in capsys.readouterr().err


def test_resume_with_damaged_metrics(tmp_path, capsys, data_dir):
    run = tmp_path / "run"
    train = ["train", "--config", "tiny", "--data", data_dir, "--out", run, "--precision", "fp32"]
    train += ["--set", "model.block_size=32", "train.ckpt_interval=2", "train.eval_interval=2"]
    assert main([str(a) for a in (*train, "--max-steps", "2")]) == 0
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\n".join(BAD_LINES) + b"\n")
    code, err = run_main(capsys, *train, "--max-steps", "4", "--resume")
    assert code == 0, err
    assert any("damaged line" in ln for ln in err), err
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


# --- 1. a full disk while training --------------------------------------------------------------

# A real short write in a real process: past RLIMIT_FSIZE the kernel refuses every write (EFBIG)
# to safetensors' Rust writer, DCP and torch.save alike, as a full disk refuses it (ENOSPC).
FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed at the limit
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


@pytest.mark.parametrize(
    "limit, eval_interval, failing, reason",
    [  # the first file over the limit: the weights at the first eval (safetensors, 560 kB: an
        # errno from Rust), or, eval at the end only, the DCP checkpoint (2.0 MB; torch's zip
        # writer: a RuntimeError with no errno)
        (100_000, 1, "best.safetensors", "File too large"),
        (1_000_000, 100, "checkpoints/step-2", "the write was cut short"),
    ],
)
def test_train_on_a_full_disk(tmp_path, data_dir, limit, eval_interval, failing, reason):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FILE_SIZE_LIMIT.format(limit=limit))
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    run = tmp_path / "run"
    proc = run_cli("train", "--config", "tiny", "--data", data_dir, "--out", run,
                   "--precision", "fp32", "--max-steps", "2", "--set", "model.block_size=32",
                   "train.ckpt_interval=2", f"train.eval_interval={eval_interval}",
                   env={"PYTHONPATH": pythonpath}, check=False)  # fmt: skip
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert err[-1].startswith("azllm: error:") and "Traceback" not in proc.stderr, proc.stderr
    assert f"{run / failing}: cannot write there ({reason}" in err[-1], err[-1]
    assert hidden_leftovers(run) == [] and not (run / failing).exists()


# --- 4. unwritable export targets --------------------------------------------------------------


@pytest.fixture(scope="module")
def export_run(tmp_path_factory, tokenizer_path) -> Path:
    return make_run(tokenizer_path, tmp_path_factory.mktemp("exp") / "run", block_size=64)


EXPORTS = {
    "gguf": ("gguf", "--type", "q8_0"),
    "hf": ("hf",),
    "ollama": ("ollama", "--type", "q8_0"),
}


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.mark.parametrize("kind", EXPORTS)
def test_export_below_a_file_is_refused(tmp_path, capsys, export_run, kind):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / ("m.gguf" if kind == "gguf" else "out")
    refused(capsys, "export", *EXPORTS[kind], "--run", export_run, "--out", out,
            match="is a file, not a folder")  # fmt: skip


@pytest.mark.parametrize("kind", EXPORTS)
def test_export_to_a_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch, export_run, kind):
    import safetensors.torch
    from safetensors import SafetensorError

    import azllm.export.gguf as gguf_mod

    def full_gguf(model, tok, cfg, path, kind, name="azllm"):
        Path(path).write_bytes(b"GGUF" + bytes(1000))  # part of it, then the disk is full
        raise OSError("212992 requested and 4096 written")  # numpy's tofile on ENOSPC

    def full_safetensors(sd, filename, metadata=None):
        Path(filename).write_bytes(bytes(1000))
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(gguf_mod, "write_gguf", full_gguf)
    monkeypatch.setattr(safetensors.torch, "save_file", full_safetensors)
    out = tmp_path / "dest" / ("m.gguf" if kind == "gguf" else "out")
    out.parent.mkdir()
    refused(capsys, "export", *EXPORTS[kind], "--run", export_run, "--out", out,
            match="no space left")  # fmt: skip
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("kind", EXPORTS)
def test_export_to_an_immutable_folder_is_refused(tmp_path, capsys, monkeypatch, export_run, kind):
    import safetensors.torch

    import azllm.export.gguf as gguf_mod

    def denied(*args, **kwargs):  # chattr +i (root cannot write either; chmod cannot show it)
        raise PermissionError(errno.EACCES, "Permission denied", str(args[-1]))

    monkeypatch.setattr(gguf_mod, "write_gguf", lambda model, tok, cfg, path, *a, **k: denied(path))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda sd, path, **k: denied(path))
    out = tmp_path / "dest" / ("m.gguf" if kind == "gguf" else "out")
    out.parent.mkdir()
    line = refused(capsys, "export", *EXPORTS[kind], "--run", export_run, "--out", out,
                   match=f"--out {out}: cannot write there (Permission denied)")  # fmt: skip
    assert "choose another place" in line
    assert list(out.parent.iterdir()) == []


# --- 6. temporary files of killed runs ---------------------------------------------------------


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, capsys, export_run):
    dead = dead_pid()
    out = tmp_path / "m.gguf"
    stale = [f".m.gguf.{dead}.tmp", f".m.gguf.{dead}.f32.tmp"]
    for name in stale:
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / ".m.gguf.1.tmp").write_bytes(b"pid 1 is alive: not ours to remove")
    assert (
        main(["export", "gguf", "--type", "q8_0", "--run", str(export_run), "--out", str(out)]) == 0
    )
    assert hidden_leftovers(tmp_path) == [".m.gguf.1.tmp"]

    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.txt").write_text(TEXT, encoding="utf-8")
    left = tmp_path / f".corpus.{dead}.k2j4h_x9.tmp"
    left.mkdir()
    (left / "train.jsonl.zst").write_bytes(b"half")
    code, err = corpus_build(capsys, [src], tmp_path / "corpus")
    assert code == 0, err
    assert not left.exists()


SLOW_EXPORT = """
import sys, time
from pathlib import Path
import azllm.export.gguf as g
def slow(model, tok, cfg, path, kind, name="azllm"):
    Path(path).write_bytes(b"GGUF half")
    print("writing", flush=True)
    time.sleep(60)
g.write_gguf = slow
from azllm.cli import main
from azllm.errors import AzllmError
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_export_removes_its_temporary_file(tmp_path, export_run):
    out = tmp_path / "m.gguf"
    args = ["export", "gguf", "--type", "q4_k_m", "--run", export_run, "--out", out]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    assert hidden_leftovers(tmp_path) == [f".m.gguf.{proc.pid}.f32.tmp"]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 130, proc.stderr.read()
    assert hidden_leftovers(tmp_path) == [] and not out.exists()


def test_leipzig_extraction_leaves_no_visible_or_stale_temporary(tmp_path, monkeypatch):
    import tarfile

    from azllm.corpus import download as dl

    name = "aze_wikipedia_2021_10K"
    data = "".join(f"{i}\tCümlə nömrə {i}.\n" for i in range(1, 1001)).encode()
    archive = tmp_path / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{name}/{name}-sentences.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out" / f"{name}-sentences.txt"
    out.parent.mkdir()
    seen: list[list[str]] = []
    real = tarfile.TarFile.extractfile

    def interrupted(self, member):  # a Ctrl-C half-way through the sentences
        src = real(self, member)

        def lines():
            for i, line in enumerate(src):
                if i == 500:
                    seen.append(sorted(p.name for p in out.parent.iterdir()))
                    raise KeyboardInterrupt
                yield line

        return ClosingIter(lines(), src)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dl.extract_leipzig_sentences(archive, out)
    assert seen == [[f".{out.name}.{os.getpid()}.tmp"]]  # hidden while written
    assert list(out.parent.iterdir()) == []
    monkeypatch.undo()

    stale = out.parent / f".{out.name}.{dead_pid()}.tmp"  # a killed run's
    stale.write_text("half")
    assert dl.extract_leipzig_sentences(archive, out) == 1000
    assert [p.name for p in out.parent.iterdir()] == [out.name]


class ClosingIter:
    """An iterator that is also a context manager closing `inner` (as extractfile's is)."""

    def __init__(self, it, inner):
        self.it, self.inner = it, inner

    def __iter__(self):
        return self.it

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()


def test_hidden_half_written_folders_are_not_read(tmp_path, capsys, tokenizer_path):
    from azllm.documents import iter_all_documents

    folder = tmp_path / "texts"
    (folder / ".corpus.123.abcd.tmp").mkdir(parents=True)
    (folder / "a.txt").write_text("Bakı gözəl şəhərdir.\n", encoding="utf-8")
    half = json.dumps({"text": "GİZLİ YARIMÇIQ"}) + "\n"
    (folder / ".corpus.123.abcd.tmp" / "train.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(half.encode())
    )
    (folder / ".notes.txt").write_text("GİZLİ\n", encoding="utf-8")
    assert list(iter_all_documents([folder])) == ["Bakı gözəl şəhərdir."]
    code, _ = run_main(capsys, "tokenizer", "stats", "--tokenizer", tokenizer_path,
                       "--text", folder)  # fmt: skip
    assert code == 0
