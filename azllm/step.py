"""The training step: the one place where gradients are made and applied.

`train()`, the memory profiler (`azllm plan --measure`), the quickstart (through `train()`) and
every benchmark run this class, so a figure measured anywhere is a figure of the real step.

One step = for each micro-batch: forward under autocast, loss / grad_accum, (scaled) backward,
with gradient sync between processes only on the last micro-batch; then unscale, clip, optimizer
step, scaler update, zero_grad. Nothing in it waits for the device: the loss comes back as a
tensor, and the caller decides when to read it.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from azllm.batch import Batch
from azllm.device import autocast


class TrainStep:
    """Applies one optimizer step of a global batch to `model`.

    model: the module to call, as wrapped for training (DDP, FSDP2 or compiled); the sync rule
    follows from its type. precision: the autocast precision ("fp32" under FSDP, whose policy
    casts itself). A gradient scaler is made for fp16 (its range needs one; bf16's does not)
    unless one is given (the trainer restores its state from a checkpoint). loss_fn(model,
    micro_batch) -> (loss, stats): another objective on the same step (preference pairs,
    chat.dpo); None = the model's own next-token loss.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        micro_batch: int,
        grad_accum: int,
        grad_clip: float,
        device: torch.device,
        precision: str,
        scaler: torch.amp.GradScaler | None = None,
        loss_fn=None,
    ) -> None:
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.micro_batch, self.grad_accum, self.grad_clip = micro_batch, grad_accum, grad_clip
        self.device, self.precision = device, precision
        if scaler is None:
            scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.scaler = scaler
        from torch.nn.parallel import DistributedDataParallel

        self._ddp = isinstance(model, DistributedDataParallel)
        self._fsdp = hasattr(model, "set_requires_gradient_sync")  # FSDP2's FSDPModule

    def _sync(self, last_micro: bool):
        """Under DDP/FSDP, reduce gradients only on the last micro-batch of the step."""
        if self._fsdp:
            self.model.set_requires_gradient_sync(last_micro)
        elif self._ddp and not last_micro:
            return self.model.no_sync()
        return nullcontext()

    def __call__(self, batch: Batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on `batch` (this process's rows: micro_batch x grad_accum) at learning rate lr.

        Returns (mean loss over the micro-batches, gradient norm before clipping), both still
        on the device.
        """
        for group in self.optimizer.param_groups:  # lr_scale: a group's lr relative to lr
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            part = batch.rows(slice(micro * self.micro_batch, (micro + 1) * self.micro_batch))
            with self._sync(micro == self.grad_accum - 1), autocast(self.device, self.precision):
                # Only the loss is kept: holding the returned logits would keep B*T*V numbers
                # alive through backward for nothing.
                if self.loss_fn is None:
                    loss = self.model(part.inputs, part.targets, segments=part.segments)[1]
                else:
                    loss = self.loss_fn(self.model, part)[0]
                loss = loss / self.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm
