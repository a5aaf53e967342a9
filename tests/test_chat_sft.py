import json
import shutil

import pytest
import torch
from conftest import SAMPLE, run_cli, shared_path
from tokenizers import Tokenizer

from azllm.chat.data import ChatBatches, is_val, load_conversations, pack_rows, to_messages
from azllm.checkpoint import load_run
from azllm.config import ModelConfig
from azllm.errors import AzllmError
from azllm.model import GPT
from azllm.tokenizer import END, render_chat

CONV = [
    {"role": "system", "content": "Sən nəzakətli köməkçisən."},
    {"role": "user", "content": "Salam! Bakı haradadır?"},
    {"role": "assistant", "content": "Bakı Xəzər dənizinin sahilindədir."},
    {"role": "user", "content": "Bəs Gəncə?"},
    {"role": "assistant", "content": "Gəncə ölkənin qərbindədir."},
]


def test_loss_mask_covers_exactly_the_assistant_tokens(tok, tokenizer_path):
    ids, mask = tok.encode_chat(CONV)
    # piecewise == the template text encoded whole with special strings parsed (as HF and
    # llama.cpp do); our encode() keeps them text, so parse with a plain copy of the tokenizer
    assert ids == Tokenizer.from_str(tok.to_json()).encode(render_chat(CONV)).ids
    data = ChatBatches(
        [CONV], tok, tokenizer_path, block_size=128, seed=0, val_fraction=0.0, pack=False
    )
    b = data.batch("train", 0, 1)
    x, y = b.inputs, b.targets
    assert b.segments is None
    n = len(ids) - 1
    assert x[0, :n].tolist() == ids[:-1]
    # targets at position i predict token i+1; trained exactly when token i+1 is the assistant's
    trained = [t for t in y[0, :n].tolist() if t != -1]
    expected = []
    for m in CONV:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + [tok.end_id]
    assert trained == expected
    assert tok.decode(trained, skip_special=False) == (
        f"Bakı Xəzər dənizinin sahilindədir.{END}Gəncə ölkənin qərbindədir.{END}"
    )
    assert (y[0, n:] == -1).all() and (x[0, n:] == tok.pad_id).all()  # padding is never trained


def test_record_shapes_and_validation(tmp_path):
    alpaca = to_messages({"instruction": "Tərcümə et", "input": "hello", "output": "salam"}, "x")
    assert alpaca == [
        {"role": "user", "content": "Tərcümə et\n\nhello"},
        {"role": "assistant", "content": "salam"},
    ]
    dsum = to_messages({"dialogue": "A: Salam\nB: Salam", "summary": "Salamlaşdılar."}, "x")
    assert dsum[1] == {"role": "assistant", "content": "Salamlaşdılar."}
    f = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CONV[1:3]}, ensure_ascii=False)
    f.write_text(good + "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(AzllmError, match=r"chat.jsonl:2: messages\[0\].role 'bot'"):
        load_conversations([f])
    f.write_text(good + "\n{broken\n")
    with pytest.raises(AzllmError, match=r"chat.jsonl:2: not valid JSON"):
        load_conversations([f])
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "tək"}]}) + "\n")
    with pytest.raises(AzllmError, match="no assistant message"):
        load_conversations([f])


def _held_out_loss(run, data_paths, tokenizer_path) -> float:
    model, tok, cfg = load_run(run)
    data = ChatBatches(
        load_conversations(data_paths),
        tok,
        tokenizer_path,
        cfg.model.block_size,
        seed=cfg.train.seed,
        val_fraction=0.1,
    )
    assert data.count("val") > 5
    x, y, seg = data.take("val", range(len(data.rows["val"]))).tensors()
    with torch.no_grad():
        return model(x, y, segments=seg)[1].item()


def test_sft_lowers_held_out_chat_loss(tmp_path, tiny_run):
    chat = shared_path("data", "az", "chat")
    out = tmp_path / "chat_run"
    run_cli(
        "sft",
        "--run",
        tiny_run,
        "--data",
        chat,
        "--out",
        out,
        "--max-steps",
        "80",
        "--lr",
        "3e-3",
        "--precision",
        "fp32",
        "--eval-interval",
        "40",
    )
    before = _held_out_loss(tiny_run, [chat], tiny_run / "tokenizer.json")
    after = _held_out_loss(out, [chat], out / "tokenizer.json")
    assert after < before - 0.3, (before, after)
    vals = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "val_loss" in line
    ]
    assert len(vals) == 2 and vals[1]["val_loss"] < vals[0]["val_loss"]  # held-out loss falls
    assert (out / "tokenizer.json").read_text() == (tiny_run / "tokenizer.json").read_text()


def _dialogues() -> list[list[dict]]:
    """Conversations of many lengths from the bundled dialogues: each dialogue, and its first
    two and four lines, as alternating user/assistant turns."""
    text = (SAMPLE / "04_dialoqlar.txt").read_text(encoding="utf-8")
    convs = []
    for block in text.split("\n\n"):
        lines = [line.lstrip("— ").strip() for line in block.splitlines() if line.strip()]
        for n in (2, 4, len(lines)):
            turns = lines[: n - n % 2]
            if len(turns) >= 2:
                convs.append(
                    [
                        {"role": ("user", "assistant")[i % 2], "content": t}
                        for i, t in enumerate(turns)
                    ]
                )
    return convs


def _segments_of(x, y, seg, pad_id) -> list[tuple[tuple, tuple]]:
    """(inputs, targets) of every conversation in packed rows; the padding segment left out."""
    out = []
    for r in range(x.shape[0]):
        for s in seg[r].unique().tolist():
            at = seg[r] == s
            xs, ys = tuple(x[r, at].tolist()), tuple(y[r, at].tolist())
            if all(t == pad_id for t in xs):
                assert all(t == -1 for t in ys) and s == seg[r].max()  # padding: last, untrained
            else:
                out.append((xs, ys))
    return out


def test_pack_rows_places_every_item_once_within_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 101, (500,), generator=g).tolist()
    rows = pack_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert rows == pack_rows(lengths, 100)  # deterministic
    # fewer rows than filling in order (next-fit), and close to the bound sum/capacity
    sequential, room = 0, 0
    for n in lengths:
        if n > room:
            sequential, room = sequential + 1, 100
        room -= n
    assert -(-sum(lengths) // 100) <= len(rows) < sequential
    assert len(rows) <= 1.05 * sum(lengths) / 100 + 1


@pytest.mark.parametrize("source", ["bundled", "shared"])
def test_packing_keeps_every_trained_token_and_cuts_padding(source, tok, tokenizer_path):
    convs = (
        _dialogues()
        if source == "bundled"
        else load_conversations([shared_path("data", "az", "chat")])
    )
    block = 512
    packed, plain = (
        ChatBatches(convs, tok, tokenizer_path, block, seed=0, val_fraction=0.2, pack=p)
        for p in (True, False)
    )
    for split in ("train", "val"):
        assert packed.count(split) == plain.count(split) > 3
        assert packed.trained_tokens(split) == plain.trained_tokens(split)
        assert packed.bytes_per_token(split) == plain.bytes_per_token(split)
        x, y, seg = packed.take(split, range(len(packed.rows[split]))).tensors()
        # each conversation encoded alone, targets on the assistant's tokens: the same multiset,
        # so no target crosses from one conversation into the next
        expected = []
        for m in convs:
            if (split == "val") == is_val(m, 0.2):
                ids, mask = tok.encode_chat(m)
                ids, mask = ids[: block + 1], mask[: block + 1]
                targets = [t if k else -1 for t, k in zip(ids[1:], mask[1:], strict=True)]
                expected.append((tuple(ids[:-1]), tuple(targets)))
        assert sorted(_segments_of(x, y, seg, tok.pad_id)) == sorted(expected)
        assert (y != -1).sum() == plain.trained_tokens(split)
    # one conversation per row wastes most of a 512-token row; packed, a few percent
    assert plain.padding_fraction("train") > 0.5
    assert packed.padding_fraction("train") < min(0.15, plain.padding_fraction("train") / 4)
    assert len(packed.rows["train"]) < len(plain.rows["train"]) / 2


def test_packed_loss_equals_the_loss_of_the_conversations_alone(tok, tokenizer_path):
    convs = _dialogues()
    packed, plain = (
        ChatBatches(convs, tok, tokenizer_path, 128, seed=0, val_fraction=0.0, pack=p)
        for p in (True, False)
    )
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)
    ).eval()
    rows = [r for r, held in enumerate(packed.rows["train"]) if len(held) >= 2][:4]
    assert len(rows) == 4
    x, y, seg = packed.take("train", rows).tensors()
    picked = [c for r in rows for c in packed.rows["train"][r]]
    xs, ys = plain.take(
        "train", picked
    ).tensors()  # one conversation per row: the same trained tokens
    with torch.no_grad():
        logits, loss_packed = model(x, y, segments=seg)
        _, loss_plain = model(xs, ys)  # mean over all trained tokens: token-weighted
        mixed, _ = model(x, y)  # without segments, the conversations would see each other
    assert loss_packed.item() == pytest.approx(loss_plain.item(), abs=1e-5)
    trained = y != -1
    assert (mixed[trained] - logits[trained]).abs().max() > 1e-3


def test_sft_length_is_set_in_epochs_unless_steps_are_given(tmp_path, tiny_run):
    import math

    chat = shared_path("data", "az", "chat")
    model, tok, cfg = load_run(tiny_run)
    rows = len(
        ChatBatches(
            load_conversations([chat]), tok, tiny_run / "tokenizer.json",
            cfg.model.block_size, seed=cfg.train.seed,
        ).rows["train"]
    )  # fmt: skip
    common = ["--run", tiny_run, "--data", chat, "--precision", "fp32", "--micro-batch", "16"]
    out = tmp_path / "epochs"
    printed = run_cli("sft", *common, "--out", out, "--epochs", "0.5").stdout
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["max_steps"] == math.ceil(0.5 * rows / 16) > 1
    assert saved["warmup_steps"] <= saved["max_steps"] // 10
    assert f"0.5 epochs of {rows} rows: {saved['max_steps']} steps" in printed
    out = tmp_path / "steps"
    run_cli("sft", *common, "--out", out, "--epochs", "0.5", "--max-steps", "3")
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 3
    # A base pretrained with Muon (the presets from baby up) is fine-tuned with AdamW, whose
    # learning rates SFT's defaults are; --set train.optimizer=muon would still choose Muon.
    muon_base = tmp_path / "muon-base"
    shutil.copytree(tiny_run, muon_base)
    cfg_json = json.loads((muon_base / "config.json").read_text())
    cfg_json["train"]["optimizer"] = "muon"
    (muon_base / "config.json").write_text(json.dumps(cfg_json))
    out = tmp_path / "from-muon"
    run_cli("sft", *common[2:], "--run", muon_base, "--out", out, "--max-steps", "1")
    assert json.loads((out / "config.json").read_text())["train"]["optimizer"] == "adamw"
    proc = run_cli("sft", *common, "--out", tmp_path / "x", "--epochs", "0", check=False)
    assert proc.returncode == 2 and "--epochs 0" in proc.stderr


def test_sft_resume_continues_after_the_checkpoint(tmp_path, tiny_run):
    """An SFT run interrupted after its step-4 checkpoint and resumed: steps 1-4 are not rerun,
    and the loss curve equals the uninterrupted run's bit for bit (dropout on, so the restored
    RNG state matters too)."""
    import shutil

    from conftest import assert_resumed_after, mark_logged_steps

    from azllm.metrics import read_metrics

    chat = shared_path("data", "az", "chat")
    common = ["--run", tiny_run, "--data", chat, "--precision", "fp32", "--micro-batch", "4",
              "--max-steps", "8", "--ckpt-interval", "4", "--eval-interval", "4",
              "--log-interval", "1", "--set", "model.dropout=0.1"]  # fmt: skip
    ref = tmp_path / "ref"
    run_cli("sft", *common, "--out", ref)
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step-8")  # as if killed after the step-4 checkpoint
    mark_logged_steps(run, 4)
    run_cli("sft", *common, "--out", run, "--resume")
    assert_resumed_after(run, 4, 8)

    def losses(r):
        return [(m["step"], m["loss"]) for m in read_metrics(r) if "loss" in m]

    assert losses(run) == losses(ref)


def test_sft_logs_task_accuracy_in_chat_form(tmp_path, tiny_run):
    """`azllm sft --eval-tasks`: chat-form task scores in metrics.jsonl at the chosen interval,
    equal to `azllm eval --chat` on the final weights, and loss.png's second panel."""
    from PIL import Image

    from azllm.metrics import read_metrics

    chat = shared_path("data", "az", "chat")
    common = ["--run", tiny_run, "--data", chat, "--precision", "fp32", "--micro-batch", "4",
              "--max-steps", "4", "--eval-interval", "4", "--eval-tasks", "az-basic",
              "--eval-tasks-limit", "8"]  # fmt: skip
    out = tmp_path / "sft"
    run_cli("sft", *common, "--out", out, "--eval-tasks-every", "2")
    logged = [r for r in read_metrics(out) if "tasks" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert all(set(r["tasks"]) == {"az-basic-mc", "az-basic-qa"} for r in logged)
    proc = run_cli("eval", "--run", out, "--tasks", "az-basic", "--limit", "8", "--chat", "--json")
    final = {s["task"]: s.get("acc", s.get("exact_match")) for s in map(json.loads,
             proc.stdout.splitlines())}  # fmt: skip
    assert final == logged[-1]["tasks"]
    assert Image.open(out / "loss.png").size[1] > 600  # two panels (one panel: 400 px high)
    for every in ("0", "-2"):  # not the default interval in disguise: refused in one line
        proc = run_cli("sft", *common, "--out", tmp_path / every, "--eval-tasks-every", every,
                       check=False)  # fmt: skip
        assert proc.returncode == 2 and f"--eval-tasks-every {every}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / every).exists()
