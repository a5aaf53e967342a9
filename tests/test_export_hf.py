"""`azllm export hf`, checked by transformers itself, offline: the exported folder loads with
AutoModelForCausalLM/AutoTokenizer and computes our logits, our token ids, our chat text."""

from __future__ import annotations

import json
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from export_fixtures import (  # noqa: E402
    CHAT,
    PARAGRAPH,
    PROMPTS,
    random_run,
    run_export_cli,
    trained_run,
)

from azllm.checkpoint import load_run  # noqa: E402
from azllm.errors import AzllmError  # noqa: E402
from azllm.export.hf import export_hf  # noqa: E402
from azllm.generate import generate  # noqa: E402
from azllm.tokenizer import END, render_chat  # noqa: E402


@pytest.fixture(scope="module", params=["llama", "gpt2", "llama-untied"])
def exported(request, tmp_path_factory):
    name = request.param
    run = random_run("llama", tie=False) if name == "llama-untied" else trained_run(name)
    out = export_hf(run, tmp_path_factory.mktemp("hf") / name)
    model, tok, cfg = load_run(run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return {"run": run, "out": out, "model": model, "tok": tok, "cfg": cfg, "hf": hf}


def test_class_and_config(exported):
    cfg, hf = exported["cfg"].model, exported["hf"]
    expected = "LlamaForCausalLM" if cfg.arch == "llama" else "GPT2LMHeadModel"
    assert type(hf).__name__ == expected
    assert hf.config.vocab_size == cfg.vocab_size
    assert sum(p.numel() for p in hf.parameters()) == exported["model"].num_params()
    if cfg.arch == "llama":
        assert hf.config.num_key_value_heads == cfg.kv_heads
    tied = hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert tied == cfg.tie_embeddings


def test_logits_equal_ours_on_a_padded_batch(exported):
    tok, model, hf = exported["tok"], exported["model"], exported["hf"]
    ids = [tok.encode(p) for p in PROMPTS]
    longest = max(map(len, ids))
    x = torch.full((len(ids), longest), tok.pad_id)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, row in enumerate(ids):  # right padding: real positions see only real tokens
        x[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(input_ids=x, attention_mask=mask).logits
    for i, row in enumerate(ids):
        n = len(row)
        diff = (ours[i, :n] - theirs[i, :n]).abs().max().item()
        assert diff < 1e-4, f"prompt {i}: max |logit difference| {diff}"
    # the comparison is not vacuous: logits are far from uniform
    assert ours.std().item() > 0.5


def test_greedy_generation_equals_ours(exported):
    tok, model, hf = exported["tok"], exported["model"], exported["hf"]
    prompt = tok.encode(PROMPTS[1])
    ours = generate(model, [prompt], max_new_tokens=16, temperature=0, eos_id=tok.eos_id)[0]
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    theirs = [t for t in out[0, len(prompt) :].tolist() if t != tok.eos_id]
    assert theirs == ours


def test_autotokenizer_gives_our_ids(exported):
    tok = exported["tok"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported["out"])
    for text in [PARAGRAPH, *PROMPTS, "ə ı ğ ş ç ö ü İ Ə I Ğ Ş Ç Ö Ü i"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    # special strings in text: text for us; HF parses them unless told not to (README)
    assert hf_tok(f"a{END}b", split_special_tokens=True)["input_ids"] == tok.encode(f"a{END}b")


def test_chat_template_renders_ours(exported):
    tok = exported["tok"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported["out"])
    for convo in (CHAT, CHAT[1:2], CHAT[:3]):
        for gen in (True, False):
            text = hf_tok.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen)
            assert text == render_chat(convo, add_generation_prompt=gen)
    ids = hf_tok.apply_chat_template(
        CHAT, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert list(ids) == tok.encode_chat(CHAT, add_generation_prompt=True)[0]


def test_generation_config(exported):
    tok = exported["tok"]
    gc = transformers.GenerationConfig.from_pretrained(exported["out"])
    end_id = tok.tok.token_to_id(END)
    assert gc.bos_token_id == tok.bos_id
    assert gc.pad_token_id == tok.pad_id
    assert sorted(gc.eos_token_id) == sorted([tok.eos_id, end_id])
    raw = json.loads((exported["out"] / "tokenizer_config.json").read_text())
    assert raw["chat_template"] and raw["add_bos_token"] is False


def test_refuses_a_non_empty_out_without_force(tmp_path):
    run = trained_run("llama")
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(AzllmError, match="--force"):
        export_hf(run, tmp_path)
    export_hf(run, tmp_path, force=True)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "keep.txt").exists()


def test_cli_process(tmp_path):
    run = trained_run("gpt2")
    proc = run_export_cli("hf", "--run", run, "--out", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "config.json").exists()
    proc = run_export_cli("hf", "--run", tmp_path / "nope", "--out", tmp_path / "x")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
