"""The batch contract between data and the training loop, and the rules every source shares.

A `Batch` is what one optimizer step (or one evaluation step) consumes; a `BatchSource` makes
them. Token shards (shards.TokenBatches) and chat data (chat.data.ChatBatches) both implement
the protocol, and so will every later objective (preference pairs, ...): `train()` knows nothing
else about its data.

Two rules live here because every source must follow them the same way:
- which split a document belongs to (`in_val`): a hash of the document, so the split does not
  depend on input order, worker count or earlier runs;
- which rows a step takes (`step_generator`): a function of (seed, split, step) alone, so a
  resumed run, or K processes, see exactly the rows one uninterrupted process would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is imported where it runs: corpus/ uses in_val and never imports torch
    import torch


@dataclass
class Batch:
    """inputs/targets [rows, T] (int64; target -1 = no loss there). segments [rows, T]: one id
    per packed sequence of a row (each restarts its positions and attends only to itself), or
    None when every row is one sequence. ref_logps: per-row numbers a loss hook needs beside
    the tokens (preference pairs: the reference model's log-probs, chat.dpo), or None."""

    inputs: torch.Tensor
    targets: torch.Tensor
    segments: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        extra = (self.segments, self.ref_logps)
        return [t for t in (self.inputs, self.targets, *extra) if t is not None]

    def _map(self, fn) -> Batch:
        seg, ref = (fn(t) if t is not None else None for t in (self.segments, self.ref_logps))
        return Batch(fn(self.inputs), fn(self.targets), seg, ref)

    def rows(self, part: slice) -> Batch:
        return self._map(lambda t: t[part])

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


@runtime_checkable
class BatchSource(Protocol):
    """What the training loop needs from its data."""

    meta: dict  # at least tokenizer_sha256 and vocab_size
    label: str  # names the data in messages (a folder, or the files it came from)
    tokenizer_path: Path  # the tokenizer the data was encoded with; copied into the run

    def has_split(self, split: str) -> bool: ...

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes per trained token of the split, to turn loss into bits per byte."""
        ...

    def batch(self, split: str, step: int, n: int, rows: slice | None = None) -> Batch:
        """The n rows of this step (global over all processes); `rows` picks this process's."""
        ...


def in_val(key: bytes, val_fraction: float) -> bool:
    """The split rule: a document goes to validation by a hash of its bytes."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


def step_generator(seed: int, split: str, key: int | str) -> torch.Generator:
    """A generator seeded by (seed, split, key) alone: the rows a step takes never depend on
    what was drawn before, so no sampler state needs saving."""
    import torch

    digest = hashlib.blake2b(f"{seed}/{split}/{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
