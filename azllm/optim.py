"""Optimizers and the learning-rate schedule.

AdamW with its two moment estimates in fp32 (torch's), bf16, or 8-bit: optimizer state is 8
bytes per parameter in fp32, the largest single item when training a 100M model in 4 GB; bf16
states halve it, 8-bit (bitsandbytes, CUDA) quarters it.
"""

from __future__ import annotations

import math

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


def make_optimizer(model: torch.nn.Module, tc, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of a TrainConfig, with its parameter groups."""
    # Matrices decay; biases and norm gains do not (decaying them only hurts).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return make_adamw(
        groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), state=tc.optimizer_state, device=device
    )


def lr_at(step: int, tc, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (step counts from 1).

    Progress through the decay is the larger of step / max_steps and, when the run has a time
    budget (train.max_minutes), elapsed time / budget: the schedule ends when the clock does.
    """
    if step <= tc.warmup_steps:
        return tc.lr * step / max(tc.warmup_steps, 1)
    progress = (step - tc.warmup_steps) / max(tc.max_steps - tc.warmup_steps, 1)
    if tc.max_minutes > 0:
        progress = max(progress, elapsed_s / (60 * tc.max_minutes))
    floor = tc.lr * tc.min_lr_ratio
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))
