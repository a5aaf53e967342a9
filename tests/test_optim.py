import pytest
import torch

from azllm.config import apply_overrides, derived_lr, derived_warmup, fill_derived, load_config
from azllm.errors import AzllmError
from azllm.model import GPT
from azllm.optim import AdamWBf16State, lr_at, make_adamw, make_optimizer


def test_bf16_state_adamw_follows_torch_adamw():
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    ref, ours = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt = AdamWBf16State([ours], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(64, 32)
        ref.grad, ours.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    assert opt.state[ours]["exp_avg"].dtype == torch.bfloat16  # half the state memory
    moved = (ref.detach() - w0).abs().mean()
    assert (ours.detach() - ref.detach()).abs().mean() < 0.02 * moved
    # state round-trips through state_dict (checkpoints)
    sd = opt.state_dict()
    opt2 = AdamWBf16State([torch.nn.Parameter(ours.detach().clone())], lr=1e-2)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg_sq"], sd["state"][0]["exp_avg_sq"])


def test_8bit_states_need_cuda_and_bitsandbytes():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(AzllmError, match="8bit"):
        make_adamw(p, lr=1e-3, betas=(0.9, 0.95), state="8bit", device=torch.device("cpu"))


def test_lr_follows_width_when_not_set(tmp_path):
    """train.lr = 0 (the default): the AdamW lr from the width and the optimizer. AdamW on every
    parameter: lr ~ n_embd^-0.75 (the presets' former hand-set values: baby 1e-3, small 8e-4,
    az-100m 6e-4, within 3%). Under Muon (the presets from baby up) AdamW trains only the
    embeddings and gains: 10x that rule, the same slope."""
    hand_set = {"baby": 1e-3, "small": 8e-4, "az-100m": 6e-4}
    for preset, lr in hand_set.items():
        cfg = load_config(preset)
        assert cfg.train.lr == 0 and cfg.train.optimizer == "muon"
        assert derived_lr(cfg.model, "adamw") == pytest.approx(lr, rel=0.03)
        adamw = apply_overrides(cfg, {"optimizer": "adamw"})
        assert fill_derived(adamw).train.lr == derived_lr(cfg.model, "adamw")
        muon = derived_lr(cfg.model, "muon")
        assert muon == pytest.approx(10 * lr, rel=0.03)
        assert fill_derived(cfg).train.lr == muon
    narrow, wide = (apply_overrides(load_config("baby"), {"model.n_embd": w}) for w in (192, 768))
    assert derived_lr(narrow.model) / derived_lr(wide.model) == pytest.approx(4**0.75)
    muon_ratio = derived_lr(narrow.model, "muon") / derived_lr(wide.model, "muon")
    assert muon_ratio == pytest.approx(4**0.75)
    # set by the user: kept
    assert fill_derived(apply_overrides(load_config("baby"), {"lr": 2e-3})).train.lr == 2e-3
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "small"\n[model]\nn_embd = 256\n[train]\nlr = 0\n')
    cfg = load_config(str(toml))
    assert fill_derived(cfg).train.lr == pytest.approx(1e-2 * 1.5**0.75)  # small's recipe: Muon
    # every caller of make_optimizer gets it too, and lr_at follows
    for optimizer in ("muon", "adamw"):
        cfg = apply_overrides(load_config("baby"), {"optimizer": optimizer})
        cfg.model.vocab_size = 64
        opt = make_optimizer(GPT(cfg.model), cfg.train, torch.device("cpu"))
        assert cfg.train.lr == opt.param_groups[-1]["lr"] == derived_lr(cfg.model, optimizer)
    assert lr_at(1, cfg.train) == pytest.approx(cfg.train.lr / 40, rel=1e-5)  # AdamW: warmup


def test_warmup_follows_the_optimizer_when_not_set(tmp_path):
    """train.warmup_steps = -1 (the default): none with Muon (the presets from baby up), Adam's
    2 / (1 - beta2) steps with AdamW, at most a tenth of the run; a set value is kept."""
    baby = load_config("baby")
    assert baby.train.warmup_steps == -1 and baby.train.optimizer == "muon"
    assert derived_warmup(baby.train) == 0 and fill_derived(baby).train.warmup_steps == 0
    adamw = apply_overrides(load_config("baby"), {"optimizer": "adamw", "max_steps": 2000})
    assert derived_warmup(adamw.train) == 40  # beta2 0.95
    adamw.train.beta2 = 0.99
    assert derived_warmup(adamw.train) == 200
    adamw.train.max_steps = 300  # a short run warms up for at most a tenth of it
    assert fill_derived(adamw).train.warmup_steps == 30
    assert (
        fill_derived(apply_overrides(load_config("baby"), {"warmup_steps": 7})).train.warmup_steps
        == 7
    )
    # lr_at resolves -1 the same way, also when nothing filled it in (benchmarks' own loops)
    tc = apply_overrides(load_config("baby"), {"optimizer": "adamw", "lr": 1e-3}).train
    assert tc.warmup_steps == -1
    assert lr_at(20, tc) == pytest.approx(0.5e-3) and lr_at(40, tc) == pytest.approx(1e-3)
    muon = apply_overrides(load_config("baby"), {"lr": 1e-3}).train
    assert lr_at(1, muon) == pytest.approx(1e-3, rel=1e-4)  # no warmup: the peak at step 1
    with pytest.raises(AzllmError, match="warmup_steps must be -1"):
        apply_overrides(load_config("baby"), {"warmup_steps": -2}).validate()
