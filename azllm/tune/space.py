"""The search space of `azllm tune`: the default one, a SPACE.toml, and what a trial draws.

A space maps config keys ("train.lr", "model.dropout") to a range or a list of choices:

    train.lr = {low = 1e-4, high = 1e-2, log = true}
    train.warmup_steps = {low = 0, high = 200, step = 10}
    train.grad_accum = {choices = [1, 2, 4]}

Keys are checked against the config dataclasses, and every bound and choice against the config's
own validation, so a typo or an impossible value is refused before the first trial runs.
This file never imports optuna or torch: spaces are checked and written without either.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from azllm.config import (
    OPTIMIZERS,
    Config,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    lr_of,
    warmup_of,
)
from azllm.errors import AzllmError

SECTIONS = {"model": ModelConfig, "train": TrainConfig}
# Set by azllm tune itself (the time budget, the data) or by a run's own resolution: not tunable.
NOT_TUNABLE = ("model.vocab_size", "train.max_minutes", "train.max_steps", "train.device")
# A key that only matters under one value of another: drawn only when that value is (so TPE
# models it only on the trials where it acted, and best.toml never carries an idle setting).
CONDITIONS = {"train.muon_lr": ("train.optimizer", "muon")}


@dataclass(frozen=True)
class Param:
    """One dimension: choices, or a low..high range (log-uniform with log, on a grid with step)."""

    key: str
    kind: str  # "float" | "int" | "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choices": list(self.choices)}
        d: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return self.low <= value <= self.high

    def suggest(self, trial) -> Any:
        """Draw this key's value from an optuna trial."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, self.low, self.high, step=self.step or 1, log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def _field_default(key: str, where: str) -> Any:
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section)
    known = {f.name for f in fields(cls)} if cls else set()
    if name not in known:
        hint = (
            f"known {section} keys: {', '.join(sorted(known))}"
            if cls
            else ("keys are model.NAME or train.NAME")
        )
        raise AzllmError(f"{where}: unknown config key {key!r}; {hint}")
    if key in NOT_TUNABLE:
        raise AzllmError(
            f"{where}: {key} cannot be tuned (set by the data or by --minutes-per-trial)"
        )
    return getattr(cls(), name)


def _check_value(cfg: Config, key: str, value: Any, where: str) -> None:
    try:
        apply_overrides(cfg, {key: value}).validate()
    except AzllmError as e:
        raise AzllmError(f"{where}: {key} = {value!r} is not a valid setting ({e})") from None


def make_param(key: str, spec: Any, cfg: Config, where: str) -> Param:
    """A Param from one SPACE.toml entry, checked against the config's types and validation."""
    default = _field_default(key, where)
    form = "{low = ..., high = ...[, log = true | step = ...]} or {choices = [...]}"
    if not isinstance(spec, dict) or not spec:
        raise AzllmError(f"{where}: {key} must be a table {form}, got {spec!r}")
    extra = set(spec) - {"low", "high", "log", "step", "choices"}
    if extra or ("choices" in spec) == ("low" in spec or "high" in spec):
        raise AzllmError(f"{where}: {key}: expected {form}, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise AzllmError(f"{where}: {key}: choices must be a non-empty list")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise AzllmError(f"{where}: {key}: choices must not repeat")
        for c in choices:
            _check_value(cfg, key, c, where)
        return Param(key, "choice", choices=tuple(choices))
    if isinstance(default, bool) or not isinstance(default, int | float):
        raise AzllmError(f"{where}: {key} is a {type(default).__name__}: give {{choices = [...]}}")
    kind = "int" if isinstance(default, int) else "float"
    bounds = [spec.get("low"), spec.get("high")]
    numeric = (int,) if kind == "int" else (int, float)
    if any(isinstance(b, bool) or not isinstance(b, numeric) for b in bounds):
        raise AzllmError(f"{where}: {key}: low and high must both be {kind} numbers")
    low, high = bounds
    if kind == "float":
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise AzllmError(f"{where}: {key}: low and high must be finite")
    if low >= high:
        raise AzllmError(f"{where}: {key}: low ({low}) must be below high ({high})")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise AzllmError(f"{where}: {key}: log must be true or false")
    if log and low <= 0:
        raise AzllmError(f"{where}: {key}: a log range needs low > 0")
    if step is not None:
        if log:
            raise AzllmError(f"{where}: {key}: give log or step, not both")
        if isinstance(step, bool) or not isinstance(step, numeric) or step <= 0:
            raise AzllmError(f"{where}: {key}: step must be a positive {kind} number")
    for v in (low, high):
        _check_value(cfg, key, v, where)
    return Param(key, kind, low, high, log, step)


def load_space(path: Path, cfg: Config) -> dict[str, Param]:
    """SPACE.toml: dotted keys (`train.lr = {...}`) or [train]/[model] tables of them."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AzllmError(f"--space {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AzllmError(f"--space {path}: not valid TOML ({e})") from None
    space: dict[str, Param] = {}
    for section, table in data.items():
        if section not in SECTIONS or not isinstance(table, dict):
            raise AzllmError(
                f"--space {path}: unknown config key {section!r}; keys are model.NAME or train.NAME"
            )
        for name, spec in table.items():
            key = f"{section}.{name}"
            space[key] = make_param(key, spec, cfg, f"--space {path}")
    if not space:
        raise AzllmError(
            f"--space {path}: no keys to tune; e.g. train.lr = {{low=1e-4, high=0.01}}"
        )
    return space


def default_space(cfg: Config, fixed_batch: bool = False) -> dict[str, Param]:
    """Ranges around the config's own values, so every preset (and a user's TOML) gets a space
    scaled to it: learning rates 8x either way (log), warmup up to 4x, the batch halved to 4x
    by accumulation (micro-batches no larger than the config's, which is known to fit memory).

    fixed_batch (trials budgeted in steps): the batch stays the config's. At equal steps a
    larger batch is more tokens, and wins for that alone: measured on `tiny` (bench/tune.py,
    250 steps), a study with the batch in it chose 4x accumulation, 0.88x the preset's bpb at
    equal steps but 1.08x at equal tokens."""
    tc = cfg.train
    lr = lr_of(cfg.model, tc)  # train.lr = 0: derived from the width and optimizer
    warmup = warmup_of(tc)  # -1: derived (config.py)
    mb, ga = tc.micro_batch, tc.grad_accum
    accums = tuple(sorted({max(1, ga // 2), ga, 2 * ga, 4 * ga}))
    space = {
        "train.lr": Param("train.lr", "float", lr / 8, lr * 8, log=True),
        "train.warmup_steps": Param("train.warmup_steps", "int", 0, max(10, 4 * warmup)),
        "train.weight_decay": Param("train.weight_decay", "float", 0.0, 0.2),
        "train.beta2": Param("train.beta2", "float", 0.9, 0.999),
        "train.micro_batch": Param(
            "train.micro_batch", "choice", choices=tuple(sorted({max(1, mb // 2), mb}))
        ),
        "train.grad_accum": Param("train.grad_accum", "choice", choices=accums),
        "model.dropout": Param("model.dropout", "float", 0.0, 0.1),
    }
    if fixed_batch:
        del space["train.micro_batch"], space["train.grad_accum"]
    # The optimizer itself on llama blocks (Muon's home, measured in bench/arch_options.py):
    # whether Muon pays on the user's card and data is the study's to find. Muon's lr 4x either
    # way around the config's (0.02 by default; only drawn for Muon trials, see CONDITIONS).
    if cfg.model.arch == "llama" and tc.optimizer_state != "8bit":  # 8-bit states: AdamW only
        space["train.optimizer"] = Param("train.optimizer", "choice", choices=OPTIMIZERS)
    if cfg.model.arch == "llama" or tc.optimizer == "muon":
        mlr = tc.muon_lr
        space["train.muon_lr"] = Param("train.muon_lr", "float", mlr / 4, mlr * 4, log=True)
    return space


def active(key: str, params: dict[str, Any]) -> bool:
    """Whether a key is drawn, given the draws before it (CONDITIONS; a key whose condition's
    key is not in the space at all is always drawn)."""
    cond = CONDITIONS.get(key)
    return cond is None or cond[0] not in params or params[cond[0]] == cond[1]


def ordered(space: dict[str, Param]) -> list[str]:
    """The space's keys, each condition's key before the keys it governs."""
    governing = {c[0] for c in CONDITIONS.values()}
    return sorted(space, key=lambda k: (k not in governing, list(space).index(k)))


def draw(space: dict[str, Param], trial) -> dict[str, Any]:
    """One trial's settings from an optuna trial: every active key of the space."""
    params: dict[str, Any] = {}
    for key in ordered(space):
        if active(key, params):
            params[key] = space[key].suggest(trial)
    return params


def space_to_dict(space: dict[str, Param]) -> dict[str, dict]:
    return {k: p.to_dict() for k, p in sorted(space.items())}


def baseline_params(cfg: Config, space: dict[str, Param]) -> dict[str, Any]:
    """The config's own values of the space's keys, when the config is a point of the space
    (else {}): the study's first trial, so the search starts from the defaults."""
    d = cfg.to_dict()
    out: dict[str, Any] = {}
    for key in ordered(space):
        if not active(key, out):
            continue
        section, _, name = key.partition(".")
        out[key] = d[section][name]
        if key == "train.lr" and not out[key]:  # 0: derived from the width; the same lr, named
            out[key] = lr_of(cfg.model, cfg.train)
        if key == "train.warmup_steps":  # -1: derived; the same warmup, named
            out[key] = warmup_of(cfg.train)
        if not space[key].contains(out[key]):
            return {}
    return out


def batch_overrides(params: dict[str, Any]) -> dict[str, Any]:
    """A tuned micro_batch or grad_accum means the batch is theirs: drop a fixed global_batch
    (which would otherwise recompute grad_accum and undo the draw)."""
    if ("train.micro_batch" in params or "train.grad_accum" in params) and (
        "train.global_batch" not in params
    ):
        return {"train.global_batch": 0}
    return {}
