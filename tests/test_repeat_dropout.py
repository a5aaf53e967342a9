"""train.repeat_dropout: no dropout while each training token is new, dropout once the data
repeats (from the step whose batch starts the second pass), resumed exactly after that switch."""

import math
import shutil

import pytest
from conftest import SAMPLE
from torch import nn

from azllm.checkpoint import checkpoint_dirs
from azllm.config import apply_overrides, load_config
from azllm.errors import AzllmError
from azllm.memory import estimate_peak
from azllm.metrics import read_metrics
from azllm.model import GPT, Attention
from azllm.shards import tokenize_to_shards
from azllm.train import train

STEPS = 30


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tok):
    """Two sample files: a pass of `tiny`'s 256-token steps ends part-way through STEPS."""
    out = tmp_path_factory.mktemp("small") / "shards"
    files = sorted(SAMPLE.glob("0[12]_*.txt"))
    meta = tokenize_to_shards(tok, files, out, val_fraction=0.1, progress=False)
    return out, meta["splits"]["train"]["tokens"]


def _cfg(**over):
    return apply_overrides(
        load_config("tiny"),
        {"train.precision": "fp32", "train.max_steps": STEPS, "train.log_interval": 1,
         "train.eval_interval": STEPS, "train.ckpt_interval": 4, "train.keep_last": 10, **over},
    )  # fmt: skip


def _losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_dropout_turns_on_when_the_data_repeats_and_resumes_exactly(tmp_path, small_data):
    data, train_tokens = small_data
    per_step = 4 * 64  # tiny: micro_batch 4, context 64
    switch = math.ceil(train_tokens / per_step) + 1  # the first step that draws a repeat
    assert 4 < switch < STEPS - 4, "the data must end part-way through the run"

    runs = {}
    for name, over in {
        "none": {},
        "repeat": {"train.repeat_dropout": 0.5},
        "always": {"model.dropout": 0.5},
    }.items():
        runs[name] = tmp_path / name
        train(_cfg(**over), data, runs[name], progress=False)
    none, repeat, always = (_losses(runs[n]) for n in ("none", "repeat", "always"))

    # Before the switch the run is the run without dropout, bit for bit (and dropout at this
    # rate does change a step: the run with it from the start differs at step 1) ...
    assert all(repeat[s] == none[s] for s in range(1, switch))
    assert always[1] != none[1]
    # ... from the switch on, dropout is on, and the switch is logged at its step.
    assert repeat[switch] != none[switch]
    assert [r for r in read_metrics(runs["repeat"]) if "dropout" in r] == [
        {"step": switch, "dropout": 0.5}
    ]

    # Resumed from a checkpoint after the switch, the rate is the step's, not the model's as
    # built: the rest of the curve is the uninterrupted one's, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["repeat"], resumed)
    after = next(c for c in checkpoint_dirs(resumed) if int(c.name.split("-")[1]) > switch)
    for c in checkpoint_dirs(resumed):
        if int(c.name.split("-")[1]) > int(after.name.split("-")[1]):
            shutil.rmtree(c)
    train(_cfg(**{"train.repeat_dropout": 0.5}), data, resumed, resume=True, progress=False)
    assert _losses(resumed) == repeat


def test_repeat_dropout_is_validated_counted_by_the_plan_and_reaches_every_layer():
    with pytest.raises(AzllmError, match="repeat_dropout"):
        _cfg(**{"train.repeat_dropout": 1.0}).validate()
    # The plan counts the model as it trains at its peak: on a CPU, dropout's masks and the
    # math attention path, the same as dropout from the start.
    kw = dict(precision="fp32", activation_checkpointing=False, device_type="cpu")
    peak = {
        n: estimate_peak(_cfg(**over), 4, **kw)["allocated"]
        for n, over in {
            "none": {},
            "repeat": {"train.repeat_dropout": 0.1},
            "always": {"model.dropout": 0.1},
        }.items()
    }
    assert peak["repeat"] == peak["always"] > peak["none"]
    model = GPT(_cfg().model)
    model.set_dropout(0.3)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    rates += [m.dropout for m in model.modules() if isinstance(m, Attention)]
    assert len(rates) == 1 + 2 + 2 and set(rates) == {0.3}  # embeddings, 2 blocks, 2 attentions
