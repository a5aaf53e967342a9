"""`azllm pairs`: self-play preference pairs (reference answer = chosen, the model's own sample
= rejected) from a chat set, with the similarity filter; read back by `azllm dpo`."""

import json

import pytest
from conftest import run_cli, shared_path
from test_cli_errors import fails

from azllm.chat.pairdata import load_pairs
from azllm.chat.pairs import make_pairs, similarity, split_prompt
from azllm.checkpoint import load_run
from azllm.evaluate.harness import normalize
from azllm.sampling import SamplingSettings


@pytest.fixture(scope="module")
def chat_slice(tmp_path_factory):
    """The first 12 conversations of ../shared/data/az/chat."""
    lines = []
    for f in sorted(shared_path("data", "az", "chat").glob("*.jsonl")):
        lines += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    out.write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    return out


def test_similarity_is_word_level_and_case_folded():
    # Azerbaijani case (İ/i, I/ı: str.lower() gets İ wrong) and punctuation do not count
    assert similarity("Bakı Xəzərin sahilindədir.", "BAKI XƏZƏRİN SAHİLİNDƏDİR") == 1.0
    assert similarity("İlin sonu", "ılin sonu") == 0.5
    assert similarity("bir iki üç", "dörd beş altı") == 0.0
    assert similarity("bir iki üç dörd", "bir iki üç beş") == pytest.approx(0.75)
    assert similarity("bir iki", "iki bir") == pytest.approx(0.5)  # order matters


def test_pairs_on_the_az_chat_set_are_read_back_by_dpo(tiny_run, chat_slice, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ["pairs", "--run", tiny_run, "--data", chat_slice, "--samples", "2", "--seed", "3"]
    args += ["--max-new-tokens", "24"]
    proc = run_cli(*args, "--out", out)
    records = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    convs = [json.loads(x)["messages"] for x in chat_slice.read_text("utf-8").splitlines()]
    # prompts that leave the tiny model's context (128) room for an answer
    _, tok, cfg = load_run(tiny_run)
    by_prompt = {
        json.dumps(split_prompt(c)[0]): split_prompt(c)[1]
        for c in convs
        if len(tok.encode_chat(split_prompt(c)[0], True)[0]) < cfg.model.block_size
    }
    n = len(by_prompt)
    assert n >= 6, "the slice should mostly fit the context"
    assert f"pairs from 12 conversations ({2 * n} samples" in proc.stdout
    assert f"{12 - n} prompts too long" in proc.stdout
    assert n <= len(records) <= 2 * n  # random replies of a tiny model: at most a repeat dropped
    for r in records:
        assert r["chosen"] == [{"role": "assistant", "content": by_prompt[json.dumps(r["prompt"])]}]
        assert r["rejected"][0]["content"] != r["chosen"][0]["content"]
        assert r["similarity"] < 0.9
    assert {json.dumps(r["prompt"]) for r in records} == set(by_prompt)  # every prompt used
    assert len(load_pairs([out])) == len(records)  # the DPO reader takes the file as it is
    # the same command with the same seed writes the same file; a taken --out needs --force
    fails(*args, "--out", out, match="--force")
    again = tmp_path / "again.jsonl"
    run_cli(*args, "--out", again)
    assert again.read_bytes() == out.read_bytes()
    run_cli("dpo", "--run", tiny_run, "--data", out, "--out", tmp_path / "dpo",
            "--precision", "fp32", "--max-steps", "2", "--eval-interval", "2")  # fmt: skip
    assert (tmp_path / "dpo" / "model.safetensors").exists()


def test_samples_as_close_as_the_reference_are_dropped(tiny_run):
    """A seeded sample drawn again is the same text: a conversation whose reference IS that
    sample gives a sample of similarity 1 (dropped); greedy repeats are written once."""
    model, tok, _ = load_run(tiny_run)
    prompt = [{"role": "user", "content": "Azərbaycanın paytaxtı hansı şəhərdir?"}]
    warm = SamplingSettings(temperature=0.8, max_new_tokens=16, seed=7)
    conv = [*prompt, {"role": "assistant", "content": "Bakı şəhəridir."}]
    first, _ = make_pairs(model, tok, [conv], samples=1, sampling=warm, max_similarity=1.0)
    own = first[0]["rejected"][0]["content"]
    assert normalize(own).split(), "the sample should have words"
    same = [*prompt, {"role": "assistant", "content": own}]
    records, stats = make_pairs(model, tok, [same], samples=1, sampling=warm)
    assert (stats.sampled, stats.too_similar, records) == (1, 1, [])
    # greedy: three draws, one text, written once
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=16)
    records, stats = make_pairs(model, tok, [conv], samples=3, sampling=greedy)
    assert (stats.sampled, stats.duplicates, len(records)) == (3, 2, 1)
    # the threshold: a sample exactly as similar as it is dropped, one below it kept
    ref = f"{own} Bakı şəhəridir."  # shares the sample's words, not all of them
    other = [*prompt, {"role": "assistant", "content": ref}]
    sim = similarity(ref, own)
    assert 0 < sim < 1
    at, st_at = make_pairs(model, tok, [other], samples=1, sampling=warm, max_similarity=sim)
    above, _ = make_pairs(model, tok, [other], samples=1, sampling=warm, max_similarity=1.0)
    assert (at, st_at.too_similar) == ([], 1)
    assert above[0]["similarity"] == round(sim, 4) and above[0]["chosen"][0]["content"] == ref


def test_bad_pairs_arguments_are_one_line_errors(tiny_run, chat_slice, tmp_path):
    out = tmp_path / "p.jsonl"
    fails("pairs", "--run", tiny_run, "--data", chat_slice, "--out", out, "--samples", "0",
          match="--samples")  # fmt: skip
    fails("pairs", "--run", tiny_run, "--data", chat_slice, "--out", out,
          "--max-similarity", "0", match="--max-similarity")  # fmt: skip
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "tək"}]}\n', encoding="utf-8")
    fails("pairs", "--run", tiny_run, "--data", bad, "--out", out,
          match=f"{bad}:1: no assistant message")  # fmt: skip
    assert not out.exists()
