"""SentencePiece tokenizers (`azllm tokenizer train --kind sentencepiece-bpe|-unigram`):
trained by the real sentencepiece library, kept as a tokenizer.json that tokenizes exactly as
sentencepiece's own processor does (every line of ../shared/data/az/pretrain compared), and a
SentencePiece-BPE `tiny` run going train -> resume -> generate -> serve -> export HF -> export GGUF
(f16, q8_0, q4_k_m) -> llama.cpp with tokenization and greedy parity. A unigram run exports to HF;
its GGUF export is refused (llama.cpp's unigram tokenizer has no byte fallback)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest

spm = pytest.importorskip("sentencepiece")

from conftest import (  # noqa: E402
    SAMPLE,
    assert_resumed_after,
    mark_logged_steps,
    run_cli,
    shared_files,
)
from export_fixtures import CHAT, HELD_OUT, PARAGRAPH, PROMPTS, held_out_text  # noqa: E402

from azllm.documents import iter_all_documents  # noqa: E402
from azllm.errors import AzllmError  # noqa: E402
from azllm.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer  # noqa: E402
from azllm.tokenizer_spm import BYTE, CONTROL, NORMAL, UNK, UNKNOWN  # noqa: E402

KINDS = ("sentencepiece-bpe", "sentencepiece-unigram")
VOCAB = 768
TRAIN_FILES = sorted(p for p in SAMPLE.glob("*.txt") if p.name not in HELD_OUT)
STEPS, HALF = 160, 80


def pretrain_lines() -> list[str]:
    """Every line of ../shared/data/az/pretrain (NFC, as both tokenizers see it) plus the
    bundled held-out text's lines; [] parts locally without ../shared."""
    lines = held_out_text().split("\n") + PARAGRAPH.split("\n")
    for f in shared_files("data/az/pretrain", "*.txt"):
        lines += f.read_text(encoding="utf-8").split("\n")
    return [unicodedata.normalize("NFC", line) for line in lines]


_cache: dict = {}


def trained(kind: str, tmp: Path) -> tuple[Path, Path]:
    """(tokenizer.json, tokenizer.model) made by the CLI, once per kind."""
    if kind not in _cache:
        out = tmp / kind / "tokenizer.json"
        proc = run_cli(
            "tokenizer", "train", "--kind", kind, "--vocab-size", VOCAB, "--out", out,
            "--input", *TRAIN_FILES,
        )  # fmt: skip
        assert "768 tokens" in proc.stdout
        _cache[kind] = (out, out.with_suffix(".model"))
    return _cache[kind]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("spm")


@pytest.mark.parametrize("kind", KINDS)
def test_cli_writes_a_tokenizer_json_and_the_model_with_fixed_special_ids(tmp, kind):
    js, model = trained(kind, tmp)
    tok, via_model = load_tokenizer(js), load_tokenizer(model)
    assert tok.kind == via_model.kind == kind and tok.vocab_size == VOCAB
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for i, t in enumerate(SPECIAL_TOKENS):  # the project's ids, in both files
        assert tok.tok.token_to_id(t) == i and sp.id_to_piece(i) == t and sp.is_control(i)
    assert sp.id_to_piece(len(SPECIAL_TOKENS)) == UNK
    assert all(sp.is_byte(len(SPECIAL_TOKENS) + 1 + b) for b in range(256))
    assert tok.encode(PARAGRAPH) == via_model.encode(PARAGRAPH)
    # the chat template's ids work unchanged: specials by id, content as text
    ids, mask = tok.encode_chat(CHAT, add_generation_prompt=True)
    assert ids[0] == tok.bos_id and ids[-1] == SPECIAL_TOKENS.index("<|assistant|>")
    assert len(ids) == len(mask) and any(mask)


@pytest.mark.parametrize("kind", KINDS)
def test_nfc_byte_fallback_and_special_strings_as_text(tmp, kind):
    tok = load_tokenizer(trained(kind, tmp)[0])
    composed = "Şəki, Gəncə, çörək, göyərti, üzüm, İlkin, ağ"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed and tok.encode(decomposed) == tok.encode(composed)
    # characters the tiny vocabulary never saw become their UTF-8 bytes, and come back
    for text in ["中文 😀 ∑", PARAGRAPH, "  iki  boşluq\t\n\nsətir", "<|end|><|user|> <0x41>"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # typed special strings and byte-piece names are text: no control id, no byte piece
        # standing for a character it does not spell
        assert not set(ids) & set(range(len(SPECIAL_TOKENS) + 1))
    assert {tok.tok.id_to_token(i) for i in tok.encode("😀")} == {"<0xF0>", "<0x9F>", "<0x98>",
                                                                  "<0x80>"}  # fmt: skip
    # token texts concatenate: streaming one token at a time gives the whole text
    ids = tok.encode(PARAGRAPH)
    assert "".join(tok.decode([i]) for i in ids[:40]) == tok.decode(ids[:40])


@pytest.mark.parametrize("kind", KINDS)
def test_identical_to_sentencepiece_on_every_pretrain_line(tmp, kind):
    """Our tokenizer.json against sentencepiece's own processor, every line; differences are
    counted and must be none (measured: 0 of 47,420 lines for both kinds at this vocabulary)."""
    js, model = trained(kind, tmp)
    tok, sp = load_tokenizer(js), spm.SentencePieceProcessor(model_file=str(model))
    lines = pretrain_lines()
    ours, theirs = tok.encode_batch(lines), sp.encode(lines)
    differ = [line for line, a, b in zip(lines, ours, theirs, strict=True) if a != b]
    assert not differ, f"{len(differ)} of {len(lines)} lines differ, first: {differ[0][:80]!r}"
    assert sum(map(len, ours)) > len(lines)  # not vacuous: real text was compared


def test_bad_inputs_are_one_line_errors(tmp):
    bad = tmp / "bad.model"
    bad.write_bytes(b"\x00this is not a sentencepiece model\xff" * 10)
    proc = run_cli("tokenizer", "stats", "--tokenizer", bad, "--text", SAMPLE, check=False)
    assert proc.returncode == 2 and "not a SentencePiece model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(
        "tokenizer", "train", "--kind", "sentencepiece-unigram", "--vocab-size", "50000",
        "--out", tmp / "big" / "tokenizer.json", "--input", SAMPLE, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--vocab-size 50000" in proc.stderr
    assert "at most" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp / "big" / "tokenizer.json").exists()
    # a real SentencePiece model, but not one made for azllm (its own <unk>, <s>, </s> at 0..2)
    import io

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(held_out_text().split("\n")), model_writer=out, vocab_size=300,
        minloglevel=2,
    )  # fmt: skip
    (tmp / "foreign.model").write_bytes(out.getvalue())
    with pytest.raises(AzllmError, match="not azllm's special tokens"):
        load_tokenizer(tmp / "foreign.model")
    with pytest.raises(AzllmError, match="too small"):
        train_tokenizer(iter([PARAGRAPH]), 200, kind="sentencepiece-bpe")


def test_without_sentencepiece_training_names_the_extra_and_tokenizer_json_still_loads(
    tmp, monkeypatch
):
    js, model = trained("sentencepiece-bpe", tmp)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import sentencepiece -> ImportError
    with pytest.raises(AzllmError, match=r"azllm\[spm\]"):
        train_tokenizer(iter([PARAGRAPH]), VOCAB, kind="sentencepiece-unigram")
    with pytest.raises(AzllmError, match=r"azllm\[spm\]"):
        load_tokenizer(model)
    assert load_tokenizer(js).encode(PARAGRAPH)  # HF tokenizers alone reads the .json


def test_stats_compares_kinds_on_the_same_text(tmp, tokenizer_path):
    held = tmp / "held.txt"
    held.write_text(held_out_text(), encoding="utf-8")
    paths = [tokenizer_path] + [trained(k, tmp)[0] for k in KINDS]
    proc = run_cli("tokenizer", "stats", "--tokenizer", *paths, "--text", held, "--json")
    rows = json.loads(proc.stdout)
    assert list(rows) == [str(p) for p in paths]
    words = {r["words"] for r in rows.values()}
    assert len(words) == 1  # the same text for every kind
    docs = list(iter_all_documents([held]))
    for p, r in rows.items():
        assert r["tokens"] == sum(map(len, load_tokenizer(p).encode_batch(docs)))
    table = run_cli("tokenizer", "stats", "--tokenizer", *paths, "--text", held).stdout
    assert all(k in table for k in ("bpe", *KINDS))


# ---- a SentencePiece-BPE tiny run through every stage -------------------------------------------


def model_config(vocab_size: int):
    """As export_fixtures' llama: 256 wide, 768-wide SwiGLU (K-quants really used), GQA."""
    from azllm.config import ModelConfig

    return ModelConfig(
        arch="llama", vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2,
        n_embd=256, ffn_hidden=768,
    )  # fmt: skip


def train_config(max_steps: int):
    from azllm.config import TrainConfig

    return TrainConfig(
        micro_batch=8, grad_accum=1, max_steps=max_steps, warmup_steps=20, lr=3e-3,
        eval_interval=HALF, eval_batches=1, log_interval=1, ckpt_interval=HALF, keep_last=2,
        precision="fp32", device="cpu", seed=1234,
    )  # fmt: skip


@pytest.fixture(scope="module")
def spm_run(tmp) -> dict:
    """A sentencepiece-bpe run trained STEPS steps, and a copy interrupted at HALF then resumed."""
    import torch

    from azllm.config import Config
    from azllm.shards import tokenize_to_shards
    from azllm.train import train

    js, _ = trained("sentencepiece-bpe", tmp)
    tok = load_tokenizer(js)
    data = tmp / "bpe-data"
    tokenize_to_shards(tok, TRAIN_FILES, data, val_fraction=0.1, progress=False)
    cfg = Config(model=model_config(tok.vocab_size), train=train_config(STEPS))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see export_fixtures: one thread is faster on a busy machine
    try:
        run = tmp / "bpe-run"
        train(cfg, data, run, progress=False)
        resumed = tmp / "bpe-resumed"
        shutil.copytree(run, resumed)
        shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
        mark_logged_steps(resumed, HALF)
        train(cfg, data, resumed, resume=True, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"run": run, "resumed": resumed, "data": data, "tok": tok}


def test_train_and_resume_exactly(spm_run):
    from safetensors.torch import load_file

    from azllm.metrics import read_metrics

    run, resumed = spm_run["run"], spm_run["resumed"]
    assert_resumed_after(resumed, HALF, STEPS)
    losses = [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    again = [(r["step"], r["loss"]) for r in read_metrics(resumed) if "loss" in r]
    assert again == losses and losses[-1][1] < losses[0][1] - 1.0  # it learned something
    a, b = load_file(run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert load_tokenizer(run).sha256() == spm_run["tok"].sha256()  # the run carries it


def test_generate_cli_streams_the_text_a_whole_decode_gives(spm_run):
    """Streamed token by token (StreamDecoder) or decoded at once: the same text, spaces
    included (a SentencePiece piece carries its leading space as "▁")."""
    args = ("generate", "--run", spm_run["run"], "--prompt", PROMPTS[1], "--temperature", "0",
            "--max-new-tokens", "24")  # fmt: skip
    streamed = run_cli(*args).stdout
    whole = run_cli(*args, "--no-stream").stdout
    assert whole == f"--- sample 1\n{streamed}"
    assert streamed.startswith(PROMPTS[1]) and streamed[len(PROMPTS[1]) :].count(" ") >= 2


def test_serve(spm_run):
    from chat_fixtures import ServerProcess, post_json, post_sse

    tok, server = spm_run["tok"], ServerProcess(spm_run["run"])
    try:
        body = {"model": "azllm", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        status, out = post_json(server.url + "/v1/completions", body)
        assert status == 200 and out["usage"]["prompt_tokens"] == 1 + len(tok.encode(PROMPTS[1]))
        _, _, events = post_sse(server.url + "/v1/completions", {**body, "stream": True})
        streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
        assert streamed == out["choices"][0]["text"] and streamed.count(" ") >= 2
        body = {"model": "azllm", "messages": CHAT, "max_tokens": 4, "ignore_eos": True}
        status, out = post_json(server.url + "/v1/chat/completions", body)
        prompt_ids, _ = tok.encode_chat(CHAT, add_generation_prompt=True)
        assert status == 200 and out["usage"]["prompt_tokens"] == len(prompt_ids)
    finally:
        server.stop()


# ---- exports ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_runs(tmp) -> dict:
    """Untrained runs (random weights) for each kind: enough for tokenizer checks."""
    from chat_fixtures import make_run

    return {k: make_run(trained(k, tmp)[0], tmp / f"random-{k}", block_size=64) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_hf_autotokenizer_gives_our_ids_on_every_pretrain_line(tmp, random_runs, kind):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    from azllm.export.hf import export_hf
    from azllm.tokenizer import END, render_chat

    run = random_runs[kind]
    out = export_hf(run, tmp / f"hf-{kind}")
    tok, hf_tok = load_tokenizer(run), transformers.AutoTokenizer.from_pretrained(out)
    lines = pretrain_lines()
    theirs = hf_tok(lines, split_special_tokens=True)["input_ids"]
    differ = [line for line, a, b in zip(lines, tok.encode_batch(lines), theirs, strict=True)
              if a != b]  # fmt: skip
    assert not differ, f"{len(differ)} of {len(lines)} lines differ, first: {differ[0][:80]!r}"
    assert hf_tok.decode(tok.encode(PARAGRAPH)) == PARAGRAPH
    assert hf_tok(f"a{END}b", split_special_tokens=True)["input_ids"] == tok.encode(f"a{END}b")
    text = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(CHAT, add_generation_prompt=True)
    ids = hf_tok.apply_chat_template(
        CHAT, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert list(ids) == tok.encode_chat(CHAT, add_generation_prompt=True)[0]


def test_hf_model_logits_and_greedy_equal_ours(tmp, spm_run):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    import torch

    from azllm.checkpoint import load_run
    from azllm.export.hf import export_hf
    from azllm.generate import generate

    out = export_hf(spm_run["run"], tmp / "hf-run")
    model, tok, _ = load_run(spm_run["run"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok.encode(PARAGRAPH)[:64]
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids]))[0], hf(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() < 1e-4 and ours.std().item() > 0.5
    prompt = tok.encode(PROMPTS[1])
    mine = generate(model, [prompt], max_new_tokens=16, temperature=0)[0]
    gen = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                      eos_token_id=None, pad_token_id=tok.pad_id)  # fmt: skip
    assert gen[0, len(prompt) :].tolist() == mine


GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
# Relative bpb difference llama.cpp vs ours on the held-out text: the dense tests' tolerances
# (tests/test_export_gguf.py BPB_TOLERANCE, about 5x the measured error there).
BPB_TOLERANCE = {"f32": 5e-6, "f16": 5e-6, "q8_0": 8e-5, "q4_k_m": 1.1e-3}


@pytest.fixture(scope="module")
def ggufs(tmp, spm_run) -> dict:
    pytest.importorskip("gguf")
    from azllm.export.gguf import export_gguf

    return {k: export_gguf(spm_run["run"], tmp / f"spm-{k}.gguf", k) for k in GGUF_TYPES}


@pytest.fixture(scope="module")
def random_gguf(tmp, random_runs) -> Path:
    """The untrained sentencepiece-bpe run as a GGUF: tokenizer checks need no training."""
    pytest.importorskip("gguf")
    from azllm.export.gguf import export_gguf

    return export_gguf(random_runs["sentencepiece-bpe"], tmp / "spm-random.gguf", "q8_0")


def test_gguf_metadata_is_a_sentencepiece_vocabulary(random_gguf, random_runs):
    import gguf
    from test_export_gguf import field

    tok = load_tokenizer(random_runs["sentencepiece-bpe"])
    r = gguf.GGUFReader(random_gguf)
    assert field(r, "tokenizer.ggml.model") == "llama"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == tok.vocab_size
    assert all(tok.tok.token_to_id(t) == i for i, t in enumerate(tokens))
    n = len(SPECIAL_TOKENS)
    assert types[:n] == [CONTROL] * n and types[n] == UNKNOWN
    assert types[n + 1 : n + 257] == [BYTE] * 256 and set(types[n + 257 :]) == {NORMAL}
    assert tokens[n + 1 + 0x0A] == "<0x0A>"
    scores = field(r, "tokenizer.ggml.scores")
    assert scores[n + 257 :] == sorted(scores[n + 257 :], reverse=True)
    assert "tokenizer.ggml.merges" not in r.fields
    assert field(r, "tokenizer.ggml.add_space_prefix") is False
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.ggml.unknown_token_id") == n


def test_llama_cpp_tokenizes_every_pretrain_line_as_we_do(random_gguf, random_runs):
    pytest.importorskip("llama_cpp")
    from azllm.export.llamacpp import loaded, tokenize
    from azllm.tokenizer import render_chat

    tok, lines = load_tokenizer(random_runs["sentencepiece-bpe"]), pretrain_lines()
    with loaded(random_gguf) as llm:
        differ = [line for line, ids in zip(lines, tok.encode_batch(lines), strict=True)
                  if tokenize(llm, line) != ids]  # fmt: skip
        assert not differ, f"{len(differ)} of {len(lines)} differ, first: {differ[0][:80]!r}"
        assert llm.detokenize(tok.encode(PARAGRAPH)).decode() == PARAGRAPH
        chat = render_chat(CHAT, add_generation_prompt=True)
        ids = llm.tokenize(chat.encode(), add_bos=False, special=True)
    assert ids == tok.encode_chat(CHAT, add_generation_prompt=True)[0]


def test_llama_cpp_greedy_and_bits_per_byte_equal_ours(ggufs, spm_run, tmp):
    pytest.importorskip("llama_cpp")
    import torch

    from azllm.checkpoint import load_run
    from azllm.evaluate import evaluate_text
    from azllm.export.gguf import gguf_eval
    from azllm.export.llamacpp import greedy, loaded

    model, tok, _ = load_run(spm_run["run"])
    with loaded(ggufs["f32"]) as llm:
        for prompt in PROMPTS[:3]:
            ids = tok.encode(prompt)
            ours = generate_greedy(model, ids)
            theirs = greedy(llm, ids, len(ours))
            if theirs != ours:  # only a genuine tie in our own logits may tell them apart
                k = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
                with torch.no_grad():
                    logits = model(torch.tensor([ids + ours[:k]]))[0][0, -1]
                gap = (logits[ours[k]] - logits[theirs[k]]).abs().item()
                assert gap < 1e-4, f"{prompt!r}: diverge at token {k} (logit gap {gap:.2e})"
    text = held_out_text()
    (tmp / "held_out.txt").write_text(text, encoding="utf-8")
    ours = evaluate_text(model, tok, text)
    for kind, path in ggufs.items():
        res = gguf_eval(path, tmp / "held_out.txt")
        assert (res["tokens"], res["bytes"]) == (ours["tokens"], ours["bytes"])
        rel = abs(res["bpb"] - ours["bpb"]) / ours["bpb"]
        assert rel < BPB_TOLERANCE[kind], f"{kind}: bpb {res['bpb']:.6f} vs {ours['bpb']:.6f}"


def generate_greedy(model, ids: list[int], n: int = 32) -> list[int]:
    from azllm.generate import generate

    return generate(model, [ids], max_new_tokens=n, temperature=0)[0]


def test_ollama_export(spm_run, tmp):
    pytest.importorskip("llama_cpp")
    from test_export_ollama import parse_modelfile

    from azllm.export.llamacpp import loaded
    from azllm.export.ollama import TEMPLATE, export_ollama
    from azllm.tokenizer import render_chat

    out, command = export_ollama(spm_run["run"], tmp / "ollama", "q8_0", name="az-spm")
    mf = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    assert mf["TEMPLATE"] == TEMPLATE and command.startswith("ollama create az-spm")
    with loaded(out / mf["FROM"].removeprefix("./")) as llm:
        chat = render_chat(CHAT, add_generation_prompt=True)
        ids = llm.tokenize(chat.encode(), add_bos=False, special=True)
    assert ids == spm_run["tok"].encode_chat(CHAT, add_generation_prompt=True)[0]


def test_unigram_gguf_and_ollama_exports_are_refused(random_runs, tmp):
    pytest.importorskip("gguf")
    from export_fixtures import run_export_cli

    from azllm.export.gguf import export_gguf
    from azllm.export.ollama import export_ollama

    run = random_runs["sentencepiece-unigram"]
    with pytest.raises(AzllmError, match="unigram.*no byte fallback"):
        export_gguf(run, tmp / "uni.gguf", "f16")
    with pytest.raises(AzllmError, match="unigram"):
        export_ollama(run, tmp / "uni-ollama", "q8_0")
    assert not (tmp / "uni.gguf").exists() and not (tmp / "uni-ollama").exists()
    proc = run_export_cli("gguf", "--run", run, "--out", tmp / "uni.gguf", "--type", "q8_0")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp.glob("*uni*.gguf*"))
