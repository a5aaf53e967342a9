"""A model is built from a run's files only when they agree: every tensor the config implies is
there with its shape and nothing is left over, the config recorded with the weights equals
config.json's model part, and tokenizer.json is the tokenizer the weights were trained with.
One check (checkpoint.load_weights) serves generate, chat, serve, eval, export and SFT init."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from chat_fixtures import make_run
from conftest import SAMPLE, shared_path

from azllm.cli import main


def refused(capsys, *args, match: str) -> str:
    code = main([str(a) for a in args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("azllm: error:"), err
    assert match in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tokenizer_path) -> Path:
    return make_run(tokenizer_path, tmp_path_factory.mktemp("strict") / "run", block_size=64)


def edited(base: Path, dest: Path, **model) -> Path:
    shutil.copytree(base, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["model"].update(model)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def strip_metadata(run: Path) -> None:
    """Weights as azllm wrote them before it recorded config and tokenizer."""
    from safetensors.torch import load_file, save_file

    path = run / "model.safetensors"
    save_file(load_file(str(path)), str(path))


GENERATE = ("generate", "--prompt", "Salam", "--max-new-tokens", "2", "--run")

EDITS = {
    "one layer more": ({"n_layer": 3}, "n_layer=3"),
    "untied lm_head": ({"tie_embeddings": False}, "tie_embeddings=False"),
    "fewer heads, same shapes": ({"n_head": 2, "n_kv_head": 2}, "n_head=2"),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_config_that_does_not_match_the_weights_is_refused(tmp_path, capsys, base_run, edit):
    model, match = EDITS[edit]
    run = edited(base_run, tmp_path / "run", **model)
    refused(capsys, *GENERATE, run, match=match)


def test_every_command_that_loads_a_run_refuses(tmp_path, capsys, base_run):
    run = edited(base_run, tmp_path / "run", n_layer=3)
    text = tmp_path / "t.txt"
    text.write_text("Bakı Azərbaycanın paytaxtıdır.\n", encoding="utf-8")
    refused(capsys, "eval", "--run", run, "--text", text, match="n_layer=3")
    refused(capsys, "export", "hf", "--run", run, "--out", tmp_path / "hf", match="n_layer=3")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    "model, match",
    [
        ({"n_layer": 3}, "missing blocks.2."),
        ({"n_layer": 1}, "not in the model blocks.1."),
        ({"tie_embeddings": False}, "missing lm_head.weight"),
        ({"ffn_hidden": 64}, "wrong shape blocks.0.mlp"),
    ],
)
def test_tensors_are_checked_without_recorded_config(tmp_path, capsys, base_run, model, match):
    run = edited(base_run, tmp_path / "run", **model)
    strip_metadata(run)
    refused(capsys, *GENERATE, run, match=match)


def test_weights_without_metadata_still_load(tmp_path, capsys, base_run):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    strip_metadata(run)
    assert main([str(a) for a in (*GENERATE, run)]) == 0


def test_other_tokenizer_of_the_same_size_is_refused(tmp_path, capsys, base_run, tok):
    from azllm.documents import iter_all_documents
    from azllm.tokenizer import AzTokenizer, train_tokenizer

    files = sorted(SAMPLE.glob("*.txt"))[:4]
    other = AzTokenizer(train_tokenizer(iter_all_documents(files), tok.vocab_size))
    assert other.vocab_size == tok.vocab_size and other.sha256() != tok.sha256()
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    other.save(run / "tokenizer.json")
    refused(capsys, *GENERATE, run, match="different tokenizer")


def test_fields_that_do_not_change_the_weights_may_change(tmp_path, base_run):
    run = edited(base_run, tmp_path / "run", dropout=0.1, block_size=32)
    assert main([str(a) for a in (*GENERATE, run)]) == 0


def test_sft_refuses_a_base_run_that_does_not_match(tmp_path, capsys, base_run):
    chat = shared_path("data", "az", "chat")
    run = edited(base_run, tmp_path / "base", n_head=2, n_kv_head=2)
    args = ["sft", "--run", run, "--data", chat, "--out", tmp_path / "chat", "--max-steps", "1"]
    refused(capsys, *args, "--precision", "fp32", match="n_head=2")


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, capsys, data_dir):
    train = ["train", "--config", "tiny", "--data", data_dir, "--out", tmp_path / "run"]
    train += ["--precision", "fp32", "--set", "model.block_size=32", "train.ckpt_interval=2"]
    assert main([str(a) for a in (*train, "--max-steps", "2")]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["model"].update(n_head=2, n_kv_head=2)  # every shape stays the same
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    resume = [*train, "model.n_head=2", "model.n_kv_head=2", "--max-steps", "4", "--resume"]
    refused(capsys, *resume, match="n_head=2")
