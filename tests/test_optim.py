import pytest
import torch

from azllm.errors import AzllmError
from azllm.optim import AdamWBf16State, make_adamw


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
