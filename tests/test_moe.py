"""Mixture of experts (model.n_experts, azllm/moe.py): Mixtral's routing and the two router
losses against their formulas and slow references; the batched layer under checkpointing,
packing, the KV cache and the batching engine; then a trained MoE through train -> resume ->
generate -> serve -> export HF (transformers' MixtralForCausalLM) -> export GGUF (f32, f16, q8_0,
q4_k_m) -> llama.cpp."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import mark_logged_steps
from export_fixtures import PROMPTS, _data_dir, _workdir, both_logits, held_out_text

from azllm.checkpoint import load_run
from azllm.config import Config, ModelConfig, TrainConfig
from azllm.errors import AzllmError
from azllm.generate import generate
from azllm.model import GPT
from azllm.moe import MoE, load_balance_loss, route, router_z_loss

E, K = 4, 2  # 4 experts, 2 per token


def small(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, n_experts=E,
        experts_per_token=K, expert_ffn_hidden=48, tie_embeddings=False,
    )  # fmt: skip
    return GPT(cfg, **kw)


# ---- routing and its losses ------------------------------------------------------------------


def test_routing_is_softmax_top_k_renormalised():
    # probabilities 0.1, 0.3, 0.2, 0.4: the top two are experts 3 and 1, weights 4/7 and 3/7
    logits = torch.tensor([[1.0, 3.0, 2.0, 4.0]]).log()
    r = route(logits, 2)
    assert r.experts.tolist() == [[3, 1]]
    assert r.weights[0].tolist() == pytest.approx([4 / 7, 3 / 7], abs=1e-6)
    r = route(torch.randn(50, E), K)
    assert torch.allclose(r.weights.sum(-1), torch.ones(50))
    assert torch.allclose(r.probs, torch.softmax(r.logits, -1))


def slow_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the definition."""
    out = torch.zeros_like(x)
    for i, h in enumerate(x):
        p = torch.softmax(moe.gate(h), -1)
        top = sorted(range(E), key=lambda e: -p[e].item())[:K]
        total = sum(p[e] for e in top)
        for e in top:
            out[i] += p[e] / total * moe.experts[e](h)
    return out


def test_batched_experts_equal_a_per_token_reference():
    moe = small().blocks[0].mlp
    with torch.no_grad():
        moe.gate.weight.mul_(20)  # routing far from uniform: different tokens, different experts
    x = torch.randn(2, 7, 32)
    y, r = moe(x)
    assert len(set(r.experts.flatten().tolist())) == E  # every expert got some tokens
    assert torch.allclose(y.reshape(14, 32), slow_moe(moe, x.reshape(14, 32)), atol=1e-6)


def test_an_expert_without_tokens_still_gets_a_gradient():
    # One token reaches 2 of 4 experts; DDP/FSDP need every parameter in the graph anyway.
    moe = small().blocks[0].mlp
    moe(torch.randn(1, 1, 32))[0].sum().backward()
    assert all(p.grad is not None for p in moe.parameters())


def test_load_balance_loss_formula():
    # 4 tokens, routing by hand: top-2 sets {0,1}, {0,1}, {0,2}, {3,2}
    probs = torch.tensor(
        [[0.5, 0.3, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1], [0.1, 0.1, 0.3, 0.5]]
    )
    r = route(probs.log(), K)
    f = [3 / 4, 2 / 4, 2 / 4, 1 / 4]  # share of the tokens whose top 2 hold each expert
    p = probs.mean(0).tolist()
    want = E * sum(fe * pe for fe, pe in zip(f, p, strict=True))
    assert load_balance_loss(r, E).item() == pytest.approx(want, rel=1e-6)
    # the extremes: a uniform router scores k, one that always picks the same two scores E
    assert load_balance_loss(route(torch.zeros(8, E), K), E).item() == pytest.approx(K)
    collapsed = torch.tensor([[20.0, 20.0, -20.0, -20.0]]).repeat(8, 1)
    assert load_balance_loss(route(collapsed, K), E).item() == pytest.approx(E, rel=1e-4)


def test_load_balance_loss_equals_transformers_for_one_layer():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = torch.randn(40, E)
    theirs = mixtral.load_balancing_loss_func((logits,), E, K)
    assert load_balance_loss(route(logits, K), E).item() == pytest.approx(theirs.item(), rel=1e-5)


def test_router_z_loss_formula():
    logits = torch.randn(10, E, dtype=torch.float64)
    want = np.mean([math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()])
    assert router_z_loss(route(logits, K)).item() == pytest.approx(want, rel=1e-6)


def _routings(model: GPT, x: torch.Tensor) -> list:
    """Each layer's Routing of one forward of x."""
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(o[1])) for b in model.blocks]
    model(x, x)
    for h in hooks:
        h.remove()
    return seen


def test_training_loss_adds_the_router_losses_times_their_coefficients():
    model = small()
    x = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(1))
    model.eval()
    ce = model(x, x)[1].item()  # evaluation: plain cross-entropy, whatever the coefficients
    assert ce == pytest.approx(F.cross_entropy(model(x)[0].view(-1, 97), x.view(-1)).item())
    model.train()
    rs = _routings(model, x)
    balance = np.mean([load_balance_loss(r, E).item() for r in rs])
    z = np.mean([router_z_loss(r).item() for r in rs])
    assert model.moe_aux.tolist() == pytest.approx([balance, z], rel=1e-5)  # what train logs
    for coefs in ((0.0, 0.0), (0.3, 0.0), (0.0, 0.05), (0.3, 0.05)):
        model.moe_coefs = coefs
        want = ce + coefs[0] * balance + coefs[1] * z
        assert model(x, x)[1].item() == pytest.approx(want, rel=1e-5), coefs


def test_the_balance_loss_gradient_evens_out_the_load():
    """Gradient descent on the balance loss alone moves the router's load toward uniform."""
    model = small(moe_aux_loss=1.0)
    router = model.blocks[0].mlp.gate
    with torch.no_grad():  # start unbalanced: most tokens go to experts 0 and 1
        router.weight[:2] += 0.3 * torch.randn(32).sign()
    x = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD([router.weight], lr=0.5)
    model.train()
    before = load_balance_loss(_routings(model, x)[0], E).item()
    for _ in range(30):
        opt.zero_grad()
        aux = load_balance_loss(_routings(model, x)[0], E)
        aux.backward()
        opt.step()
    after = load_balance_loss(_routings(model, x)[0], E).item()
    # measured: 2.057 -> 2.0007 (the minimum is K = 2); the wrong sign moves away from K
    assert before > K + 0.03 and after - K < 0.25 * (before - K), (before, after)


# ---- the layer inside the model --------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    a, b = small(moe_aux_loss=0.5, moe_z_loss=0.1), small(activation_checkpointing=True)
    b.moe_coefs = a.moe_coefs
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(3))
    losses = []
    for m in (a, b):
        m.train()
        loss = m(x, x)[1]
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name
    assert a.blocks[0].mlp.gate.weight.grad.abs().sum() > 0


def test_packed_rows_give_each_sequence_its_own_logits():
    model = small().eval()
    g = torch.Generator().manual_seed(4)
    s1, s2 = torch.randint(0, 97, (1, 12), generator=g), torch.randint(0, 97, (1, 20), generator=g)
    segments = torch.tensor([[0] * 12 + [1] * 20])
    with torch.no_grad():
        packed = model(torch.cat([s1, s2], 1), segments=segments)[0]
        alone = torch.cat([model(s1)[0], model(s2)[0]], 1)
    assert torch.allclose(packed, alone, atol=1e-5)


@pytest.fixture(scope="module")
def peaked():
    model = small(seed=5).eval()
    with torch.no_grad():  # peaked logits: greedy choices far from ties
        model.lm_head.weight.mul_(30)
    return model


CHAT_PROMPTS = [[0, 5, 6, 7], [0, *range(20, 31)], [0, 3], [9] * 14]


def test_kv_cache_greedy_equals_recomputing_everything(peaked):
    cached = generate(peaked, CHAT_PROMPTS, max_new_tokens=14, temperature=0)
    full = generate(peaked, CHAT_PROMPTS, max_new_tokens=14, temperature=0, use_cache=False)
    assert cached == full
    assert len({tuple(c) for c in cached}) > 1


def test_batching_engine_decodes_each_prompt_as_alone(peaked):
    from azllm.chat.engine import Engine, wait_all

    eng = Engine(peaked, max_batch=4)
    try:
        got = wait_all([eng.submit(p, max_tokens=14, temperature=0) for p in CHAT_PROMPTS])
    finally:
        eng.shutdown()
    assert got == [generate(peaked, [p], max_new_tokens=14, temperature=0)[0] for p in CHAT_PROMPTS]


# ---- configuration, counting ------------------------------------------------------------------


def test_bad_expert_settings_are_one_line_errors():
    from conftest import run_cli

    with pytest.raises(AzllmError, match=r"experts_per_token \(3\) exceeds model.n_experts \(2\)"):
        ModelConfig(n_experts=2, experts_per_token=3).validate()
    with pytest.raises(AzllmError, match="arch='llama'"):
        ModelConfig(arch="gpt2", n_experts=4).validate()
    with pytest.raises(AzllmError, match="moe_aux_loss"):
        TrainConfig(moe_aux_loss=-1.0).validate()
    proc = run_cli(
        "model", "summary", "--config", "tiny", "--set", "model.n_experts=2",
        "model.experts_per_token=3", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "experts_per_token" in proc.stderr


def test_total_active_and_expert_parameters_are_counted():
    from conftest import run_cli

    from azllm.memory import param_counts

    model = small()
    cfg = model.cfg
    one_expert = sum(p.numel() for p in model.blocks[0].mlp.experts[0].parameters())
    idle = cfg.n_layer * (E - K) * one_expert
    assert model.num_active_params() == model.num_params() - idle
    p = param_counts(cfg)
    assert (p.total, p.active, p.experts) == (
        model.num_params(),
        model.num_params() - idle,
        cfg.n_layer * E * one_expert,
    )
    out = run_cli("model", "summary", "--config", "tiny", "--set", "model.n_experts=4").stdout
    assert "MoE: 4 experts" in out and "active" in out


# ---- a trained MoE, end to end ------------------------------------------------------------------

STEPS = 160  # checkpoints at 80 and 160


def _train(name: str, resume: bool = False):
    from azllm.train import train

    model = ModelConfig(
        block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, n_experts=E,
        experts_per_token=K, expert_ffn_hidden=256,  # rows of 256: real K-quants in GGUF
    )  # fmt: skip
    tc = TrainConfig(
        micro_batch=8, grad_accum=1, max_steps=STEPS, warmup_steps=20, lr=3e-3,
        eval_interval=40, eval_batches=1, log_interval=10, ckpt_interval=80, keep_last=2,
        device="cpu", seed=1234,
    )  # fmt: skip
    run = _workdir() / name
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model, shared machine: one thread is fastest
    try:
        train(Config(model=model, train=tc), _data_dir(_workdir()), run, resume=resume,
              progress=False)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def run():
    done = _workdir() / "run-moe"
    return done if (done / "model.safetensors").exists() else _train(done.name)  # reused (env)


def test_training_logs_the_router_losses_and_resumes_exactly(run):
    from azllm.checkpoint import model_state
    from azllm.metrics import read_metrics

    rows = [r for r in read_metrics(run) if "loss" in r]
    assert all(K <= r["moe_balance_loss"] <= E for r in rows)  # between uniform and collapsed
    assert all(r["moe_router_z"] > 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    # as if killed after the step-80 checkpoint: the resume must end where the run ended
    resumed = _workdir() / "run-moe-resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS}")
    (resumed / "model.safetensors").unlink()
    mark_logged_steps(resumed, STEPS // 2)
    _train(resumed.name, resume=True)
    # continued after the checkpoint (rows up to it untouched), not retrained from step 0
    logged = [
        (r["step"], bool(r.get("before_resume"))) for r in read_metrics(resumed) if "loss" in r
    ]
    assert logged == [(s, s <= STEPS // 2) for s in range(10, STEPS + 1, 10)]
    a = model_state(load_run(run)[0])
    b = model_state(load_run(resumed)[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_model_uses_every_expert(run):
    model, tok, _ = load_run(run)
    ids = torch.tensor([tok.encode(held_out_text())[:64]])
    with torch.no_grad():
        rs = _routings(model, ids)
    for r in rs:
        load = torch.bincount(r.experts.flatten(), minlength=E) / r.experts.numel()
        assert load.min() > 0.05, load.tolist()


def test_serve_answers_with_our_greedy_continuation(run):
    from chat_fixtures import ServerProcess, post_json

    model, tok, _ = load_run(run)
    ids = [tok.bos_id] + tok.encode(PROMPTS[1])
    ours = generate(model, [ids], max_new_tokens=12, temperature=0)[0]
    srv = ServerProcess(run)
    try:
        body = {"prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        status, out = post_json(srv.url + "/v1/completions", body)
    finally:
        srv.stop()
    assert status == 200, out
    assert out["choices"][0]["text"] == tok.decode(ours)


def test_hf_export_is_a_mixtral_with_our_logits(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from azllm.export.hf import export_hf

    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (E, K)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    model, tok, _ = load_run(run)
    ids = torch.tensor([tok.encode(held_out_text())[500:564]])
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)[0]
    # measured: 0.0 (the same fp32 ops in the same order); 1e-4 is the bar
    assert (theirs - ours).abs().max().item() < 1e-4
    assert ours.std() > 0.5


# ---- GGUF and llama.cpp -----------------------------------------------------------------------

gguf_kinds = ("f32", "f16", "q8_0", "q4_k_m")


@pytest.fixture(scope="module")
def ggufs(run, tmp_path_factory):
    pytest.importorskip("gguf")
    from azllm.export.gguf import export_gguf

    root, made = tmp_path_factory.mktemp("moe-gguf"), {}

    def get(kind: str):
        if kind not in made:
            made[kind] = export_gguf(run, root / f"moe-{kind}.gguf", kind)
        return made[kind]

    return get


def test_gguf_holds_llama_cpp_s_expert_layout(ggufs):
    import gguf

    q = gguf.GGMLQuantizationType
    k_quants = {q.Q4_K, q.Q5_K, q.Q6_K}  # Q4_K_M keeps some ffn_down at Q6_K
    for kind, main in (("q8_0", {q.Q8_0}), ("q4_k_m", k_quants)):
        r = gguf.GGUFReader(ggufs(kind))
        fields = {k: f.parts[-1].tolist()[0] for k, f in r.fields.items() if k.startswith("llama.")}
        assert (fields["llama.expert_count"], fields["llama.expert_used_count"]) == (E, K)
        assert fields["llama.feed_forward_length"] == 256
        t = {x.name: x for x in r.tensors}
        assert "blk.0.ffn_up.weight" not in t
        assert t["blk.0.ffn_gate_inp.weight"].tensor_type == q.F32
        for p in ("gate", "up", "down"):
            stacked = t[f"blk.1.ffn_{p}_exps.weight"]
            assert stacked.shape.tolist() == [256, 256, E]  # GGUF lists dimensions innermost first
            assert stacked.tensor_type in main  # the experts really are K-quants
        assert q.Q4_K in {x.tensor_type for x in r.tensors} or kind == "q8_0"


def test_llama_cpp_greedy_equals_ours(run, ggufs):
    pytest.importorskip("llama_cpp")
    from azllm.export.llamacpp import greedy, loaded

    model, tok, _ = load_run(run)
    for kind in ("f32", "f16"):
        with loaded(ggufs(kind)) as llm:
            for prompt in PROMPTS[:3]:
                ids = tok.encode(prompt)
                ours = generate(model, [ids], max_new_tokens=24, temperature=0)[0]
                theirs = greedy(llm, ids, 24)
                if theirs != ours:  # only a near-tie in our own logits may tell them apart
                    k = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
                    with torch.no_grad():
                        logits = model(torch.tensor([ids + ours[:k]]))[0][0, -1]
                    gap = (logits[ours[k]] - logits[theirs[k]]).abs().item()
                    assert gap < TIE[kind], f"{kind} {prompt!r}: token {k}, gap {gap:.2e}"


# Largest |logit difference| ours vs llama.cpp over two 64-token windows, about 3x the measured
# (2 cores, x86-64; logits std > 0.5): f32 1.2e-3, f16 2.0e-3. TIE: the largest gap between our
# top two logits at which llama.cpp may pick the other one (its logits are off by < LOGITS).
LOGITS = {"f32": 4e-3, "f16": 6e-3}
TIE = LOGITS


@pytest.mark.parametrize("kind", list(LOGITS))
def test_llama_cpp_logits_equal_ours(run, ggufs, kind):
    pytest.importorskip("llama_cpp")
    from azllm.export.llamacpp import loaded

    model, tok, _ = load_run(run)
    text = tok.encode(held_out_text())
    with loaded(ggufs(kind), logits_all=True) as llm:
        for ids in (text[:64], text[1000:1064]):
            theirs, ours = both_logits(llm, model, ids)
            err = np.abs(ours - theirs).max()
            assert err < LOGITS[kind], f"{kind}: max |logit diff| {err:.2e}"
            assert ours.std() > 0.5


# Relative bits-per-byte difference llama.cpp vs ours on the held-out text, about 3x the larger
# measured on two CPUs (Intel with AMX / AMD with AVX512-BF16: llama.cpp's kernels differ):
# f32 7.2e-7 / 9.7e-6, f16 5.5e-7 / 2.0e-5, q8_0 3.3e-5 / 7.8e-6, q4_k_m 1.1e-4 / 3.4e-4 (the
# issue's bar: 1%).
BPB = {"f32": 3e-5, "f16": 6e-5, "q8_0": 2e-4, "q4_k_m": 1e-3}


def test_llama_cpp_bits_per_byte_close_to_ours(run, ggufs, tmp_path):
    pytest.importorskip("llama_cpp")
    from azllm.evaluate import evaluate_text
    from azllm.export.gguf import gguf_eval

    model, tok, _ = load_run(run)
    text = held_out_text()
    (tmp_path / "held_out.txt").write_text(text, encoding="utf-8")
    ours = evaluate_text(model, tok, text)
    for kind in gguf_kinds:
        res = gguf_eval(ggufs(kind), tmp_path / "held_out.txt")
        assert res["tokens"] == ours["tokens"]
        rel = abs(res["bpb"] - ours["bpb"]) / ours["bpb"]
        assert rel < BPB[kind], f"{kind}: bpb {res['bpb']:.6f} vs {ours['bpb']:.6f}"


def test_export_refuses_moe_with_qk_norm():
    from azllm.export.hf import refuse_unexported

    with pytest.raises(AzllmError, match="n_experts with model.qk_norm"):
        refuse_unexported(ModelConfig(n_experts=4, qk_norm=True), "GGUF")


def test_ddp_and_fsdp_match_one_process(tmp_path, data_dir):
    """Every expert runs on every step (empty ones on zero rows), so DDP and FSDP see every
    parameter used and reduce the same gradients: two processes of 2 rows give the losses of
    one process of 4 rows. (The router losses are taken per micro-batch, as Mixtral's are, so
    they differ a little between the splits: 0.01 x a load statistic, well inside 1e-4 of the
    loss here.)"""
    from conftest import run_cli
    from test_train import TINY, _losses, _torchrun

    moe = ["--set", f"model.n_experts={E}", f"model.experts_per_token={K}"]
    common = [*TINY, "--data", data_dir, "--max-steps", "6", "--eval-interval", "3",
              "--ckpt-interval", "3", *moe]  # fmt: skip
    one = tmp_path / "one"
    run_cli("train", *common, "--out", one, "--micro-batch", "4", "--grad-accum", "2")
    a = [x for _, x in _losses(one)]
    assert len(a) == 6
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        _torchrun(*common, "--out", out, "--micro-batch", "2", "--grad-accum", "2",
                  "--strategy", strategy)  # fmt: skip
        assert [x for _, x in _losses(out)] == pytest.approx(a, rel=1e-4), strategy
