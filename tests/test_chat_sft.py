import json

import pytest
import torch
from conftest import run_cli, shared_path

from azllm.chat.data import ChatBatches, load_conversations, to_messages
from azllm.checkpoint import load_run
from azllm.errors import AzllmError
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
    assert ids == tok.encode(render_chat(CONV))  # piecewise == the template text encoded whole
    data = ChatBatches([CONV], tok, tokenizer_path, block_size=128, seed=0, val_fraction=0.0)
    x, y = data.batch("train", 0, 1)
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
        f"Bakı Xəzər dənizinin sahilindədir.{END}Gəncə ölkənin qərbindədir.{END}")
    assert (y[0, n:] == -1).all() and (x[0, n:] == tok.pad_id).all()  # padding is never trained


def test_record_shapes_and_validation(tmp_path):
    alpaca = to_messages({"instruction": "Tərcümə et", "input": "hello", "output": "salam"}, "x")
    assert alpaca == [{"role": "user", "content": "Tərcümə et\n\nhello"},
                      {"role": "assistant", "content": "salam"}]
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
    data = ChatBatches(load_conversations(data_paths), tok, tokenizer_path, cfg.model.block_size,
                       seed=cfg.train.seed, val_fraction=0.1)
    rows = data.rows["val"]
    assert len(rows) > 5
    x = torch.full((len(rows), cfg.model.block_size), tok.pad_id)
    y = torch.full((len(rows), cfg.model.block_size), -1)
    for i, (ids, targets) in enumerate(rows):
        x[i, : len(ids)], y[i, : len(targets)] = torch.tensor(ids), torch.tensor(targets)
    with torch.no_grad():
        return model(x, y)[1].item()


def test_sft_lowers_held_out_chat_loss(tmp_path, tiny_run):
    chat = shared_path("data", "az", "chat")
    out = tmp_path / "chat_run"
    run_cli("sft", "--run", tiny_run, "--data", chat, "--out", out, "--max-steps", "80",
            "--lr", "3e-3", "--precision", "fp32", "--eval-interval", "40")
    before = _held_out_loss(tiny_run, [chat], tiny_run / "tokenizer.json")
    after = _held_out_loss(out, [chat], out / "tokenizer.json")
    assert after < before - 0.3, (before, after)
    vals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]
    assert len(vals) == 2 and vals[1]["val_loss"] < vals[0]["val_loss"]  # held-out loss falls
    assert (out / "tokenizer.json").read_text() == (tiny_run / "tokenizer.json").read_text()
