import threading
import time

import pytest
import torch

from azllm.batch import Batch
from azllm.loader import Prefetcher
from azllm.shards import TokenBatches


def test_prefetched_batches_are_the_direct_ones(data_dir):
    data = TokenBatches(data_dir, 32, seed=7)

    def make(step):
        return data.batch("train", step, 8, slice(2, 6))

    with Prefetcher(make, range(5, 25), torch.device("cpu"), depth=3) as batches:
        for step in range(5, 25):
            got, want = batches.get(step), make(step)
            assert torch.equal(got.inputs, want.inputs) and torch.equal(got.targets, want.targets)
            assert got.inputs.shape == (4, 32) and got.segments is None


def test_it_builds_ahead_while_the_step_runs():
    built = []

    def make(step):
        built.append(step)
        return Batch(torch.full((2,), step), torch.zeros(2))

    with Prefetcher(make, range(1, 100), torch.device("cpu"), depth=2) as batches:
        first = batches.get(1).inputs
        deadline = time.time() + 5
        while len(built) < 4 and time.time() < deadline:
            time.sleep(0.01)
        # step 1 handed out, 2 and 3 waiting in the queue, 4 built and waiting for room; no more
        assert built == [1, 2, 3, 4]
        assert first.tolist() == [1, 1]


def test_an_error_reaches_the_training_thread_at_its_step():
    def make(step):
        if step == 3:
            raise ValueError("shard 3 is unreadable")
        return Batch(torch.zeros(1), torch.zeros(1))

    with Prefetcher(make, range(1, 10), torch.device("cpu")) as batches:
        batches.get(1)
        batches.get(2)
        with pytest.raises(ValueError, match="shard 3"):
            batches.get(3)


def test_close_stops_the_thread_when_training_stops_early():
    before = threading.active_count()
    batches = Prefetcher(
        lambda s: Batch(torch.zeros(1), torch.zeros(1)), range(10**9), torch.device("cpu"), depth=1
    )
    batches.get(0)
    batches.close()  # the worker is blocked on a full queue: close must still return
    assert threading.active_count() == before
