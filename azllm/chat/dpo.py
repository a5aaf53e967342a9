"""Preference tuning: an SFT run + preference pairs -> a run that prefers the chosen answers.

    azllm dpo --run SFT_RUN --data PAIRS.jsonl --out RUN [--loss sigmoid|robust|ipo|simpo]

Pairs are read in the forms Hugging Face TRL reads ({"prompt" or "messages", "chosen",
"rejected"}; see chat.pairdata), chat-templated, trained on their completion tokens only.

The pretraining loop does the rest (precision, accumulation, checkpoints, exact resume): the data
is a `PairBatches` source (a batch row is one pair: inputs [rows, 2, T], chosen then rejected),
and `DPOLoss` is TrainStep's loss hook. The reference model's log-probs are computed once, before
training, by the SFT weights, and stored in RUN/reference_logps.safetensors under a key of the
tokenized data, the base weights and the precision: training holds one model, not two, and a
resumed run reuses the stored numbers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from azllm.atomic import atomic_write_bytes, atomic_write_text
from azllm.batch import Batch
from azllm.chat.pairdata import PairBatches, load_pairs
from azllm.errors import AzllmError

LOSSES = ("sigmoid", "robust", "ipo", "simpo")
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class DPOSettings:
    """loss: sigmoid (DPO, Rafailov et al. 2023; with label_smoothing > 0 the conservative cDPO),
    robust (Chowdhury et al. 2024: unbiased under a label_smoothing share of flipped labels),
    ipo (Azar et al. 2023, on per-token mean log-probs as TRL does), simpo (Meng et al. 2024:
    reference-free, per-token mean log-probs, target margin gamma = beta * gamma_ratio).
    beta: how far the policy may move from the reference (simpo: the reward scale)."""

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma_ratio: float = 0.5

    def check(self) -> DPOSettings:
        if self.loss not in LOSSES:
            raise AzllmError(f"--loss {self.loss!r}: one of {', '.join(LOSSES)}")
        if not self.beta > 0:
            raise AzllmError(f"--beta {self.beta}: must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise AzllmError(f"--label-smoothing {self.label_smoothing}: must be in [0, 0.5)")
        return self

    @property
    def needs_reference(self) -> bool:
        return self.loss != "simpo"


# ---- log-probs and the losses ---------------------------------------------------------------


def sequence_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the completion tokens, their count), each [rows, 2], in fp32."""
    rows, _, t = batch.inputs.shape
    logits = model(batch.inputs.reshape(rows * 2, t))[0]
    targets = batch.targets.reshape(-1)
    token_logp = -F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets, ignore_index=-1, reduction="none"
    )
    counts = (batch.targets != -1).sum(-1)
    return token_logp.view(rows, 2, t).sum(-1), counts


def preference_loss(
    policy: torch.Tensor, ref: torch.Tensor | None, counts: torch.Tensor, s: DPOSettings
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of [rows, 2] summed log-probs (chosen, rejected), and its statistics.

    rewards: beta x (policy - reference) log-prob (simpo: beta x mean token log-prob). Reward
    accuracy counts a tie as half (at the start every reward is 0: a coin flip, not a loss)."""
    eps = s.label_smoothing
    if s.loss == "simpo":
        rewards = s.beta * policy / counts
        h = rewards[:, 0] - rewards[:, 1] - s.beta * s.gamma_ratio
        losses = -F.logsigmoid(h)
    else:
        if ref is None:
            raise ValueError(f"loss {s.loss} needs reference log-probs")
        per = counts if s.loss == "ipo" else 1
        logratio = (policy - ref) / per
        rewards = s.beta * logratio
        h = logratio[:, 0] - logratio[:, 1]
        if s.loss == "ipo":
            losses = (h - 1 / (2 * s.beta)) ** 2
        elif s.loss == "robust":
            bh = s.beta * h
            losses = (-(1 - eps) * F.logsigmoid(bh) + eps * F.logsigmoid(-bh)) / (1 - 2 * eps)
        else:  # sigmoid; eps > 0: cDPO, the label is right with probability 1 - eps
            losses = -(1 - eps) * F.logsigmoid(s.beta * h) - eps * F.logsigmoid(-s.beta * h)
    rewards = rewards.detach()
    diff = rewards[:, 0] - rewards[:, 1]
    stats = {
        "reward_acc": ((diff > 0).float() + 0.5 * (diff == 0).float()).mean(),
        "margin": diff.mean(),
        "chosen_logp": policy[:, 0].detach().mean(),
        "rejected_logp": policy[:, 1].detach().mean(),
    }
    return losses.mean(), stats


class DPOLoss:
    """TrainStep's loss hook: (model, batch of pairs) -> (loss, stats)."""

    def __init__(self, settings: DPOSettings) -> None:
        self.settings = settings.check()

    def __call__(self, model: torch.nn.Module, batch: Batch):
        policy, counts = sequence_logps(model, batch)
        return preference_loss(policy, batch.ref_logps, counts, self.settings)


# ---- the reference, computed once -----------------------------------------------------------


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module, data: PairBatches, split: str, rows: int, device, precision: str
) -> torch.Tensor:
    """[pairs, 2] summed completion log-probs of `model` (eval mode, no grad), `rows` at a time."""
    from azllm.device import autocast

    model.eval()
    out = []
    for start in range(0, data.count(split), rows):
        b = data.take(split, list(range(start, min(start + rows, data.count(split))))).to(device)
        with autocast(device, precision):
            out.append(sequence_logps(model, b)[0].float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 2))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def stored_reference(
    run_dir: Path, data: PairBatches, weights: Path, cfg, precision: str, device, say=print
) -> dict[str, torch.Tensor]:
    """The reference log-probs of RUN/reference_logps.safetensors when its key matches this
    data, base weights and precision; else computed with the base weights (then freed) and
    written atomically."""
    from safetensors.torch import load, save

    from azllm.checkpoint import load_weights
    from azllm.model import GPT

    key = hashlib.sha256(f"{data.digest()}/{file_sha256(weights)}/{precision}".encode()).hexdigest()
    path = Path(run_dir) / REFERENCE_FILE
    if path.exists():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                stored_key = (f.metadata() or {}).get("key")
            if stored_key == key:
                return load(path.read_bytes())
        except Exception:  # a damaged file is recomputed, like a missing one
            pass
    say(f"reference log-probs: {data.count('train') + data.count('val')} pairs, once")
    model = GPT(cfg.model).to(device)
    load_weights(model, weights, tokenizer_sha256=data.meta["tokenizer_sha256"])
    rows = max(1, cfg.train.micro_batch)
    ref = {s: reference_logps(model, data, s, rows, device, precision) for s in ("train", "val")}
    del model
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({s: t.contiguous() for s, t in ref.items()}, {"key": key}))
    return ref


# ---- the command ----------------------------------------------------------------------------

# Preference-tuning defaults: a gentle learning rate (DPO moves a model quickly), one pass.
DPO_DEFAULTS = {
    "train.optimizer": "adamw",  # whatever the base used: these lrs are AdamW's
    "train.repeat_dropout": 0.0,  # a base recipe's; chat data does not count tokens
    "train.lr": 5e-5,
    "train.warmup_steps": 10,
    "train.min_lr_ratio": 0.0,
    "train.weight_decay": 0.0,
    "train.micro_batch": 4,
    "train.grad_accum": 1,
    "train.eval_interval": 50,
    "train.ckpt_interval": 100,
    "train.log_interval": 10,
}


def dpo(
    base_run: Path,
    data_paths: list,
    out_run: Path,
    settings: DPOSettings | None = None,
    *,
    overrides: dict | None = None,
    resume: bool = False,
    val_fraction: float = 0.1,
    epochs: float = 1.0,
    progress: bool = True,
) -> dict:
    """Preference-tune base_run's weights on the pairs in data_paths into out_run."""
    from azllm.chat.sft import set_length_from_epochs
    from azllm.config import apply_overrides, load_run_config
    from azllm.device import resolve_device, resolve_precision
    from azllm.tokenizer import load_tokenizer
    from azllm.train import prepare_run, train

    settings = (settings or DPOSettings()).check()
    if epochs <= 0:
        raise AzllmError(f"--epochs {epochs}: must be positive")
    base_run, out_run = Path(base_run), Path(out_run)
    weights = base_run / "model.safetensors"
    if not weights.exists():
        raise AzllmError(f"--run {base_run}: no model.safetensors; give a run made by azllm sft")
    cfg = apply_overrides(load_run_config(base_run), {**DPO_DEFAULTS, **(overrides or {})})
    tok = load_tokenizer(base_run / "tokenizer.json")
    data = PairBatches(
        load_pairs(data_paths),
        tok,
        base_run / "tokenizer.json",
        cfg.model.block_size,
        cfg.train.seed,
        val_fraction,
        label=", ".join(map(str, data_paths)),
    )
    say = print if progress else (lambda _m: None)
    say(
        f"pairs: {data.count('train')} train / {data.count('val')} held-out; "
        f"{data.truncated} cut to the context of {cfg.model.block_size}, {data.dropped} dropped"
    )
    # refuse a taken --out (or a resume of another run) before anything is written into it
    prepare_run(copy.deepcopy(cfg), data.meta, data.label, out_run, resume)
    settings_file = out_run / "dpo.json"
    if resume and settings_file.exists():
        saved = json.loads(settings_file.read_text(encoding="utf-8"))
        if saved != asdict(settings):
            raise AzllmError(
                f"{settings_file}: the run was made with {saved}; resume with the same "
                "--loss/--beta/--label-smoothing"
            )
    given = overrides or {}
    tc = cfg.train
    if "train.max_steps" not in given:
        set_length_from_epochs(tc, data.count("train"), epochs, "train.warmup_steps" not in given)
    if "train.eval_batches" not in given:  # every held-out pair at each evaluation
        tc.eval_batches = max(1, math.ceil(data.count("val") / tc.micro_batch))
    if settings.needs_reference:
        device = resolve_device(tc.device)
        precision = resolve_precision(tc.precision, device)
        data.set_reference(stored_reference(out_run, data, weights, cfg, precision, device, say))
    atomic_write_text(settings_file, json.dumps(asdict(settings), indent=2))
    return train(
        cfg,
        data,
        out_run,
        init_weights=weights,
        resume=resume,
        progress=progress,
        loss_fn=DPOLoss(settings),
    )
