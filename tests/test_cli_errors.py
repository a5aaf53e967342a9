"""Users' mistakes give one line on stderr and exit code 2: never a traceback."""

import shutil

import pytest
from conftest import SAMPLE, run_cli


def fails(*args, match: str):
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("azllm: error:"), proc.stderr
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("r") / "run"
    run_cli(
        "train",
        "--config",
        "tiny",
        "--precision",
        "fp32",
        "--data",
        data_dir,
        "--out",
        run,
        "--max-steps",
        "4",
        "--ckpt-interval",
        "2",
        "--eval-interval",
        "2",
    )
    return run


def test_missing_empty_and_non_utf8_corpus(tmp_path, tokenizer_path):
    fails(
        "tokenizer",
        "train",
        "--input",
        tmp_path / "nope.txt",
        "--out",
        tmp_path / "t.json",
        match="no such file",
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    fails("tokenizer", "train", "--input", empty, "--out", tmp_path / "t.json", match="empty")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Gözəl gün\n".encode() + "çay və şəkər".encode("cp1254", "replace"))
    fails(
        "tokenize",
        "--tokenizer",
        tokenizer_path,
        "--input",
        latin,
        "--out",
        tmp_path / "d",
        match="not UTF-8",
    )
    assert not (tmp_path / "d").exists()
    fails(
        "tokenize",
        "--tokenizer",
        tmp_path / "none.json",
        "--input",
        latin,
        "--out",
        tmp_path / "d",
        match="tokenizer file not found",
    )


def test_data_dir_without_shards(tmp_path):
    (tmp_path / "data").mkdir()
    fails(
        "train",
        "--config",
        "tiny",
        "--data",
        tmp_path / "data",
        "--out",
        tmp_path / "run",
        match="no meta.json",
    )


def test_unknown_config_key_and_bad_values(tmp_path, data_dir):
    train = ["train", "--data", data_dir, "--out", tmp_path / "r"]
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[model]\nn_layers = 4\n')
    fails(*train, "--config", toml, match="unknown key 'n_layers'")
    toml.write_text("[train]\nlr = 'fast'\n")
    fails("model", "summary", "--config", toml, match="train.lr")
    fails(*train, "--config", "huge", match="neither a preset")
    fails(*train, "--config", "tiny", "--set", "model.n_head=5", match="divisible")
    fails(*train, "--config", "tiny", "--precision", "fp16", "--device", "cpu",
          match="fp16 needs a CUDA GPU")  # fmt: skip


def test_vocab_mismatch(tmp_path, run_dir):
    from azllm.documents import iter_all_documents
    from azllm.shards import tokenize_to_shards
    from azllm.tokenizer import AzTokenizer, train_tokenizer

    other = AzTokenizer(train_tokenizer(iter_all_documents([SAMPLE]), 400))
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    other.save(copy / "tokenizer.json")
    fails("generate", "--run", copy, "--prompt", "Salam", match="tokenizer.json has")
    data = tmp_path / "data"
    tokenize_to_shards(other, [SAMPLE], data, val_fraction=0.1, progress=False)
    fails(
        "train",
        "--config",
        "tiny",
        "--data",
        data,
        "--out",
        run_dir,
        "--resume",
        "--max-steps",
        "8",
        match="different tokenizer",
    )


def test_existing_run_needs_resume(run_dir, data_dir):
    fails("train", "--config", "tiny", "--data", data_dir, "--out", run_dir, match="--resume")


def test_corrupt_checkpoint(tmp_path, run_dir, data_dir):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ckpt = copy / "checkpoints" / "step-4"
    resume = ["train", "--config", "tiny", "--data", data_dir, "--out", copy, "--resume",
              "--max-steps", "8"]  # fmt: skip
    for name in ("__0_0.distcp", "trainer.pt"):
        whole = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(whole[: len(whole) // 2])
        fails(*resume, match="truncated or corrupt")
        (ckpt / name).write_bytes(whole)
    (ckpt / "trainer.pt").unlink()
    fails(*resume, match="trainer.pt is missing")
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    fails("generate", "--run", copy, "--prompt", "Salam", match="truncated or corrupt")
    text = tmp_path / "t.txt"
    text.write_text("Salam dünya.\n")
    fails("eval", "--run", tmp_path / "nothing", "--text", text, match="no such run")


class _Evil:
    """Unpickled by plain pickle, this would create a file: a stand-in for any command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_from_someone_else_cannot_run_code(tmp_path, run_dir, data_dir):
    import pickle

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "pwned"
    # os.system reached through a module DCP's metadata legitimately names (it imports os)
    mod, name = b"torch.distributed.checkpoint.metadata", b"os.system"
    cmd = f"touch {marker}".encode()
    via_metadata_module = b"".join([
        b"\x80\x04", pickle.SHORT_BINUNICODE, bytes([len(mod)]), mod,
        pickle.SHORT_BINUNICODE, bytes([len(name)]), name, pickle.STACK_GLOBAL,
        pickle.SHORT_BINUNICODE, bytes([len(cmd)]), cmd, pickle.TUPLE1, pickle.REDUCE, pickle.STOP,
    ])  # fmt: skip
    for evil in (pickle.dumps(_Evil(marker)), via_metadata_module):
        (copy / "checkpoints" / "step-4" / ".metadata").write_bytes(evil)
        fails("train", "--config", "tiny", "--data", data_dir, "--out", copy, "--resume",
              "--max-steps", "8", match="not allowed")  # fmt: skip
        assert not marker.exists()


def test_non_tensor_checkpoint_values_are_read_as_data_only(tmp_path):
    """DCP torch.loads non-tensor values (optimizer hyper-parameters) with weights_only=False;
    azllm's planner reads them as plain data first."""
    import io
    import pickle

    import torch

    from azllm.checkpoint import _CheckedPlanner

    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        _CheckedPlanner().load_bytes(None, buf)
    assert not marker.exists()


def test_prompt_longer_than_context(run_dir):
    fails(
        "generate",
        "--run",
        run_dir,
        "--prompt",
        "Azərbaycan dili " * 80,
        match="does not fit the model's context",
    )


def test_generate_and_eval_work_on_the_run(run_dir, tmp_path):
    import json

    out = run_cli(
        "generate",
        "--run",
        run_dir,
        "--prompt",
        "Bakı",
        "--prompt",
        "Bir gün",
        "--max-new-tokens",
        "8",
        "--seed",
        "1",
    ).stdout
    assert out.count("--- sample") == 2 and "Bakı" in out and "Bir gün" in out
    text = tmp_path / "held.txt"
    text.write_text("Bu gün hava çox gözəldir, uşaqlar parkda oynayır.\n")
    res = json.loads(run_cli("eval", "--run", run_dir, "--text", text, "--json").stdout)
    assert {"bpb", "loss", "tokens", "bytes", "perplexity"} <= set(res)
    assert res["bytes"] == len(text.read_text().encode())


def test_vram_budget_that_cannot_fit(tmp_path, data_dir):
    fails(
        "train",
        "--config",
        "az-100m",
        "--data",
        data_dir,
        "--out",
        tmp_path / "r",
        "--vram",
        "200MB",
        "--device",
        "cpu",
        match="smallest budget that fits is",
    )
    assert not (tmp_path / "r").exists()
    fails("plan", "--config", "baby", "--vram", "lots", match="lots")


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--num-samples", "0"], "--num-samples"),
    ],
)
def test_bad_sampling_flags_of_generate(run_dir, capsys, flags, named):
    from azllm.cli import main

    assert main(["generate", "--run", str(run_dir), "--prompt", "Salam", *flags]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"azllm: error: {named} must be"), err


def test_bad_sampling_flags_of_chat_fail_before_the_first_message(run_dir):
    # before, `azllm chat --top-p 0` started and failed at the first message
    proc = run_cli("chat", "--run", run_dir, "--top-p", "0", check=False, timeout=120)
    assert proc.returncode == 2 and "you>" not in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("azllm: error: --top-p must be"), proc.stderr
    fails("chat", "--run", run_dir, "--temperature", "-0.5", match="--temperature must be")


def test_an_output_path_under_a_file_is_one_line(tmp_path, tokenizer_path, data_dir):
    # Every command that writes: a file where its output folder should be is the filesystem's
    # refusal, reported in one line (it used to be a FileExistsError traceback, exit 1).
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    where = "a file is in the way of a folder of that name"
    fails("tokenizer", "train", "--input", SAMPLE, "--vocab-size", "300",
          "--out", blocker / "tok.json", match=where)  # fmt: skip
    fails("tokenize", "--tokenizer", tokenizer_path, "--input", SAMPLE,
          "--out", blocker / "data", match=where)  # fmt: skip
    fails("train", "--config", "tiny", "--data", data_dir, "--out", blocker / "run",
          "--max-steps", "1", match=where)  # fmt: skip
    assert blocker.read_text() == "x"
