"""train.optimizer = "muon": the Newton-Schulz orthogonalisation, the parameter groups and their
learning rates, the memory the planner counts, and real training runs: one process, DDP and
FSDP (gloo, CPU) giving the same losses, exact resume after a kill, checkpoints resharded."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import assert_resumed_after, kill_after_checkpoint, mark_logged_steps, run_cli
from test_train import TINY, _losses, _torchrun

from azllm.config import Config, ModelConfig, TrainConfig, apply_overrides, load_config
from azllm.errors import AzllmError
from azllm.memory import estimate_peak, optimizer_bytes, param_counts
from azllm.model import GPT
from azllm.optim import Muon, make_optimizer, newton_schulz
from azllm.step import TrainStep

MUON = [*TINY, "--optimizer", "muon"]


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_newton_schulz_orthogonalises(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape) * torch.logspace(-1, 0, shape[1])  # badly conditioned
    s = torch.linalg.svdvals(newton_schulz(g).float())
    # Muon's quintic lands the singular values in about [0.7, 1.2] (measured: 0.68..1.13)
    assert s.min() > 0.6 and s.max() < 1.3, s
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 5


def test_stacked_matrices_are_orthogonalised_each_on_its_own():
    """The optimizer orthogonalises same-shape matrices as one stack: the same as one by one
    (each matrix scaled by its own norm), even when their scales differ by 1000x."""
    torch.manual_seed(4)
    gs = [torch.randn(24, 40) * scale for scale in (1e-3, 1.0, 3.0)]
    stacked = newton_schulz(torch.stack(gs))
    for g, o in zip(gs, stacked, strict=True):
        # measured: at most 6e-7 apart in fp32, 0 in bf16 (the same products, batched)
        assert (o - newton_schulz(g)).abs().max() < 1e-5
        s = torch.linalg.svdvals(o.float())
        assert s.min() > 0.6 and s.max() < 1.3, s


def test_muon_step_on_several_matrices_equals_each_alone():
    """Three same-shape matrices and one of another shape in one group (stacked, in chunks of
    NS_STACK_ELEMENTS) move exactly as each would in a group of its own."""
    torch.manual_seed(5)
    shapes = [(16, 8), (16, 8), (16, 8), (8, 24)]
    w0 = [torch.randn(*s) for s in shapes]
    grads = [[torch.randn(*s) for s in shapes] for _ in range(3)]

    def run(groups_of):
        ws = [torch.nn.Parameter(w.clone()) for w in w0]
        groups = [{"params": [ws[i] for i in g], "muon": True} for g in groups_of]
        opt = Muon(groups, lr=0.02, betas=(0.9, 0.95), momentum=0.95, state_dtype=torch.float32)
        for step in grads:
            for w, g in zip(ws, step, strict=True):
                w.grad = g.clone()
            opt.step()
        return [w.detach() for w in ws]

    together, alone = run([[0, 1, 2, 3]]), run([[0], [1], [2], [3]])
    for a, b, w in zip(together, alone, w0, strict=True):
        assert not torch.equal(a, w)
        assert (a - b).abs().max() < 1e-5  # measured: <= 1e-7 (fp32), 0 (bf16)


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, **kw)
    return GPT(cfg)


def test_groups_muon_for_block_matrices_adamw_for_the_rest():
    model = _model(tie_embeddings=False)
    tc = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [g for g in opt.param_groups if g["muon"]]
    adam = [g for g in opt.param_groups if not g["muon"]]
    assert len(muon) == 1
    in_muon = {names[id(p)] for p in muon[0]["params"]}
    assert in_muon == {
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2
    }
    in_adam = {names[id(p)] for g in adam for p in g["params"]}
    assert {"embed.weight", "lm_head.weight", "norm.weight", "blocks.0.attn_norm.weight"} <= in_adam
    assert in_adam.isdisjoint(in_muon)
    # Each group on the same schedule, at its own peak: the step applies lr * lr_scale.
    step = TrainStep(model, opt, micro_batch=2, grad_accum=1, grad_clip=1.0,
                     device=torch.device("cpu"), precision="fp32")  # fmt: skip
    from azllm.batch import Batch

    x = torch.randint(0, 97, (2, 17))
    step(Batch(x[:, :-1], x[:, 1:]), 5e-4)
    assert muon[0]["lr"] == pytest.approx(5e-4 * 20) and all(g["lr"] == 5e-4 for g in adam)
    assert set(opt.state[muon[0]["params"][0]]) == {"momentum_buffer"}  # one state, not two


def test_muon_weight_decay_shrinks_only_the_block_matrices():
    """train.muon_weight_decay reaches Muon's group: before its update each block matrix is
    scaled by 1 - lr * wd at Muon's own lr (the update itself does not depend on it), while the
    AdamW groups keep train.weight_decay."""
    x = torch.randint(0, 97, (2, 17))
    after = {}
    for wd in (0.0, 0.5):
        model = _model()
        tc = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_weight_decay=wd)
        opt = make_optimizer(model, tc, torch.device("cpu"))
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        step = TrainStep(model, opt, micro_batch=2, grad_accum=1, grad_clip=1.0,
                         device=torch.device("cpu"), precision="fp32")  # fmt: skip
        from azllm.batch import Batch

        step(Batch(x[:, :-1], x[:, 1:]), 1e-3)
        after[wd] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in after[0.5].items():
        if n.startswith("blocks.") and p.dim() == 2:
            # measured: 7e-9 apart (fp32 rounding of the same update on a scaled matrix)
            assert (p - (after[0.0][n] - 0.02 * 0.5 * w0[n])).abs().max() < 1e-7, n
        else:
            assert torch.equal(p, after[0.0][n]), n


def test_muon_update_is_orthogonal_and_shape_scaled():
    """One step from zero momentum: the Nesterov update is a multiple of g, so the change is
    -lr * sqrt(max(1, rows/cols)) * NS(g): its singular values all about equal."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(64, 16))
    opt = Muon([{"params": [w], "muon": True}], lr=0.1, betas=(0.9, 0.95), momentum=0.95,
               state_dtype=torch.float32)  # fmt: skip
    w0 = w.detach().clone()
    w.grad = torch.randn(64, 16) * torch.logspace(-1, 0, 16)
    opt.step()
    s = torch.linalg.svdvals(w.detach() - w0)
    assert s.max() / s.min() < 2.0  # an SGD step would keep the gradient's 15x spread
    assert 0.1 * 2.0 * 0.6 < s.max() < 0.1 * 2.0 * 1.3  # lr x sqrt(64/16) x NS's range


def test_bf16_states_halve_and_track_fp32():
    torch.manual_seed(2)
    w0 = torch.randn(32, 32)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(3)
        w = torch.nn.Parameter(w0.clone())
        opt = Muon([{"params": [w], "muon": True}], lr=0.02, betas=(0.9, 0.95), momentum=0.95,
                   state_dtype=dtype)  # fmt: skip
        for _ in range(10):
            w.grad = torch.randn(32, 32)
            opt.step()
        assert opt.state[w]["momentum_buffer"].dtype == dtype
        runs[dtype] = w.detach()
    moved = (runs[torch.float32] - w0).abs().mean()
    assert (runs[torch.bfloat16] - runs[torch.float32]).abs().mean() < 0.05 * moved


def test_plan_counts_one_state_per_matrix():
    cfg = apply_overrides(load_config("baby"), {"train.optimizer": "adamw"})  # baby's is muon
    p = param_counts(cfg.model)
    model = GPT(cfg.model)
    mats = sum(
        p_.numel()
        for n, p_ in model.named_parameters()
        if n.startswith("blocks.") and p_.dim() == 2
    )
    assert p.block_matrices == mats
    assert optimizer_bytes(p, "fp32", "muon") == 8 * p.total - 4 * mats
    assert optimizer_bytes(p, "bf16", "muon") == 4 * p.total - 2 * mats
    muon = apply_overrides(cfg, {"train.optimizer": "muon"})
    kw = dict(precision="fp32", activation_checkpointing=False, device_type="cpu")
    assert (
        estimate_peak(cfg, 4, **kw)["optimizer"] - estimate_peak(muon, 4, **kw)["optimizer"]
        == 4 * mats
    )


def test_config_refuses_muon_with_8bit_and_unknown_optimizer():
    with pytest.raises(AzllmError, match="8bit"):
        Config(train=TrainConfig(optimizer="muon", optimizer_state="8bit")).validate()
    with pytest.raises(AzllmError, match="train.optimizer"):
        Config(train=TrainConfig(optimizer="sgd")).validate()


def test_muon_trains_and_resumes_exactly_after_a_real_kill(tmp_path, data_dir):
    args = [*MUON, "--data", data_dir, "--max-steps", "80", "--ckpt-interval", "10",
            "--eval-interval", "40"]  # fmt: skip
    ref = tmp_path / "ref"
    run_cli("train", *args, "--out", ref)
    losses = [x for _, x in _losses(ref)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # it learns
    run = tmp_path / "killed"
    killed_at = kill_after_checkpoint(["train", *args, "--out", run], run, 20)
    assert killed_at < 80
    mark_logged_steps(run, killed_at)
    run_cli("train", *args, "--out", run, "--resume")
    assert_resumed_after(run, killed_at, 80)  # continued after the checkpoint, not from 0
    assert _losses(run) == _losses(ref)  # bit for bit: momentum buffers restored


def test_muon_ddp_and_fsdp_match_one_process_and_reshard(tmp_path, data_dir):
    """FSDP shards each matrix by rows: Muon must orthogonalise the whole matrix, not each
    shard (that would be a different update, and the losses would part)."""
    common = [*MUON, "--data", data_dir, "--max-steps", "8", "--eval-interval", "4",
              "--ckpt-interval", "4", "--keep-last", "2", "--optimizer-state", "bf16"]  # fmt: skip
    one = tmp_path / "one"
    run_cli("train", *common, "--out", one, "--micro-batch", "4", "--grad-accum", "2")
    ddp = tmp_path / "ddp"
    _torchrun(*common, "--out", ddp, "--micro-batch", "2", "--grad-accum", "2")
    fsdp = tmp_path / "fsdp"
    _torchrun(*common, "--out", fsdp, "--micro-batch", "2", "--grad-accum", "2",
              "--strategy", "fsdp")  # fmt: skip
    a = [x for _, x in _losses(one)]
    assert len(a) == 8
    assert [x for _, x in _losses(ddp)] == pytest.approx(a, rel=1e-4)
    assert [x for _, x in _losses(fsdp)] == pytest.approx(a, rel=1e-4)
    shards = sorted((fsdp / "checkpoints" / "step-4").glob("*.distcp"))
    assert len(shards) == 2
    # As if killed after step 4: the sharded checkpoint resumes on ONE process.
    shutil.rmtree(fsdp / "checkpoints" / "step-8")
    mark_logged_steps(fsdp, 4)
    run_cli("train", *common, "--out", fsdp, "--micro-batch", "4", "--grad-accum", "2", "--resume")
    assert_resumed_after(fsdp, 4, 8)
    assert [x for _, x in _losses(fsdp)] == pytest.approx(a, rel=1e-4)
