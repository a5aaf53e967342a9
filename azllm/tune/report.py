"""What a study found: a table of trials, DIR/best.toml for `azllm train --config`, and
DIR/trials.png (bits per byte per trial, pruned ones marked)."""

from __future__ import annotations

import os
from pathlib import Path

from azllm.atomic import atomic_write_text, temp_path
from azllm.errors import AzllmError
from azllm.tune.settings import best_tables, toml_text


def visible_trials(study) -> list:
    """Every trial but the surplus draws (which never ran)."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("outcome") != "surplus"]


def best_trial(study, where: str):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        raise AzllmError(f"{where}: no trial has completed yet; run azllm tune (again)")
    return min(done, key=lambda t: (t.value, t.number))


def best_toml(study, where: str) -> str:
    meta = study.user_attrs.get("azllm")
    if meta is None:
        raise AzllmError(f"{where}: study {study.study_name!r} was not made by azllm tune")
    best = best_trial(study, where)
    tables = best_tables(meta["config"], meta["preset"], best.params)
    minutes, steps = meta["minutes_per_trial"], meta.get("steps_per_trial")
    trained = (
        f"{steps} steps of training (every trial)"
        if steps
        else f"{minutes:g} min of training ({best.user_attrs.get('steps', '?')} steps)"
    )
    comments = [
        f"azllm tune: best of {len(visible_trials(study))} trials of study "
        f"{study.study_name!r}: trial {best.number}, {best.value:.4f} validation bits per byte",
        f"after {trained}; train it longer with --max-steps or --set train.max_minutes=...",
        "azllm train --config best.toml --data DATA --out RUN",
    ]
    top = {"preset": meta["preset"]} if meta["preset"] else {}
    return toml_text(tables, top=top, comments=comments)


def trial_table(study) -> str:
    rows = [f"{'trial':>5}  {'state':<8}  {'bpb':>7}  {'steps':>6}  {'seconds':>7}"]
    for t in visible_trials(study):
        value = t.value
        if value is None and t.last_step is not None:  # pruned: its last reported value
            value = t.intermediate_values[t.last_step]
        state = t.state.name.lower()
        if state == "fail":
            state = "crashed" if t.user_attrs.get("outcome") == "crashed" else "stopped"
        bpb = f"{value:7.4f}" if isinstance(value, float) else f"{'-':>7}"
        rows.append(
            f"{t.number:>5}  {state:<8}  {bpb}  {t.user_attrs.get('steps', '-'):>6}  "
            f"{t.user_attrs.get('seconds', '-'):>7}"
        )
    return "\n".join(rows)


def plot_trials(study, path: Path) -> Path | None:
    """Bits per byte of each trial: complete (dots, the best so far as a line), pruned (crosses,
    at their last reported value). A plot is a by-product: a failure is a warning."""
    try:
        return _plot(study, Path(path))
    except Exception as e:  # a matplotlib or disk problem must not lose the study's result
        import sys

        print(f"azllm: warning: {path} not written ({e})", file=sys.stderr)
        return None


def _plot(study, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    trials = visible_trials(study)
    done = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE]
    pruned = [
        (t.number, t.intermediate_values[t.last_step])
        for t in trials
        if t.state == TrialState.PRUNED and t.last_step is not None
    ]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if done:
            ax.plot(*zip(*done, strict=True), "o", label="complete")
            best, line = float("inf"), []
            for n, v in done:
                best = min(best, v)
                line.append((n, best))
            ax.step(*zip(*line, strict=True), where="post", label="best so far", linewidth=1)
        if pruned:
            ax.plot(*zip(*pruned, strict=True), "x", color="tab:red", label="pruned (last value)")
        ax.set_xlabel("trial")
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"study {study.study_name}: {len(trials)} trials, {len(pruned)} pruned")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        with temp_path(path) as tmp:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def write_report(study, out: Path, where: str) -> str:
    """DIR/best.toml and DIR/trials.png; the text to print."""
    text = best_toml(study, where)
    atomic_write_text(Path(out) / "best.toml", text)
    plot_trials(study, Path(out) / "trials.png")
    return (
        f"{trial_table(study)}\n\nbest settings, written to {Path(out) / 'best.toml'} "
        f"(plot: {Path(out) / 'trials.png'}):\n\n{text}"
    )
