"""The datatrove executor gives the same corpus as the plain path (when datatrove is installed).

The fixture is built from the bundled sample texts so that every global step is exercised
across datatrove tasks: with 2 tasks, file i goes to task i % 2, and the mixed JSONL file (task 0)
repeats a paragraph of the history file (task 1) exactly and one of the geography file nearly.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import zstandard

from azllm.corpus.pipeline import build_corpus
from azllm.errors import AzllmError

SAMPLE = Path(__file__).resolve().parents[1] / "azllm" / "data" / "sample"
requires_datatrove = pytest.mark.skipif(
    importlib.util.find_spec("datatrove") is None,
    reason="datatrove not installed (optional extra: pip install datatrove)",
)


def make_inputs(root: Path) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True)
    geo = (SAMPLE / "01_cografiya.txt").read_text(encoding="utf-8")
    hist = (SAMPLE / "02_tarix.txt").read_text(encoding="utf-8")
    science = (SAMPLE / "05_elm.txt").read_text(encoding="utf-8")
    geo_p, hist_p = geo.split("\n\n"), hist.split("\n\n")
    (raw / "a_cografiya.txt").write_text(geo, encoding="utf-8")  # file 0 -> task 0
    (raw / "b_tarix.txt").write_text(hist, encoding="utf-8")  # file 1 -> task 1
    records = [
        {"text": hist_p[2]},  # exact duplicate of file 1's block: found across tasks
        {"text": geo_p[1].replace("Rusiya", "Rusiya Federasiyası")},  # near duplicate
        {"text": "Türkiye'nin en büyük şehri İstanbul'dur. Şehir, Boğaz'ın iki yakasında "
         "kurulmuştur ve tarih boyunca birçok medeniyete ev sahipliği yapmıştır."},
        "{not json",
        {"text": "The Caspian Sea is the largest enclosed inland body of water on Earth. It "
         "lies between Europe and Asia, east of the Caucasus Mountains."},
        {"body": "a record without the text field"},
        {"text": science.split("\n\n")[0]},
    ]  # fmt: skip
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    (raw / "c_mix.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")  # file 2
    whole = gzip.compress((SAMPLE / "03_metbex.txt").read_bytes())
    (raw / "d_truncated.txt.gz").write_bytes(whole[: len(whole) // 2])  # file 3: read error
    (raw / "e_elm.txt").write_text(science, encoding="utf-8")  # file 4: repeats c's last record
    (raw / "f_picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # skipped
    return raw


def records(path: Path) -> list[dict]:
    data = zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read()
    return [json.loads(line) for line in data.decode().splitlines()]


def comparable(report_path: Path) -> dict:
    report = json.loads(report_path.read_text(encoding="utf-8"))
    for key in ("config", "seconds", "mb_per_s"):  # how it ran, not what it produced
        report.pop(key)
    return report


def test_missing_datatrove_is_a_one_line_error(tmp_path, monkeypatch):
    # Load a private copy of the module as if datatrove were not installed.
    for name in ("datatrove", "datatrove.data", "datatrove.pipeline", "datatrove.pipeline.base"):
        monkeypatch.setitem(sys.modules, name, None)
    path = Path(__file__).resolve().parents[1] / "azllm" / "corpus" / "datatrove_exec.py"
    spec = importlib.util.spec_from_file_location("azllm.corpus._datatrove_probe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "a.txt").write_text("Salam dünya.\n", encoding="utf-8")
    with pytest.raises(AzllmError, match=r"pip install 'datatrove") as exc:
        module.build_corpus_datatrove([tmp_path / "a.txt"], tmp_path / "out")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()


@requires_datatrove
def test_datatrove_path_gives_the_plain_paths_corpus(tmp_path):
    from azllm.corpus.datatrove_exec import build_corpus_datatrove

    raw = make_inputs(tmp_path)
    settings = dict(lang="az", dedup="near", val_fraction=0.2)
    build_corpus([raw], tmp_path / "plain", workers=1, progress=False, **settings)
    summary = build_corpus_datatrove([raw], tmp_path / "dt", tasks=2, workers=2, **settings)

    plain, dt = tmp_path / "plain", tmp_path / "dt"
    assert sorted(p.name for p in dt.iterdir()) == sorted(p.name for p in plain.iterdir())
    for name in ("train.jsonl.zst", "val.jsonl.zst"):
        assert records(dt / name) == records(plain / name)
        assert (dt / name).read_bytes() == (plain / name).read_bytes()  # byte for byte
    assert comparable(dt / "report.json") == comparable(plain / "report.json")

    # The fixture really exercised the global steps across tasks (read from the plain report).
    report = json.loads((plain / "report.json").read_text(encoding="utf-8"))
    removed = {r["reason"]: r for r in report["removed"]}
    assert {"duplicate:exact", "duplicate:near"} <= removed.keys()
    assert any(k.startswith("language:") for k in removed), removed.keys()
    files = sorted(p.name for p in raw.iterdir() if p.suffix != ".png")
    task_of = {f"raw/{name}": i % 2 for i, name in enumerate(files)}
    cross_task = [
        c
        for c in report["duplicate_clusters"]
        for ex in c["examples"]
        if task_of[c["id"].split("#")[0]] != task_of[ex.split("#")[0]]
    ]
    assert cross_task, report["duplicate_clusters"]
    assert report["skipped_file_count"] == 2 and sum(report["bad_records"].values()) == 2
    assert min(report["splits"]["train"]["docs"], report["splits"]["val"]["docs"]) > 0

    config = json.loads((dt / "report.json").read_text(encoding="utf-8"))["config"]
    assert config["executor"] == "datatrove" and config["tasks"] == 2
    assert "duplicate:exact" in summary
    assert not (tmp_path / ".dt.datatrove").exists()  # WORK removed after a good run


@requires_datatrove
def test_cli_options_and_errors(tmp_path, capsys):
    from azllm.corpus.datatrove_exec import add_datatrove_arguments, run_build_datatrove
    from azllm.corpus.process import BuildConfig

    raw = make_inputs(tmp_path)
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", nargs="+")
    parser.add_argument("--out")
    parser.add_argument("--force", action="store_true")
    add_datatrove_arguments(parser)
    argv = ["--input", str(raw), "--out", str(tmp_path / "out"), "--executor", "datatrove"]
    args = parser.parse_args([*argv, "--tasks", "1", "--keep-work"])
    assert run_build_datatrove(args, BuildConfig(workers=1)) == 0
    assert "corpus build report" in capsys.readouterr().out
    assert records(tmp_path / "out" / "train.jsonl.zst")
    work = tmp_path / ".out.datatrove"
    assert (work / "DONE").exists() and not (work / "processed").exists()

    with pytest.raises(AzllmError, match="not empty"):  # the plain path's argument checks
        run_build_datatrove(args, BuildConfig(workers=1))
    args = parser.parse_args([*argv, "--force", "--datatrove-executor", "slurm"])
    with pytest.raises(AzllmError, match="--slurm-partition"):
        run_build_datatrove(args, BuildConfig(workers=1))
    (tmp_path / "notwork").mkdir()
    (tmp_path / "notwork" / "precious.txt").write_text("keep me")
    args = parser.parse_args([*argv, "--force", "--work-dir", str(tmp_path / "notwork")])
    with pytest.raises(AzllmError, match="not an azllm work folder"):
        run_build_datatrove(args, BuildConfig(workers=1))
    assert (tmp_path / "notwork" / "precious.txt").exists()


def test_merge_without_stage_one_shards_writes_nothing(tmp_path):
    from azllm.corpus.datatrove_exec import merge_dedup_write
    from azllm.corpus.process import BuildConfig

    (tmp_path / "work" / "processed").mkdir(parents=True)
    with pytest.raises(AzllmError, match="shards missing"):
        merge_dedup_write(
            tmp_path / "work", tmp_path / "out", [], [], BuildConfig(), {}, 2, force=False
        )
    assert not (tmp_path / "out").exists()


@requires_datatrove
def test_rerun_after_a_failed_task_resumes_only_that_task(tmp_path, monkeypatch):
    from azllm.corpus import datatrove_exec as dx

    raw = make_inputs(tmp_path)
    build_corpus([raw], tmp_path / "plain", workers=1, progress=False)
    ranks_run = []
    original = dx.ProcessedWriter.run

    def flaky(self, data, rank=0, world_size=1):
        ranks_run.append(rank)
        if rank == 1 and ranks_run.count(1) == 1:
            raise OSError("disk full (simulated)")
        yield from original(self, data, rank, world_size)

    monkeypatch.setattr(dx.ProcessedWriter, "run", flaky)
    with pytest.raises(OSError, match="simulated"):  # workers=1: tasks run in this process
        dx.build_corpus_datatrove([raw], tmp_path / "dt", tasks=2, workers=1)
    assert not (tmp_path / "dt").exists()
    assert ranks_run == [0, 1]
    dx.build_corpus_datatrove([raw], tmp_path / "dt", tasks=2, workers=1)
    assert ranks_run == [0, 1, 1]  # task 0's shard was kept and not redone
    for name in ("train.jsonl.zst", "val.jsonl.zst"):
        assert (tmp_path / "dt" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
