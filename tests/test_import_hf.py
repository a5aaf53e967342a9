"""`azllm import hf`: small random Llama / Qwen2 models made with transformers inside the test
(nothing downloaded), imported, and compared with transformers logit for logit; their tokenizers'
chat templates mapped onto our roles; bad folders refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from azllm.checkpoint import load_run
from azllm.errors import AzllmError

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "azllm" / "data" / "sample"
CHAT = [
    {"role": "system", "content": "Sən köməkçisən."},
    {"role": "user", "content": "Salam! Bakı haqqında danış."},
    {"role": "assistant", "content": "Bakı Azərbaycanın paytaxtıdır."},
    {"role": "user", "content": "Bəs Şəki?"},
]
# Llama-3-Instruct's template, verbatim; Qwen2.5's without the tool branches.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIALS = {
    "llama": [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],  # fmt: skip
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}


def _hf_tokenizer(kind: str, template: str | None):
    """A byte-level BPE with the family's special tokens, as PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from azllm.export.gguf import QWEN2_PATTERN
    from azllm.tokenizer import SPLIT_PATTERN

    pattern = QWEN2_PATTERN if kind == "qwen2" else SPLIT_PATTERN  # Qwen2: single digits
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS[kind],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [p.read_text(encoding="utf-8") for p in sorted(SAMPLE.glob("*.txt"))[:6]]
    tok.train_from_iterator(texts, trainer=trainer)
    names = (
        dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
        if kind == "llama"
        else dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    )
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    if template:
        hf.chat_template = template
    return hf


def make_hf_folder(
    root: Path,
    kind: str,
    *,
    template: str | None = "auto",
    tied=False,
    init_range=0.02,
    rope: dict | None = None,
) -> Path:
    """save_pretrained of a random 2-layer model (GQA; Qwen2: q/k/v biases, padded vocab).
    A larger init_range gives peaked logits, for greedy comparisons."""
    torch.manual_seed(0)
    if template == "auto":
        template = LLAMA3_TEMPLATE if kind == "llama" else QWEN2_TEMPLATE
    hf_tok = _hf_tokenizer(kind, template)
    common = dict(
        vocab_size=len(hf_tok) + (8 if kind == "qwen2" else 0),
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        initializer_range=init_range,
    )
    if kind == "llama":
        rope = rope or {"rope_type": "default", "rope_theta": 500000.0}
        config = transformers.LlamaConfig(rope_parameters=rope, **common)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(rope_theta=1e6, use_sliding_window=False, **common)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # random biases (they start at zero), so a lost bias shows
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    out = root / f"hf-{kind}"
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def _ids(n: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 590, (2, n), generator=g)


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_import_logits_match_transformers(tmp_path, kind):
    from azllm.checkpoint import load_run
    from azllm.hf_import import import_hf

    src = make_hf_folder(tmp_path, kind, tied=kind == "qwen2")
    run, _ = import_hf(src, tmp_path / "run")
    model, tok, cfg = load_run(run)
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)[0]
    theirs = _hf_logits(src, ids)
    # measured max |diff| 0.0 here (fp32, |logits| < 0.7); 1e-6 leaves room for other BLAS
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert cfg.model.qkv_bias == (kind == "qwen2")
    # the chat template mapped onto our roles: token for token what transformers makes
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    for gen, msgs in ((True, CHAT), (False, CHAT[:3])):
        want = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert tok.encode_chat(msgs, add_generation_prompt=gen)[0] == list(want)
    ids, mask = tok.encode_chat(CHAT[:3])
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special=False)
    assert trained == CHAT[2]["content"] + tok.chat.suffix["assistant"]  # content + end of turn
    assert tok.tok.id_to_token(ids[-len(tok._suffix["assistant"])]) == tok.chat.end
    assert tok.tok.id_to_token(tok.end_id) == ("<|eot_id|>" if kind == "llama" else "<|im_end|>")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_imported_run_exports_back_to_hf(tmp_path, kind):
    """import -> export hf: transformers loads our export (Qwen2 with its biases) and computes the
    same logits as the original, and the exported chat template is the original's."""
    from azllm.export.hf import export_hf
    from azllm.hf_import import import_hf

    src = make_hf_folder(tmp_path, kind)
    import_hf(src, tmp_path / "run")
    out = export_hf(tmp_path / "run", tmp_path / "exported")
    ids = _ids()
    torch.testing.assert_close(_hf_logits(out, ids), _hf_logits(src, ids), atol=1e-6, rtol=1e-6)
    a = transformers.AutoTokenizer.from_pretrained(src)
    b = transformers.AutoTokenizer.from_pretrained(out)
    assert a.apply_chat_template(CHAT, tokenize=False) == b.apply_chat_template(
        CHAT, tokenize=False
    )


def test_tokenizer_without_template_gets_azllms_with_text_markers(tmp_path):
    from azllm.checkpoint import load_run
    from azllm.hf_import import import_hf

    run, _ = import_hf(make_hf_folder(tmp_path, "llama", template=None), tmp_path / "run")
    _, tok, _ = load_run(run)
    assert tok.render_chat(CHAT[:2], True) == (
        "<|begin_of_text|><|system|>Sən köməkçisən.<|eot_id|><|user|>Salam! Bakı haqqında "
        "danış.<|eot_id|><|assistant|>"
    )
    assert tok.end_id == tok.eos_id == tok.tok.token_to_id("<|eot_id|>")


def test_imported_run_generates_from_cli(tmp_path):
    from azllm.cli import main
    from azllm.hf_import import import_hf

    import_hf(make_hf_folder(tmp_path, "qwen2"), tmp_path / "run")
    args = ["generate", "--run", str(tmp_path / "run"), "--prompt", "Bakı", "--max-new-tokens"]
    assert main([*args, "5", "--temperature", "0"]) == 0


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (dict(architectures=["MistralForCausalLM"]), "architectures"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(head_dim=32), "head_dim"),
    ],
)
def test_unsupported_features_refused_in_one_line(tmp_path, change, field):
    from azllm.hf_import import import_hf

    src = make_hf_folder(tmp_path, "llama")
    _edit_config(src, **change)
    with pytest.raises(AzllmError, match=field) as e:
        import_hf(src, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_not_a_model_folder_refused(tmp_path, capsys):
    from azllm.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["import", "hf", str(tmp_path / "empty"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a Hugging Face model folder" in err and "\n" not in err
    src = make_hf_folder(tmp_path, "llama")
    (src / "model.safetensors").unlink()
    with pytest.raises(AzllmError, match="no model.safetensors"):
        from azllm.hf_import import import_hf

        import_hf(src, tmp_path / "run")
    shutil.rmtree(src)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # tiny, so most of head_dim 16's frequencies move
}


def test_llama3_rope_scaling_matches_transformers_hf_export_and_llama_cpp(tmp_path):
    """Llama 3.1/3.2's "llama3" RoPE frequencies: imported, exported back to HF (transformers
    computes the same logits) and to GGUF (its rope_freqs factors: llama.cpp's logits)."""
    pytest.importorskip("llama_cpp")
    from export_fixtures import both_logits

    from azllm.export.gguf import export_gguf
    from azllm.export.hf import export_hf
    from azllm.export.llamacpp import loaded
    from azllm.hf_import import import_hf

    src = make_hf_folder(tmp_path, "llama", rope=LLAMA3_ROPE, init_range=0.1)
    run, cfg = import_hf(src, tmp_path / "run")
    assert cfg.rope_scaling["factor"] == 8.0
    model, _, _ = load_run(run)
    ids = _ids(100)
    with torch.no_grad():
        ours = model(ids)[0]
    # measured max |diff| 0.0 here (as for plain RoPE)
    torch.testing.assert_close(ours, _hf_logits(src, ids), atol=1e-6, rtol=1e-6)
    exported = export_hf(run, tmp_path / "hf")
    torch.testing.assert_close(_hf_logits(exported, ids), ours, atol=1e-6, rtol=1e-6)
    export_gguf(run, tmp_path / "m.gguf", "f32")
    with loaded(tmp_path / "m.gguf", logits_all=True) as llm:
        theirs, mine = both_logits(llm, model, ids[0].tolist())
    # measured max |diff| 1.9e-3 (llama.cpp f32 vs ours; logits up to 3.5); the same GGUF
    # without its rope_freqs tensor (plain RoPE in llama.cpp) is 2.4 off
    assert abs(theirs - mine).max() < 6e-3


def test_qwen2_exports_to_gguf_and_llama_cpp_computes_our_logits(tmp_path):
    """GGUF "qwen2": q/k/v biases, halves rotated (no permutation), tied head, the embedding's
    padding rows past the tokenizer as unused tokens, Qwen2's pre-tokenizer (single digits)."""
    pytest.importorskip("llama_cpp")
    from export_fixtures import both_logits

    from azllm.export.gguf import export_gguf
    from azllm.export.llamacpp import greedy, loaded, tokenize
    from azllm.generate import generate
    from azllm.hf_import import import_hf

    run, cfg = import_hf(
        make_hf_folder(tmp_path, "qwen2", tied=True, init_range=0.1), tmp_path / "r"
    )
    model, tok, _ = load_run(run)
    assert cfg.vocab_size > tok.vocab_size  # padded, as Qwen2's are
    export_gguf(run, tmp_path / "m.gguf", "f32")
    ids = tok.encode_chat(CHAT, add_generation_prompt=True)[0]
    with loaded(tmp_path / "m.gguf", logits_all=True) as llm:
        assert llm.n_vocab() == cfg.vocab_size
        text = "Bakı 2024-cü ildə 1918 nəfər, qiymət 3,75 manat.\n\nYeni sətir:\tTAB  iki."
        assert tokenize(llm, text) == tok.encode(text)
        theirs, mine = both_logits(llm, model, ids)
        greedy_theirs = greedy(llm, ids, 16)
    # measured max |diff| 8.8e-4 (logits up to 3.2); without the bias tensors 5.2
    assert abs(theirs - mine).max() < 3e-3
    assert generate(model, [ids], max_new_tokens=16, temperature=0)[0] == greedy_theirs


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ollama_modelfile_of_an_imported_run_renders_its_own_template(tmp_path, kind):
    """The Modelfile's TEMPLATE, rendered by Go's text/template as Ollama does, is the imported
    chat template's text (transformers' rendering), and generation stops at its end of turn."""
    from test_export_ollama import parse_modelfile, render_go

    from azllm.export.ollama import export_ollama
    from azllm.hf_import import import_hf

    src = make_hf_folder(tmp_path, kind)
    import_hf(src, tmp_path / "run")
    out, _ = export_ollama(tmp_path / "run", tmp_path / "ollama", "f32")
    mf = parse_modelfile((out / "Modelfile").read_text(encoding="utf-8"))
    got = render_go(mf["TEMPLATE"], {"Messages": CHAT}, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    assert got == hf_tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    end = "<|eot_id|>" if kind == "llama" else "<|im_end|>"
    assert end in mf["PARAMETER"]["stop"]
