"""The batching engine: every row decodes exactly as it would alone, whatever joins or leaves."""

import threading
import time

import pytest
import torch

from azllm.chat.engine import Engine, wait_all
from azllm.config import ModelConfig
from azllm.errors import AzllmError
from azllm.generate import generate
from azllm.model import GPT

CTX = 64


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    m = GPT(
        ModelConfig(
            arch=request.param,
            vocab_size=300,
            block_size=CTX,
            n_layer=2,
            n_head=4,
            n_embd=64,
            tie_embeddings=False,
        )
    ).eval()
    with torch.no_grad():  # peaked logits: greedy choices far from ties, yet varied text
        m.lm_head.weight.mul_(30)
    return m


@pytest.fixture
def engine(model):
    eng = Engine(model, max_batch=8)
    yield eng
    eng.shutdown()


PROMPTS = [[0, 5, 6, 7], [0, *range(20, 37)], [0, 3], [9] * 25]


def solo(model, prompt, n):
    return generate(model, [prompt], max_new_tokens=n, temperature=0)[0]


def test_batched_greedy_equals_each_prompt_alone(model, engine):
    reqs = [engine.submit(p, max_tokens=30, temperature=0) for p in PROMPTS]
    assert wait_all(reqs) == [solo(model, p, 30) for p in PROMPTS]
    assert engine.stats["max_batch_seen"] > 1
    # one decode step serves every row: far fewer forwards than tokens
    assert engine.stats["steps"] < engine.stats["tokens"] / 2
    for r, p in zip(reqs, PROMPTS, strict=True):
        assert (r.result.finish_reason, r.result.prompt_tokens, r.result.completion_tokens) == (
            "length",
            len(p),
            30,
        )


def test_requests_joining_mid_flight_decode_as_alone(model, engine):
    first = engine.submit(PROMPTS[0], max_tokens=50, temperature=0)
    got = [next(first.stream())]  # the first row is decoding before the others arrive
    later = []
    for p, n in zip(PROMPTS[1:], (20, 35, 10), strict=True):
        later.append(engine.submit(p, max_tokens=n, temperature=0))
        time.sleep(0.01)
    got += list(first.stream())
    assert got == solo(model, PROMPTS[0], 50)
    assert wait_all(later) == [
        solo(model, p, n) for p, n in zip(PROMPTS[1:], (20, 35, 10), strict=True)
    ]


def test_rows_that_fill_the_context_force_a_repack_and_stay_exact(model, engine):
    # the long prompt pads every other row's slots; the rows end at the context's edge
    long_prompt = list(range(40, 40 + 50))
    jobs = [(long_prompt, CTX - 50), ([0, 1], CTX - 2), (list(range(60, 90)), CTX - 30)]
    reqs = [engine.submit(p, max_tokens=n, temperature=0) for p, n in jobs]
    assert wait_all(reqs) == [solo(model, p, n) for p, n in jobs]


def test_each_row_keeps_its_own_sampling_params(model):
    params = [
        dict(temperature=0),
        dict(temperature=1.0, seed=1),
        dict(temperature=0.7, top_k=5, seed=2),
        dict(temperature=1.3, top_p=0.5, seed=3),
        dict(temperature=1.0, top_k=1, seed=4),
    ]
    alone = Engine(model, max_batch=1)
    try:
        ref = [
            list(alone.submit(PROMPTS[i % 4], max_tokens=20, **kw).stream())
            for i, kw in enumerate(params)
        ]
    finally:
        alone.shutdown()
    eng = Engine(model, max_batch=8)
    try:
        reqs = [eng.submit(PROMPTS[i % 4], max_tokens=20, **kw) for i, kw in enumerate(params)]
        assert wait_all(reqs) == ref
        assert eng.stats["max_batch_seen"] > 1
    finally:
        eng.shutdown()
    assert ref[4] == solo(model, PROMPTS[0], 20)  # top_k=1 is greedy, whatever the seed
    assert ref[1] != ref[0]  # sampling really sampled


def test_stop_ids_end_a_row_without_the_stop_token(model, engine):
    full = solo(model, PROMPTS[1], 30)
    k = next(i for i in range(3, 30) if full[i] not in full[:i])  # a token not seen before
    req = engine.submit(PROMPTS[1], max_tokens=30, temperature=0, stop_ids={full[k]})
    other = engine.submit(PROMPTS[0], max_tokens=30, temperature=0)
    assert list(req.stream()) == full[:k]
    assert (req.result.finish_reason, req.result.completion_tokens) == ("stop", k)
    assert list(other.stream()) == solo(model, PROMPTS[0], 30)  # its neighbour goes on
    # the engine has decoded on since: nothing (the stop token included) came after "done"
    assert req.events.empty(), [req.events.get_nowait() for _ in range(req.events.qsize())]


def test_max_batch_bounds_the_batch_and_queues_the_rest(model):
    eng = Engine(model, max_batch=2)
    try:
        reqs = [eng.submit(p, max_tokens=12, temperature=0) for p in PROMPTS + PROMPTS[:2]]
        assert wait_all(reqs) == [solo(model, p, 12) for p in PROMPTS + PROMPTS[:2]]
        assert eng.stats["max_batch_seen"] == 2
    finally:
        eng.shutdown()


def test_cancel_frees_the_row_and_the_engine_keeps_serving(model, engine):
    req = engine.submit([0, 1], max_tokens=CTX - 2, temperature=0)
    stream = req.stream()
    next(stream)
    engine.cancel(req)
    rest = list(stream)
    assert req.result.finish_reason == "cancelled"
    assert 1 + len(rest) < CTX - 2
    assert engine.stats["cancelled"] >= 1
    after = engine.submit(PROMPTS[0], max_tokens=10, temperature=0)
    assert list(after.stream()) == solo(model, PROMPTS[0], 10)


def test_emit_callback_is_called_from_the_engine_thread(engine):
    events, done = [], threading.Event()

    def emit(kind, value):
        events.append((kind, value, threading.current_thread().name))
        if kind == "done":
            done.set()

    engine.submit(PROMPTS[2], max_tokens=5, temperature=0, emit=emit)
    assert done.wait(30)
    assert [e[0] for e in events] == ["token"] * 5 + ["done"]
    assert {e[2] for e in events} == {"azllm-engine"}


def test_requests_that_cannot_fit_are_refused(engine):
    with pytest.raises(AzllmError, match="context"):
        engine.submit(list(range(CTX)), max_tokens=1)
    with pytest.raises(AzllmError, match="at most 4"):
        engine.submit(list(range(CTX - 4)), max_tokens=5)
    with pytest.raises(AzllmError, match="at least 1"):
        engine.submit([0], max_tokens=0)
    with pytest.raises(AzllmError, match="empty"):
        engine.submit([], max_tokens=3)
    req = engine.submit(list(range(CTX - 3)), temperature=0)  # default: up to the context
    assert len(list(req.stream())) == 3


def test_each_row_keeps_its_own_sampling_settings_in_one_batch():
    # the engine hands sample_next one batch of rows with mixed settings and one generator per
    # row: each row must draw exactly what it draws alone (uniform settings, its own generator)
    from azllm.generate import SamplingSettings, sample_next

    torch.manual_seed(1)
    rows = [
        SamplingSettings(temperature=0.0),
        SamplingSettings(temperature=1.0, top_k=0),
        SamplingSettings(temperature=0.7, top_k=5),
        SamplingSettings(temperature=1.3, top_k=0, top_p=0.5),
        SamplingSettings(temperature=0.9, top_k=40, top_p=0.8),
        SamplingSettings(temperature=1.0, top_k=1),
        SamplingSettings(temperature=0.5, top_k=10_000, top_p=0.999),
    ]
    for step in range(20):
        logits = torch.randn(len(rows), 1000) * 3
        gens = [torch.Generator().manual_seed(step * 10 + i) for i in range(len(rows))]
        want = [
            int(sample_next(logits[i : i + 1], [s], [torch.Generator().manual_seed(step * 10 + i)]))
            for i, s in enumerate(rows)
        ]
        assert sample_next(logits, rows, gens).tolist() == want


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(model):
    eng = Engine(model, max_batch=4)
    real_forward, calls = model.forward, [0]

    def forward(*a, **kw):  # the third forward of this engine breaks (say, out of memory)
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        return real_forward(*a, **kw)

    model.forward = forward
    try:
        req = eng.submit(PROMPTS[0], max_tokens=10, temperature=0)
        with pytest.raises(AzllmError, match="RuntimeError: boom"):
            list(req.stream())
        assert list(eng.submit(PROMPTS[1], max_tokens=5, temperature=0).stream()) == solo(
            model, PROMPTS[1], 5
        )
    finally:
        del model.forward
        eng.shutdown()
