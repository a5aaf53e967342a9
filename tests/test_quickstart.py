import json

from conftest import run_cli


def test_quickstart_runs_the_whole_chain(tmp_path):
    out = tmp_path / "qs"
    proc = run_cli("quickstart", "--out", out, "--minutes", "0.3")
    summary = json.loads((out / "quickstart.json").read_text())
    for f in (
        "tokenizer.json",
        "data/meta.json",
        "run/model.safetensors",
        "run/loss.png",
        "run/metrics.jsonl",
    ):
        assert (out / f).exists(), f
    losses = [
        json.loads(line)["loss"]
        for line in (out / "run/metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert losses[-1] < losses[0] - 0.5  # the loss falls
    assert summary["val_bpb"] > 0 and summary["steps"] >= 20
    assert "bits per byte" in proc.stdout
    assert proc.stdout.count("» ") == 3  # three samples printed


def test_quickstart_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    proc = run_cli("quickstart", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (tmp_path / "mine.txt").read_text() == "precious"
