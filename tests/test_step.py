"""The training step against its definition: accumulation is a mean, clipping bounds the update,
gradients start from zero each step, the learning rate given is the one applied.

Plain SGD is used so an update is exactly -lr x (clipped) gradient: AdamW would hide a wrongly
scaled gradient (its update is almost scale-free).
"""

from __future__ import annotations

import copy

import pytest
import torch

from azllm.batch import Batch
from azllm.config import ModelConfig
from azllm.model import GPT
from azllm.step import TrainStep


def setup(micro: int, accum: int, clip: float = 1e9, model=None):
    torch.manual_seed(0)
    model = model or GPT(ModelConfig(vocab_size=61, block_size=16, n_layer=1, n_head=2, n_embd=16))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = TrainStep(
        model,
        opt,
        micro_batch=micro,
        grad_accum=accum,
        grad_clip=clip,
        device=torch.device("cpu"),
        precision="fp32",
    )
    return model, step


def batch(seed: int = 1, rows: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 61, (rows, 17), generator=g)
    return Batch(x[:, :-1], x[:, 1:])


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_accumulated_micro_batches_equal_one_big_batch():
    big_model, big = setup(micro=8, accum=1)
    acc_model, acc = setup(micro=2, accum=4, model=copy.deepcopy(big_model))
    loss_big, norm_big = big(batch(), lr=0.5)
    loss_acc, norm_acc = acc(batch(), lr=0.5)
    assert loss_acc.item() == pytest.approx(loss_big.item(), rel=1e-5)  # mean, not sum
    assert norm_acc.item() == pytest.approx(norm_big.item(), rel=1e-4)
    assert torch.allclose(params(acc_model), params(big_model), atol=1e-6)


def test_clipping_bounds_the_update_and_the_lr_is_applied():
    model, step = setup(micro=8, accum=1, clip=1e-3)
    before = params(model).clone()
    _, norm = step(batch(), lr=0.5)
    assert norm.item() > 1e-2  # the unclipped norm is reported ...
    moved = (params(model) - before).norm().item()
    assert moved == pytest.approx(0.5 * 1e-3, rel=1e-3)  # ... and the update is lr x clip


def test_each_step_starts_from_zero_gradients():
    model, step = setup(micro=8, accum=1)
    ref_model = copy.deepcopy(model)
    step(batch(1), lr=0.5)
    step(batch(2), lr=0.5)
    # the reference: two plain SGD steps, each on its own batch's gradient
    for seed in (1, 2):
        ref_model.zero_grad()
        b = batch(seed)
        ref_model(b.inputs, b.targets)[1].backward()
        with torch.no_grad():
            for p in ref_model.parameters():
                p -= 0.5 * p.grad
    assert torch.allclose(params(model), params(ref_model), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # freed between steps
