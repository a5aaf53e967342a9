"""Quantization-aware training (azllm/quant.py, azllm/qat.py): the fake quantization is GGUF's own,
bit for bit; training uses it with a straight-through gradient; `azllm qat` resumes exactly after a
kill; a QAT run exports to its type by default; llama.cpp on that file gives our logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE, assert_resumed_after, kill_after_checkpoint, mark_logged_steps, run_cli

from azllm.checkpoint import load_run
from azllm.config import ModelConfig
from azllm.errors import AzllmError
from azllm.metrics import read_metrics
from azllm.model import GPT
from azllm.quant import (
    QATEmbedding,
    QATLinear,
    apply_qat,
    fake_quantize,
    llama_cpp_cpu,
    quantize_act_q8_0,
)

QAT_ARGS = ["--precision", "fp32", "--log-interval", "1", "--ckpt-interval", "10"]
STEPS = 60


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, tiny_run, data_dir):
    """`azllm qat` (q4_0, fp32) of the tiny pretrained run, uninterrupted: the reference."""
    out = tmp_path_factory.mktemp("qat") / "ref"
    args = ["--run", tiny_run, "--data", data_dir, "--type", "q4_0", "--steps", STEPS]
    run_cli("qat", *args, *QAT_ARGS, "--eval-interval", "20", "--out", out)
    return out


def baked(run, kind: str):
    """(model of `run` whose weights are replaced by their fake-quantized values, its config):
    what a GGUF of that type must hold after dequantization."""
    qat_model, _, cfg = load_run(run)
    apply_qat(qat_model, kind)
    plain = load_run(run)[0]
    mods = dict(plain.named_modules())
    with torch.no_grad():
        for name, m in qat_model.named_modules():
            if isinstance(m, QATLinear | QATEmbedding):
                mods[name].weight.copy_(m.fake_quantized_weight())
    return plain, cfg


# ---- the quantizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_fake_quantize_is_gguf_py_bit_for_bit(kind):
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    rng = np.random.default_rng(0)
    for scale in (1e-9, 1e-6, 1e-3, 0.02, 1.0, 300.0):  # fp16 scales, subnormal to large
        a = (rng.standard_normal((64, 256)) * scale).astype(np.float32)
        a[0, :32] = 0  # a block of zeros: scale 0
        a[1, :32], a[1, 5] = scale, -scale  # equal |x| of both signs: Q4_0 takes the first
        a[2, :32] = np.arange(32, dtype=np.float32) / 31 * scale  # values on rounding ties
        a[3, :32] = np.float32(0.49999997) * scale  # where floor(x + 0.5) rounds otherwise
        a[3, 0] = 127 * scale
        # exact ties x / d = k + 1/2 (scale 1: Q8_0's d = 1, Q4_0's d = 1): round half away
        a[4, :32] = (np.arange(32, dtype=np.float32) - 16.5) * scale
        a[4, 0] = 127 * scale
        a[5, :32] = (np.arange(32, dtype=np.float32) / 2 - 7.5) * scale
        a[5, 0] = -8 * scale
        ref = gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)
        ours = fake_quantize(torch.from_numpy(a), kind).numpy()
        assert np.array_equal(ref.view(np.int32), ours.view(np.int32)), (kind, scale)


def test_straight_through_gradient_is_the_quantized_models_gradient(data_dir, tok):
    """Forward: exactly the model with quantized weights. Backward: the gradient that model's
    weights get, passed unchanged to the full-precision weights."""
    from azllm.shards import TokenBatches

    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=tok.vocab_size)
    cfg.tie_embeddings = False  # embedding Q4_0, output layer Q8_0: both rules exercised
    torch.manual_seed(0)
    qat = apply_qat(GPT(cfg), "q4_0")
    plain = GPT(cfg)
    plain.load_state_dict(qat.state_dict())  # the same parameter names
    mods = dict(plain.named_modules())
    with torch.no_grad():
        for name, m in qat.named_modules():
            if isinstance(m, QATLinear | QATEmbedding):
                mods[name].weight.copy_(m.fake_quantized_weight())
    b = TokenBatches(data_dir, 64, 0).batch("train", 0, 4, slice(0, 4))
    loss_q = qat(b.inputs, b.targets)[1]
    loss_p = plain(b.inputs, b.targets)[1]
    assert torch.equal(loss_q, loss_p)
    loss_q.backward()
    loss_p.backward()
    for (name, p), q in zip(qat.named_parameters(), plain.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.equal(p.grad, q.grad), name


def test_qat_from_scratch_learns_and_chunked_loss_agrees(data_dir, tok):
    from azllm.shards import TokenBatches
    from azllm.step import TrainStep

    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = apply_qat(GPT(cfg), "q4_0")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = TrainStep(
        model,
        opt,
        micro_batch=8,
        grad_accum=1,
        grad_clip=1.0,
        device=torch.device("cpu"),
        precision="fp32",
    )
    data = TokenBatches(data_dir, 64, 0)
    losses = [step(data.batch("train", i, 8, slice(0, 8)), 3e-3)[0].item() for i in range(40)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # gradients reach the weights

    # chunked cross-entropy reads the output layer's weight itself: the quantized one too
    b = data.batch("val", 0, 4, slice(0, 4))
    chunked = apply_qat(GPT(cfg, ce_chunk=100), "q4_0")
    chunked.load_state_dict(model.state_dict())
    plain = GPT(cfg)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        whole, parts = model(b.inputs, b.targets)[1], chunked(b.inputs, b.targets)[1]
        unquantized = plain(b.inputs, b.targets)[1]
    # measured difference 1e-7 (summation order); quantization moves the loss ~1e-3 here
    assert abs(whole - parts) < 1e-5 < 10 * 1e-5 < abs(whole - unquantized)


def test_train_with_qat_trains_the_fake_quantized_model(qat_run, tiny_run, data_dir):
    """The loss logged at step 1 of `azllm qat` is the quantized model's loss on batch 0 (its
    weights are the base run's), not the full-precision model's."""
    from azllm.shards import TokenBatches

    model, _, cfg = load_run(tiny_run)
    tc = load_run(qat_run)[2].train
    assert tc.qat == "q4_0"
    n = tc.micro_batch * tc.grad_accum
    b = TokenBatches(data_dir, cfg.model.block_size, tc.seed).batch("train", 0, n, slice(0, n))
    with torch.no_grad():
        plain = model(b.inputs, b.targets)[1].item()
        quantized = apply_qat(model, "q4_0")(b.inputs, b.targets)[1].item()
    logged = next(r["loss"] for r in read_metrics(qat_run) if r.get("step") == 1 and "loss" in r)
    assert abs(logged - quantized) < 1e-5 < 10 * 1e-5 < abs(logged - plain)


# ---- azllm qat: resume, bad inputs -----------------------------------------------------------


def test_qat_resumes_exactly_after_a_real_kill(tmp_path, qat_run, tiny_run, data_dir):
    run = tmp_path / "killed"
    args = ["--run", tiny_run, "--data", data_dir, "--type", "q4_0", "--steps", STEPS]
    args += [*QAT_ARGS, "--eval-interval", "20", "--out", run]
    killed_at = kill_after_checkpoint(["qat", *args], run, 10)
    assert killed_at < STEPS
    mark_logged_steps(run, killed_at)
    run_cli("qat", *args, "--resume")
    assert_resumed_after(run, killed_at, STEPS)

    def curve(r):
        keys = ("step", "loss", "val_loss", "grad_norm")
        return [{k: m[k] for k in keys if k in m} for m in read_metrics(r)]

    assert curve(run) == curve(qat_run)  # bit for bit, the redone steps included
    ours, ref = load_run(run)[0].state_dict(), load_run(qat_run)[0].state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_run, data_dir):
    run = ["--run", tiny_run, "--data", data_dir]
    proc = run_cli("qat", *run, "--type", "q4_k_m", "--out", tmp_path / "a", check=False)
    _one_line_error(proc, "q4_k_m", "q4_0")
    proc = run_cli("train", "--config", "tiny", "--data", data_dir, "--out", tmp_path / "b",
                   "--qat", "q4_k_m", check=False)  # fmt: skip
    _one_line_error(proc, "q4_k_m", "q4_0")
    # rows of 80 do not split into blocks of 32
    proc = run_cli("train", "--config", "tiny", "--data", data_dir, "--out", tmp_path / "c",
                   "--qat", "q4_0", "--set", "model.n_embd=80", check=False)  # fmt: skip
    _one_line_error(proc, "model.n_embd", "80", "multiple of 32")
    assert not (tmp_path / "c").exists()  # refused before anything was written
    chat = SAMPLE.parent  # not token shards
    proc = run_cli("qat", "--run", tiny_run, "--data", chat, "--type", "q4_0",
                   "--out", tmp_path / "d", check=False)  # fmt: skip
    _one_line_error(proc, "meta.json", "azllm sft")
    proc = run_cli("qat", *run, "--type", "q4_0", "--out", tiny_run, check=False)
    _one_line_error(proc, "--out")
    with pytest.raises(AzllmError, match="multiple of 32"):
        apply_qat(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=48, vocab_size=64)), "q8_0")


# ---- export: the trained type by default, bit for bit, and llama.cpp's logits ----------------


def _gguf_equals_fake_quantized(path, run, kind):
    """Every tensor of the file, dequantized, equals our fake-quantized (or untouched F32)
    weights bit for bit; returns the set of GGUF types in the file."""
    gguf = pytest.importorskip("gguf")
    from azllm.export.gguf import gguf_tensors

    model, cfg = baked(run, kind)
    expected = dict(gguf_tensors(model, cfg.model))
    reader = gguf.GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        want = expected[t.name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.array_equal(got.view(np.int32), want.view(np.int32)), (t.name, t.tensor_type)
    return {t.tensor_type.name for t in reader.tensors}


def test_qat_run_exports_its_type_by_default_bit_for_bit(tmp_path, qat_run):
    pytest.importorskip("gguf")
    from export_fixtures import run_export_cli

    out = tmp_path / "m.gguf"
    proc = run_export_cli("gguf", "--run", qat_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "(q4_0," in proc.stdout
    # tiny ties its output layer to the embedding: Q8_0, the blocks' matrices Q4_0
    assert _gguf_equals_fake_quantized(out, qat_run, "q4_0") == {"F32", "Q8_0", "Q4_0"}
    proc = run_export_cli("gguf", "--run", qat_run, "--out", tmp_path / "f.gguf", "--type", "f16")
    assert proc.returncode == 0 and "trained for q4_0" in proc.stdout


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-tied", "llama-moe"])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_export_equals_fake_quantized_weights(tmp_path, arch, kind):
    """Untied (Q4_0 embedding, Q8_0 output layer) and tied llama, GPT-2 (fused QKV, biases and
    the position table in F32), a mixture of experts (stacked experts quantized, the router
    F32): the quantizer applies the exporter's rule to every tensor."""
    pytest.importorskip("gguf")
    from export_fixtures import random_run

    from azllm.export.gguf import export_gguf

    run = random_run(
        arch.split("-")[0], tie=arch.endswith("tied"), experts=4 * arch.endswith("moe")
    )
    path = export_gguf(run, tmp_path / "m.gguf", kind)
    assert kind.upper() in _gguf_equals_fake_quantized(path, run, kind)


def _plain_tiny_run(tmp_path_factory, data_dir, name: str, **over):
    from azllm.config import apply_overrides, load_config
    from azllm.train import train

    run = tmp_path_factory.mktemp(name) / "run"
    over = {"train.precision": "fp32", "train.max_steps": 60, **over}
    train(apply_overrides(load_config("tiny"), over), data_dir, run, progress=False)
    return run


@pytest.fixture(scope="module")
def untied_run(tmp_path_factory, data_dir):
    """A plain (not QAT) tiny run with its own output layer: Q4_0 embedding, Q8_0 output layer."""
    return _plain_tiny_run(tmp_path_factory, data_dir, "untied", **{"model.tie_embeddings": False})


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, data_dir):
    """A plain tiny GPT-2 run: fused QKV, biases, LayerNorm, GELU (ggml's f16 table)."""
    return _plain_tiny_run(tmp_path_factory, data_dir, "gpt2", **{"model.arch": "gpt2"})


def llama_cpp_vs_ours(path, run, kind, *, emulate=True):
    """(max |logit difference|, the same in float32 epsilons of the largest |logit|) of every
    position of two windows (PARAGRAPH, held-out text) between llama.cpp on the GGUF at path and
    our fake-quantized model, in llama_cpp_cpu or not."""
    from export_fixtures import PARAGRAPH, both_logits, held_out_text

    from azllm.export.llamacpp import loaded

    model, tok, cfg = load_run(run)
    apply_qat(model, kind)
    n = cfg.model.block_size
    windows = [tok.encode(PARAGRAPH)[:n], tok.encode(held_out_text())[1000 : 1000 + n]]
    errs, ulps = [], []
    with loaded(path, logits_all=True) as llm:
        for ids in windows:
            if emulate:
                with llama_cpp_cpu(model):
                    theirs, ours = both_logits(llm, model, ids)
            else:
                theirs, ours = both_logits(llm, model, ids)
            assert ours.std() > 0.5
            errs.append(np.abs(ours - theirs).max(axis=1))
            ulps.append(errs[-1] / (np.abs(theirs).max(axis=1) * np.finfo(np.float32).eps))
    return np.concatenate(errs), np.concatenate(ulps)


# llama.cpp on the exported file vs our model in llama_cpp_cpu (fake-quantized weights, Q8_0
# activations, F16 q/k/v/probabilities, GELU from ggml's f16 table): per position, the max |logit
# difference| over the vocabulary, in float32 epsilons of the position's largest |logit| (logits
# up to ~8 here); two windows; x86-64 AVX2 build of llama-cpp-python 0.3.36. Measured on the six
# cases below: 94.5-100% of the positions 0.6-1.44 epsilons off (2.4e-7..4.8e-7 absolute), i.e.
# float32 rounding: FLOAT_EPS is a few times that. What remains elsewhere is a "flip": a value
# within float32 noise of a rounding boundary (the 8-bit activation grid, or f16) rounds one way
# here and the other way in llama.cpp, which sums in another order (integer block dots, float32
# across blocks; we sum exact products in float64), and that one step travels on through the
# later layers and positions: at most 6.3e-3 absolute (tied Q8_0), on 5.5% of the positions at
# most. On the export tests' 256-wide run (not used here) 73-86% of the positions are within
# 1e-6 and the flips reach 1.1e-2; our own emulation summed in float32 instead of float64 is as
# far from itself (1e-2). Without the emulation (weights fake-quantized only) no position is
# closer than 2e-3 (3,800 epsilons; median 3.7e-3..7.1e-3, max 4.3e-2).
FLOAT_EPS = 4.0
CLEAN_FRACTION = 0.8  # of the positions within FLOAT_EPS; measured 0.945-1.0
FLIP_TOL = 2e-2  # absolute, every position


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("which", ["qat", "untied", "gpt2"])
def test_llama_cpp_logits_equal_our_emulated_model(tmp_path, request, which, kind):
    """The QAT run (tied: Q8_0 embedding and output layer), a plain untied run (Q4_0 embedding,
    Q8_0 output layer) and a plain GPT-2 run, exported to Q8_0 and Q4_0."""
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from azllm.export.gguf import export_gguf

    run = request.getfixturevalue(f"{which}_run")
    path = export_gguf(run, tmp_path / "m.gguf", kind)
    err, eps = llama_cpp_vs_ours(path, run, kind)
    clean = np.mean(eps < FLOAT_EPS)
    assert clean >= CLEAN_FRACTION, f"{which} {kind}: {clean:.2f} within {FLOAT_EPS} epsilons"
    assert err.max() < FLIP_TOL, f"{which} {kind}: max |logit diff| {err.max():.2e}"
    # the emulation is what matches: the weights alone leave every position off
    assert np.mean(llama_cpp_vs_ours(path, run, kind, emulate=False)[1] < FLOAT_EPS) == 0


def test_quantize_act_q8_0_rounds_as_llama_cpp_x86():
    """Blocks of 32, d = amax / 127 kept as fp16, x * (127 / amax) rounded half to even."""
    x = torch.zeros(3, 32)
    x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, 3.25])  # amax 127: x * 1, exact ties
    x[1] = torch.linspace(-1.0, 0.3, 32)  # amax 1: d = 1/127, not an fp16 number
    q = quantize_act_q8_0(x)
    assert q[0, :6].tolist() == [127.0, 0.0, 2.0, 2.0, -2.0, 3.0]
    d = torch.tensor(1 / 127).half().float()
    assert torch.equal(q[1], torch.round(x[1] * 127) * d)
    assert torch.equal(q[2], torch.zeros(32))  # a block of zeros: scale 0, no division by 0
