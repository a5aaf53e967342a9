"""Mixture of experts: the sparse feed-forward layer of a block (model.n_experts > 0).

Mixtral's design, so the export is a renaming (azllm/export/hf.py, gguf.py):
- a router (`gate`, a bias-free Linear n_embd -> n_experts) scores every token;
- softmax over all experts, keep the top k (model.experts_per_token), renormalise their weights
  to sum to 1 (Mixtral, llama.cpp's llama architecture with expert_weights_norm);
- each expert is a SwiGLU MLP of width model.expert_ffn_dim; the output is the weighted sum of
  the token's k experts.

The experts run batched: every (token, slot) pair is sorted by expert, each expert gets one
contiguous slice and one matmul chain, and the results are index_add-ed back to their tokens. The
Python loop is over experts, never over tokens. Every expert runs, even on zero rows, so all its
parameters are in the graph (DDP and FSDP expect every parameter to get a gradient).

Training losses (model.GPT adds them to the loss in training mode, times their coefficients):
- load balancing (Switch Transformer eq. 4, HF Mixtral's load_balancing_loss_func for one layer):
  E * sum_e f_e * P_e, f_e = fraction of the tokens whose top k holds expert e, P_e = the mean
  router probability of e. An even load with an even router scores k; a router that sends
  everything to the same k experts scores E;
- router z-loss (ST-MoE eq. 5): mean over tokens of logsumexp(router logits)^2, which keeps the
  router logits small (bf16 round-off in the softmax grows with them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from azllm.config import ModelConfig


class Expert(nn.Module):
    """One SwiGLU MLP (the names of model.MLP's llama branch: gate_proj, up_proj, down_proj)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.expert_ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.expert_ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.expert_ffn_dim, cfg.n_embd, bias=False)
        self.down_proj.residual = True  # depth-scaled init (model.GPT._init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class Routing:
    """One layer's routing of N tokens: top-k expert ids [N, k], their renormalised weights
    [N, k] (fp32), and the full softmax [N, E] (fp32) and router logits [N, E]."""

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor


def route(logits: torch.Tensor, k: int) -> Routing:
    """Mixtral's routing of router logits [N, E]: softmax in fp32, top k, renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    return Routing(experts, weights / weights.sum(-1, keepdim=True), probs, logits)


def load_balance_loss(r: Routing, n_experts: int) -> torch.Tensor:
    """E * sum_e f_e * P_e (see the module docstring); differentiable through P only."""
    counts = torch.bincount(r.experts.reshape(-1), minlength=n_experts).float()
    f = counts / r.experts.shape[0]
    return n_experts * (f * r.probs.mean(0)).sum()


def router_z_loss(r: Routing) -> torch.Tensor:
    return torch.logsumexp(r.logits.float(), dim=-1).square().mean()


class MoE(nn.Module):
    """The sparse feed-forward layer: x [B, T, C] -> (output [B, T, C], its Routing); the
    block turns the routing into the training losses (moe_losses)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.k = cfg.n_experts, cfg.experts_per_token
        self.gate = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        r = route(self.gate(h), self.k)
        flat = r.experts.reshape(-1)  # slot j of token i at i*k + j
        order = torch.argsort(flat, stable=True)
        token = order // self.k  # the token of each sorted slot
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # one sync per layer
        parts = h[token].split(counts)
        y = torch.cat([expert(part) for expert, part in zip(self.experts, parts, strict=True)])
        y = y * r.weights.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(h, dtype=y.dtype).index_add_(0, token, y)
        return out.reshape(shape).to(x.dtype), r


def moe_losses(r: Routing, n_experts: int) -> torch.Tensor:
    """[load-balancing loss, router z-loss] of one layer's routing, as one tensor."""
    return torch.stack([load_balance_loss(r, n_experts), router_z_loss(r)])
