"""generate(), the one sampler and the stream decoder: same tokens as a plain reference decode,
few host reads, exact sampling distributions, incremental streaming of real Azerbaijani text."""

import math

import pytest
import torch
from conftest import shared_path

from azllm.config import ModelConfig
from azllm.errors import AzllmError
from azllm.generate import (
    CHECK_EVERY,
    DoesNotFit,
    SamplingSettings,
    StreamDecoder,
    fit_max_tokens,
    generate,
    sample_next,
)
from azllm.model import GPT

CTX = 64
GREEDY = SamplingSettings(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(
        ModelConfig(
            vocab_size=300, block_size=CTX, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False
        )
    ).eval()
    with torch.no_grad():  # peaked logits: greedy choices far from ties, yet varied text
        m.lm_head.weight.mul_(30)
    return m


def reference(model, prompt, n, eos_id=None):
    """Greedy decode of one prompt, the whole sequence recomputed each token, no cache."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(min(n, CTX - len(prompt))):
            logits, _ = model(torch.tensor([ids]))
            t = int(logits[0, -1].argmax())
            if t == eos_id:
                break
            ids.append(t)
            out.append(t)
    return out


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42], [9] * 25]


def test_batched_cached_decode_equals_the_plain_reference_with_eos_and_streaming(
    model, monkeypatch
):
    full = [reference(model, p, 20) for p in PROMPTS]
    # an EOS id that ends rows at different steps (and some not at all)
    eos = next(t for t in full[1] if any(t not in f for f in full))
    want = [reference(model, p, 20, eos) for p in PROMPTS]
    assert len({len(w) for w in want}) > 1
    for use_cache in (True, False):
        assert generate(model, PROMPTS, GREEDY, max_new_tokens=20, use_cache=use_cache) == full
        streamed = [[] for _ in PROMPTS]
        got = generate(
            model,
            PROMPTS,
            GREEDY,
            max_new_tokens=20,
            eos_id=eos,
            use_cache=use_cache,
            on_token=lambda i, t, s=streamed: s[i].append(t),
        )
        assert got == want and streamed == want
    # without a callback: the host looks for "all ended" only every few steps, same tokens
    assert generate(model, PROMPTS, GREEDY, max_new_tokens=20, eos_id=eos) == want
    forwards, real_forward = [], model.forward
    monkeypatch.setattr(
        model, "forward", lambda *a, **kw: forwards.append(1) or real_forward(*a, **kw)
    )
    assert generate(model, [PROMPTS[1]], GREEDY, max_new_tokens=20, eos_id=eos) == [want[1]]
    assert len(forwards) <= math.ceil((len(want[1]) + 1) / CHECK_EVERY) * CHECK_EVERY
    # the context caps the length; a prompt that fills it is refused
    assert len(generate(model, [[1] * 60], GREEDY, max_new_tokens=100)[0]) == CTX - 60
    with pytest.raises(DoesNotFit, match="does not fit the model's context of 64"):
        generate(model, [[1] * CTX], GREEDY)


class HostReads:
    """Counts the ways a tensor's values reach Python (each one waits for the device)."""

    NAMES = ("tolist", "item", "__bool__", "__int__", "__index__", "__float__")

    def __init__(self, monkeypatch):
        self.n = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **kw):
                self.n += 1
                return _real(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_the_decode_loop_reads_the_device_once_per_step_at_most(model, monkeypatch):
    n = 24
    eos = 299  # never the greedy pick here: every row runs the full n steps
    want = generate(model, PROMPTS, GREEDY, max_new_tokens=n)
    assert all(eos not in w for w in want)
    reads = HostReads(monkeypatch)
    assert (
        generate(model, PROMPTS, GREEDY, max_new_tokens=n, eos_id=eos, on_token=lambda i, t: None)
        == want
    )
    assert reads.n <= n + 1  # one per step (to stream), one at the end
    reads.n = 0
    assert generate(model, PROMPTS, GREEDY, max_new_tokens=n, eos_id=eos) == want
    assert reads.n <= n // CHECK_EVERY + 1  # "all ended?" every few steps, one at the end
    reads.n = 0
    sampled = SamplingSettings(temperature=1.0, top_k=20, top_p=0.9, seed=1)
    generate(model, PROMPTS, sampled, max_new_tokens=n)
    assert reads.n <= 1


def test_seeded_sampling_repeats_and_settings_are_checked(model):
    s = SamplingSettings(temperature=1.0, top_k=0, seed=3)
    a = generate(model, PROMPTS, s, max_new_tokens=15)
    assert a == generate(model, PROMPTS, s, max_new_tokens=15)
    assert a != generate(model, PROMPTS, s, max_new_tokens=15, seed=4)
    assert generate(model, PROMPTS, s, max_new_tokens=15, top_k=1) == generate(
        model, PROMPTS, GREEDY, max_new_tokens=15
    )  # top-k 1 is greedy whatever the seed
    for bad, field in (
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ):
        with pytest.raises(AzllmError, match=field):
            generate(model, PROMPTS, s.override(**bad))


def test_fit_max_tokens_is_the_one_context_check():
    assert fit_max_tokens(10, None, 64) == 54
    assert fit_max_tokens(10, 54, 64) == 54
    assert fit_max_tokens(10, 100, 64, clip=True) == 54
    with pytest.raises(DoesNotFit, match="at most 54") as e:
        fit_max_tokens(10, 55, 64)
    assert (e.value.param, e.value.room) == ("max_tokens", 54)
    with pytest.raises(DoesNotFit) as e:
        fit_max_tokens(64, None, 64)
    assert (e.value.param, e.value.room) == ("prompt", 0)
    with pytest.raises(AzllmError, match="empty"):
        fit_max_tokens(0, 5, 64)
    with pytest.raises(AzllmError, match="at least 1"):
        fit_max_tokens(3, 0, 64)


def expected_probs(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """The distribution the settings define, written out plainly for one row (float64)."""
    p = torch.softmax(logits.double() / s.temperature, -1)
    order = p.argsort(descending=True).tolist()
    keep = order[: s.top_k] if s.top_k else order
    if s.top_p < 1:
        kept, mass = [], 0.0
        total = float(p[keep].sum())
        for t in keep:  # the smallest head of the ranking whose mass reaches top_p
            kept.append(t)
            mass += float(p[t]) / total
            if mass >= s.top_p:
                break
        keep = kept
    q = torch.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum()


def test_sampled_frequencies_match_each_rows_settings():
    torch.manual_seed(0)
    logits = torch.randn(40) * 2
    settings = [
        SamplingSettings(temperature=1.0, top_k=0),
        SamplingSettings(temperature=0.6, top_k=5),
        SamplingSettings(temperature=1.4, top_k=0, top_p=0.7),
        SamplingSettings(temperature=0.9, top_k=12, top_p=0.8),
    ]
    n = 50_000  # rows per setting, all in one batch with one generator
    rows = [s for s in settings for _ in range(n)]
    gens = [torch.Generator().manual_seed(5)] * len(rows)
    picks = sample_next(logits.expand(len(rows), -1), rows, gens)
    for k, s in enumerate(settings):
        counts = torch.bincount(picks[k * n : (k + 1) * n], minlength=40).double()
        want = expected_probs(logits, s) * n
        kept = want > 0
        assert counts[~kept].sum() == 0, s  # nothing outside the kept set
        # Pearson's chi-square over the kept tokens: mean dof, sd sqrt(2 dof); measured at most
        # dof + 2.4 sd with this sampler (two seeds), dof + 20 sd with temperatures off by ~5%
        chi2 = float(((counts[kept] - want[kept]) ** 2 / want[kept]).sum())
        dof = int(kept.sum()) - 1
        assert chi2 < dof + 8 * (2 * dof) ** 0.5, (s, chi2, dof)


def push_all(decode, ids):
    d, calls = StreamDecoder(decode), []

    def counted(chunk):
        calls.append(len(chunk))
        return decode(chunk)

    d.decode = counted
    pieces = [d.push(t) for t in ids]
    return pieces, calls, d


def test_stream_decoder_is_incremental_and_matches_the_whole_decode(tok):
    path = shared_path("data", "az", "pretrain", "azwiki_sentences_raw.txt")
    text = path.read_text(encoding="utf-8")[:6000]
    ids = tok.encode(text)
    # characters (ə, Cyrillic, dashes) really are split across tokens here
    assert sum("\ufffd" in tok.decode([t]) for t in ids) > 20
    pieces, calls, _ = push_all(tok.decode, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    # bounded work per token: short decodes only, about one per token
    assert max(calls) <= 4 and len(calls) == len(ids)


def test_stream_decoder_on_broken_utf8_stays_bounded_and_exact(tok):
    # a random model emits byte tokens that never complete a character
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(16, tok.vocab_size, (3000,), generator=g).tolist()
    lead = [t for t in range(16, tok.vocab_size) if tok.decode([t]) == "\ufffd"]
    ids = lead * 3 + ids[:1000] + lead * 5 + ids[1000:]
    pieces, calls, d = push_all(tok.decode, ids)
    whole = tok.decode(ids)
    assert "".join(pieces) + tok.decode(d.pending) == whole
    assert len(d.pending) <= StreamDecoder.WINDOW
    assert max(calls) <= StreamDecoder.WINDOW + 1
    assert sum(calls) <= 10 * len(ids)  # tokens decoded in all: measured 2.6 per token
