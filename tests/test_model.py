import math

import pytest
import torch

from azllm.config import ModelConfig
from azllm.generate import SamplingSettings, StreamDecoder, generate, sample_next
from azllm.model import GPT


def tiny(arch="llama", **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=97, block_size=48, n_layer=2, n_head=4, n_embd=32, **kw)
    return GPT(cfg).eval()


ARCHS = [
    ("llama", {}),
    ("gpt2", {}),
    ("llama", {"n_kv_head": 2}),
    ("llama", {"n_kv_head": 2, "qk_norm": True, "logit_softcap": 10.0}),
]


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_shapes_and_loss(arch, kw):
    m = tiny(arch, **kw)
    x = torch.randint(0, 97, (3, 20))
    logits, loss = m(x, torch.randint(0, 97, (3, 20)))
    assert logits.shape == (3, 20, 97)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    # an untrained model is close to a uniform guess
    assert abs(loss.item() - math.log(97)) < 0.5
    last, _ = m(x, last_only=True)
    assert torch.allclose(last[:, 0], logits[:, -1], atol=1e-5)


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_future_tokens_cannot_change_past_logits(arch, kw):
    m = tiny(arch, **kw)
    x = torch.randint(0, 97, (2, 30))
    y = x.clone()
    y[:, 17:] = torch.randint(0, 97, (2, 13))
    a, _ = m(x)
    b, _ = m(y)
    assert torch.allclose(a[:, :17], b[:, :17], atol=1e-6)
    assert not torch.allclose(a[:, 17:], b[:, 17:], atol=1e-3)


def test_tied_embeddings_and_param_table():
    m = tiny()
    assert m.lm_head.weight is m.embed.weight
    assert sum(n for _, _, n in m.summary_rows()) == m.num_params()
    untied = tiny(tie_embeddings=False)
    assert untied.num_params() == m.num_params() + 97 * 32


def test_depth_scaled_init():
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=100, block_size=16))
    q = m.blocks[0].attn.q_proj.weight.std().item()
    o = m.blocks[0].attn.o_proj.weight.std().item()
    assert q == pytest.approx(0.02, rel=0.05)
    assert o == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_greedy_with_and_without_cache_is_identical(arch, kw):
    m = tiny(arch, **kw)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]  # different lengths in one batch
    cached = generate(m, prompts, max_new_tokens=20, temperature=0)
    plain = generate(m, prompts, max_new_tokens=20, temperature=0, use_cache=False)
    assert cached == plain
    # and each row decodes exactly as the prompt would alone (padding is invisible)
    for p, out in zip(prompts, cached, strict=True):
        assert generate(m, [p], max_new_tokens=20, temperature=0) == [out]
    assert all(len(o) == 20 for o in cached)


def test_generation_stops_at_eos_and_respects_context():
    m = tiny()
    first = generate(m, [[5, 6]], max_new_tokens=10, temperature=0)[0]
    eos = first[3]
    out = generate(m, [[5, 6]], max_new_tokens=10, temperature=0, eos_id=eos)[0]
    assert out == first[: first.index(eos)]
    out = generate(m, [[1] * 40], max_new_tokens=100, temperature=0)[0]
    assert len(out) == 48 - 40  # capped at the context


def test_sampling_is_seeded_and_filters_work():
    m = tiny()
    a = generate(m, [[5]], max_new_tokens=15, temperature=1.0, seed=3)
    b = generate(m, [[5]], max_new_tokens=15, temperature=1.0, seed=3)
    c = generate(m, [[5]], max_new_tokens=15, temperature=1.0, seed=4)
    assert a == b and a != c
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    g = torch.Generator().manual_seed(0)
    hot = SamplingSettings(temperature=1.0, top_k=0)
    picks = {int(sample_next(logits, [hot.override(top_k=2)], [g])) for _ in range(200)}
    assert picks == {3, 4}
    # top-p 0.5: p(4)=0.636 alone reaches it
    picks = {int(sample_next(logits, [hot.override(top_p=0.5)], [g])) for _ in range(200)}
    assert picks == {4}
    assert int(sample_next(logits, [hot.override(temperature=0.0)], [None])) == 4


def test_stream_decoder_waits_for_whole_characters(tok):
    ids = tok.encode("Əksinə, göyərçin 🚀 uçur")
    d = StreamDecoder(tok.decode)
    pieces = [d.push(t) for t in ids]
    assert "".join(pieces) == "Əksinə, göyərçin 🚀 uçur"
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("arch,kw", ARCHS[:2])
def test_chunked_cross_entropy_matches_the_plain_loss_and_gradients(arch, kw):
    m = tiny(arch, **kw).train()
    x = torch.randint(0, 97, (3, 20))
    y = torch.randint(0, 97, (3, 20))
    y[0, :5] = -1  # ignored targets must be left out of the mean in both
    _, plain = m(x, y)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    c = GPT(m.cfg, ce_chunk=7).train()  # 7 does not divide 60 tokens: the last chunk is short
    c.load_state_dict(m.state_dict())
    logits, chunked = c(x, y)
    chunked.backward()
    assert logits is None
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    for n, p in c.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


@pytest.mark.parametrize("arch,kw", ARCHS)
def test_packed_sequences_see_only_themselves(arch, kw):
    m = tiny(arch, **kw)
    torch.manual_seed(1)
    a, b = torch.randint(0, 97, (1, 13)), torch.randint(0, 97, (1, 20))
    c = torch.randint(0, 97, (1, 30))
    pad = torch.zeros(1, 15, dtype=torch.long)
    # two rows, packed differently, in one batch: A|B|padding and C|A|padding
    rows = torch.cat([torch.cat([a, b, pad], 1), torch.cat([c, a, pad[:, :5]], 1)])
    seg = torch.tensor([[0] * 13 + [1] * 20 + [2] * 15, [0] * 30 + [1] * 13 + [2] * 5])
    packed, _ = m(rows, segments=seg)
    alone = {k: m(v)[0][0] for k, v in {"a": a, "b": b, "c": c}.items()}
    assert torch.allclose(packed[0, :13], alone["a"], atol=1e-5)
    assert torch.allclose(packed[0, 13:33], alone["b"], atol=1e-5)  # B starts afresh at 0
    assert torch.allclose(packed[1, :30], alone["c"], atol=1e-5)
    assert torch.allclose(packed[1, 30:43], alone["a"], atol=1e-5)
    plain, _ = m(rows)  # without segments B sees A: the mask (and positions) matter
    assert not torch.allclose(plain[0, 13:33], alone["b"], atol=1e-3)
    with pytest.raises(ValueError, match="segments"):
        m(rows, segments=seg, real=torch.ones_like(rows, dtype=torch.bool))


def test_packed_loss_and_gradients_under_activation_checkpointing():
    m = GPT(tiny().cfg, activation_checkpointing=True).train()
    torch.manual_seed(2)
    a, b = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 25))
    ya, yb = torch.randint(0, 97, (1, 10)), torch.randint(0, 97, (1, 25))
    row, y = torch.cat([a, b], 1), torch.cat([ya, yb], 1)
    seg = torch.tensor([[0] * 10 + [1] * 25])
    _, packed = m(row, y, segments=seg)
    packed.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    # the same tokens unpacked: one row each, right-padded with ignored targets
    xs = torch.zeros(2, 25, dtype=torch.long)
    ys = torch.full((2, 25), -1)
    xs[0, :10], ys[0, :10], xs[1], ys[1] = a, ya, b, yb
    _, plain = m(xs, ys)
    plain.backward()
    assert packed.item() == pytest.approx(plain.item(), abs=1e-5)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


# ---- config: derived sizes (n_kv_head, ffn_hidden: 0 = derive) ------------------------------


def test_derived_sizes_are_properties_and_saved_raw(tmp_path):
    import json

    from azllm.config import Config, apply_overrides, load_config, load_run_config

    cfg = load_config("baby")
    assert (cfg.model.n_kv_head, cfg.model.ffn_hidden) == (0, 0)  # as the user wrote them
    assert (cfg.model.kv_heads, cfg.model.ffn_dim) == (6, 1024)
    wide = apply_overrides(cfg, {"model.n_embd": 768, "model.n_head": 12})
    assert (wide.model.kv_heads, wide.model.ffn_dim) == (12, 2048)  # derived again, no reset
    gpt2 = apply_overrides(cfg, {"model.arch": "gpt2", "model.qk_norm": False})
    assert gpt2.model.ffn_dim == 4 * 384
    explicit = apply_overrides(cfg, {"model.ffn_hidden": 512, "model.n_kv_head": 2})
    assert (explicit.model.kv_heads, explicit.model.ffn_dim) == (2, 512)
    assert apply_overrides(explicit, {"model.n_embd": 768}).model.ffn_dim == 512  # user's value
    # config.json keeps 0 = derive; an old one with the sizes written out means the same model
    assert cfg.to_dict()["model"]["ffn_hidden"] == 0
    old = Config(model=cfg.model.resolved())
    (tmp_path / "config.json").write_text(json.dumps(old.to_dict()))
    loaded = load_run_config(tmp_path)
    assert loaded.model.ffn_hidden == 1024 and loaded.model.resolved() == cfg.model.resolved()
    assert GPT(loaded.model).num_params() == GPT(cfg.model).num_params()
