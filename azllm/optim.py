"""Optimizers: AdamW with its two moment estimates in fp32 (torch's), bf16, or 8-bit.

Optimizer state is 8 bytes per parameter in fp32, the largest single item when training a 100M
model in 4 GB; bf16 states halve it, 8-bit (bitsandbytes, CUDA) quarters it.
"""

from __future__ import annotations

import torch

from azllm.errors import AzllmError


class AdamWBf16State(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) whose moments are stored in bf16.

    The update is computed in fp32 from the stored moments, so only storage is rounded; bf16
    keeps fp32's exponent range, so tiny second moments do not underflow as they would in fp16.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1**t))


def make_adamw(groups, *, lr: float, betas, state: str, device: torch.device):
    if state == "fp32":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")
    if state == "bf16":
        return AdamWBf16State(groups, lr=lr, betas=betas)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise AzllmError(
            "train.optimizer_state = '8bit' needs bitsandbytes: pip install bitsandbytes "
            "(CUDA); or use 'bf16'"
        ) from None
    if device.type != "cuda":
        raise AzllmError("train.optimizer_state = '8bit' needs a CUDA GPU; on a CPU use 'bf16'")
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas)
