"""Optimizers and the learning-rate schedule.

train.optimizer = "adamw" (default) or "muon": Muon (below) for the blocks' matrices and AdamW
for the rest, in one optimizer object.

AdamW with its two moment estimates in fp32 (torch's), bf16, or 8-bit: optimizer state is 8
bytes per parameter in fp32, the largest single item when training a 100M model in 4 GB; bf16
states halve it, 8-bit (bitsandbytes, CUDA) quarters it.
"""

from __future__ import annotations

import math

import torch

from azllm.config import MUON_STACK_ELEMENTS, lr_of, warmup_of
from azllm.device import cpu_has_fast_bf16
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
            for p in group["params"]:
                if p.grad is not None:
                    adamw_update(p, self.state[p], group, torch.bfloat16)


def adamw_update(p: torch.Tensor, state: dict, group: dict, state_dtype: torch.dtype) -> None:
    """One AdamW step of p, moments stored in state_dtype, computed in fp32."""
    (beta1, beta2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype)
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


def ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 where its matmuls are fast (CUDA; a CPU with AMX or AVX512-BF16: 0.22 s against
    0.59 s in fp32 for baby's 42 matrices here), else fp32. The iteration is insensitive to bf16:
    its result differs from fp32's by 2.5% and from the exact U V^T by 14% either way."""
    return torch.bfloat16 if device.type == "cuda" or cpu_has_fast_bf16() else torch.float32


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (U V^T of its SVD), approximately, in five
    matrix products: the quintic Newton-Schulz iteration of Muon (Keller Jordan's modded-nanogpt,
    also nanochat's). Its coefficients trade exactness (singular values end in ~[0.7, 1.2]) for
    speed. g may be a stack (..., rows, cols) of same-shape matrices, each orthogonalised on its
    own: one batched product per stack instead of one small product per matrix."""
    x = g.to(ns_dtype(g.device))
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)  # spectral <= 1
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


def orthogonalized(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """newton_schulz of each of a list of same-shape updates, in one batched call.

    Under FSDP2 an update is a row shard (DTensor) of its matrix: the full matrix is gathered,
    orthogonalised (every process the same, deterministic) and each process keeps its own rows.
    Orthogonalising shards separately would be a different, wrong update."""
    full = [u.full_tensor() if hasattr(u, "full_tensor") else u for u in updates]
    out = list(newton_schulz(torch.stack(full)).unbind(0))
    for i, u in enumerate(updates):
        if hasattr(u, "full_tensor"):
            from torch.distributed.tensor import DTensor, Replicate

            mesh = u.device_mesh
            out[i] = DTensor.from_local(
                out[i], mesh, [Replicate()] * mesh.ndim, run_check=False
            ).redistribute(mesh, u.placements)
    return out


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked muon=True (2D matrices), AdamW for the other groups.

    One optimizer, so the training step, the grad scaler and the checkpoints (DCP: model and
    optimizer state, resharded across process counts) treat it as they treat AdamW.
    Muon: momentum buffer m <- beta*m + (1-beta)*g; Nesterov update u = (1-beta)*g + beta*m,
    orthogonalised (newton_schulz), scaled by sqrt(max(1, rows/cols)) so every matrix moves by
    the same RMS per step. One state per matrix against AdamW's two. state_dtype: bf16 halves
    both (the update itself is computed in fp32).
    """

    def __init__(self, groups, *, lr: float, betas, momentum: float, state_dtype) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=1e-8, weight_decay=0.0, momentum=momentum, muon=False
        )
        super().__init__(groups, defaults)
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(params, group)
            else:
                for p in params:
                    adamw_update(p, self.state[p], group, self.state_dtype)

    def _muon(self, params: list[torch.Tensor], group: dict) -> None:
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for p in params:  # a DTensor's shape is its whole matrix's
            by_shape.setdefault(tuple(p.shape), []).append(p)
        for same in by_shape.values():
            per = max(1, MUON_STACK_ELEMENTS // same[0].numel())
            for i in range(0, len(same), per):
                chunk = same[i : i + per]
                updates = orthogonalized([self._nesterov(p, group["momentum"]) for p in chunk])
                for p, update in zip(chunk, updates, strict=True):
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                    p.add_(update.to(p.dtype), alpha=-group["lr"] * scale)

    def _nesterov(self, p: torch.Tensor, beta: float) -> torch.Tensor:
        """Momentum m <- beta*m + (1-beta)*g, stored in state_dtype; returns g + beta*(m - g)."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=self.state_dtype)
        g = p.grad.float()
        m = state["momentum_buffer"].float().lerp_(g, 1 - beta)
        state["momentum_buffer"].copy_(m)
        return g.lerp(m, beta)


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
    """The optimizer of a TrainConfig, with its parameter groups.

    train.lr = 0 (derive) is filled in from the model's width here (config.lr_of), so
    every caller's lr_at(step, tc) follows. A group with "lr_scale" runs at lr * lr_scale
    (step.TrainStep): Muon's matrices at train.muon_lr on the same schedule shape.
    """
    tc.lr = lr_of(model.cfg, tc)
    if tc.optimizer == "muon":
        return make_muon(model, tc)
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


def make_muon(model: torch.nn.Module, tc) -> Muon:
    """Muon for the 2D weights inside the blocks; AdamW (at train.lr) for the embeddings, the
    head and the 1D gains and biases, whose gradients are not matrices of a linear map."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if n.startswith("blocks.") and p.dim() == 2]
    mats = [p for n, p in named if not n.startswith("blocks.") and p.dim() >= 2]
    gains = [p for n, p in named if p.dim() < 2]
    groups = [
        {
            "params": muon,
            "muon": True,
            "lr_scale": tc.muon_lr / tc.lr,
            "weight_decay": tc.muon_weight_decay,
        },
        {"params": mats, "weight_decay": tc.weight_decay},
        {"params": gains},
    ]
    return Muon(
        [g for g in groups if g["params"]],
        lr=tc.lr,
        betas=(tc.beta1, tc.beta2),
        momentum=tc.muon_momentum,
        state_dtype=torch.bfloat16 if tc.optimizer_state == "bf16" else torch.float32,
    )


def lr_at(step: int, tc, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio (step counts from 1).

    Progress through the decay is the larger of step / max_steps and, when the run has a time
    budget (train.max_minutes), elapsed time / budget: the schedule ends when the clock does.
    """
    warmup = warmup_of(tc)
    if step <= warmup:
        return tc.lr * step / max(warmup, 1)
    progress = (step - warmup) / max(tc.max_steps - warmup, 1)
    if tc.max_minutes > 0:
        progress = max(progress, elapsed_s / (60 * tc.max_minutes))
    floor = tc.lr * tc.min_lr_ratio
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))
