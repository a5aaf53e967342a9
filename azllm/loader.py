"""Prefetching: the next steps' batches are built in a background thread while this step runs.

A batch is a pure function of the step number (see azllm.batch), so
prefetching changes only when a batch is built, never which one: resume and K-process runs stay
exact. On CUDA the thread also pins the batch in page-locked memory, so the copy to the GPU can
run asynchronously (non_blocking) while the GPU still works on the previous step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from azllm.batch import Batch


class Prefetcher:
    """Yields make_batch(step) for step in steps, on `device`, building up to `depth` ahead.

    Use as a context manager (or call close()) so the thread stops when training stops early.
    An exception raised by make_batch is re-raised by get() for the step it happened at.
    """

    def __init__(
        self,
        make_batch: Callable[[int], Batch],
        steps: range,
        device: torch.device,
        depth: int = 2,
    ) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(make_batch, steps), name="azllm-prefetch", daemon=True
        )
        self._thread.start()

    def _work(self, make_batch: Callable[[int], Batch], steps: range) -> None:
        for step in steps:
            try:
                batch = make_batch(step)
                if self.pin:
                    batch = batch.pin_memory()
                item = (step, batch, None)
            except Exception as e:  # handed to the training thread, which raises it
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def get(self, step: int) -> Batch:
        got, batch, error = self._queue.get()
        if error is not None:
            raise error
        if got != step:  # steps are consumed in order; anything else is a bug in the caller
            raise RuntimeError(f"prefetcher: expected the batch of step {step}, got {got}")
        return batch.to(self.device, non_blocking=self.pin)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
