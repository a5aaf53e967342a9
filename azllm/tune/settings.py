"""Configs as `azllm train` reads them: each trial's full config.toml, and best.toml (a preset
plus only the keys that differ from it, so the user sees what the search changed)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from azllm.config import PRESETS, Config, ModelConfig, apply_overrides, config_from_dict

# A trial stops on its clock (train.max_minutes) or at its step budget (train.max_steps, the
# cosine schedule then spanning exactly those steps). Under a clock steps are unbounded; either
# way checkpoints only at the end (a checkpoint mid-trial would spend the trial's time on disk).
UNBOUNDED_STEPS = 10**9
# best.toml is built on the user's config, not on a trial's: the trials' time budget and step
# bound stay out of it (the user's own max_steps, if any, stay in). The vocabulary comes from
# the tokenizer.
NOT_IN_BEST = ("model.vocab_size",)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # 0.001, 1e-05: both TOML floats
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (model.rope_scaling)
        bare = re.compile(r"[A-Za-z0-9_-]+")
        items = [(k if bare.fullmatch(k) else json.dumps(k), x) for k, x in v.items()]
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in items) + "}"
    raise TypeError(f"no TOML form for {v!r}")


def toml_text(tables: dict[str, dict[str, Any]], top: dict[str, Any] | None = None,
              comments: list[str] | None = None) -> str:  # fmt: skip
    lines = [f"# {c}" for c in comments or []]
    lines += [f"{k} = {toml_value(v)}" for k, v in (top or {}).items()]
    for name, table in tables.items():
        if table:
            lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def budget_overrides(minutes: float | None, steps: int | None) -> dict[str, Any]:
    """A trial's length: a time budget (minutes), or exactly `steps` optimizer steps and no
    clock, so that its result does not depend on how busy the machine is."""
    if steps:
        return {"train.max_minutes": 0.0, "train.max_steps": int(steps),
                "train.ckpt_interval": UNBOUNDED_STEPS}  # fmt: skip
    return {"train.max_minutes": float(minutes), "train.max_steps": UNBOUNDED_STEPS,
            "train.ckpt_interval": UNBOUNDED_STEPS}  # fmt: skip


def trial_config(
    base: Config, params: dict[str, Any], minutes: float | None, steps: int | None = None
) -> Config:
    """The base config with a trial's draws and its budget (minutes or steps)."""
    from azllm.tune.space import batch_overrides

    return apply_overrides(
        base, {**params, **batch_overrides(params), **budget_overrides(minutes, steps)}
    )


def config_tables(cfg: Config) -> dict[str, dict[str, Any]]:
    d = cfg.to_dict()
    return {"model": d["model"], "train": d["train"]}


def best_tables(base: dict, preset: str | None, params: dict[str, Any]) -> dict[str, dict]:
    """[model]/[train] of best.toml: the base config's keys that differ from the preset (or from
    the defaults without one), and every tuned key; derived sizes only where set by hand."""
    from azllm.tune.space import batch_overrides

    cfg = apply_overrides(config_from_dict(base, where="study config"), {
        **params, **batch_overrides(params)
    })  # fmt: skip
    ref = config_from_dict(PRESETS[preset] if preset else {}).to_dict()
    values = cfg.to_dict()
    derived = ModelConfig(**{**values["model"], "ffn_hidden": 0, "n_kv_head": 0})
    out: dict[str, dict] = {"model": {}, "train": {}}
    for section in out:
        for name, value in values[section].items():
            key = f"{section}.{name}"
            if key in NOT_IN_BEST:
                continue
            if section == "model" and name in ("ffn_hidden", "n_kv_head"):
                differs = value != getattr(derived, name)  # loading derives it again
            else:
                differs = value != ref[section].get(name)
            if key in params or differs:
                out[section][name] = value
    return out
