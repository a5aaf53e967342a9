"""Training metrics: RUN/metrics.jsonl (one JSON object per line) and RUN/loss.png.

The file is read back on `train --resume` and for the plot. A line cut by a kill, or a file
edited by hand (`[1, 2]`, `null`, `{"step": "x"}`, `{"loss": 1}`, bytes that are not UTF-8),
must not stop a run: such lines are skipped with one warning on stderr, and the resumed file
keeps only the good ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from azllm.atomic import atomic_write_text


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)  # NaN too: a diverged run


def _parse(line: bytes) -> dict | None:
    """The record on one line, or None when it is not a metrics record."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict):
        return None
    step = rec.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    if any(k in rec and not _number(rec[k]) for k in ("loss", "val_loss")):
        return None
    return rec


def _read(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every good line; one warning for the bad ones."""
    good, bad = [], []
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        rec = _parse(raw)
        if rec is None:
            bad.append(n)
        else:
            good.append((raw.decode("utf-8"), rec))
    if bad:
        where = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        print(
            f"azllm: warning: {path}: skipped {len(bad)} damaged line(s) (line {where}); "
            "each line should be a JSON object with an integer step",
            file=sys.stderr,
        )
    return good


class MetricsLog:
    """Appends records; on resume keeps only what was logged up to the resumed step, so the
    file after a kill and resume reads exactly like an uninterrupted run's."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line, rec in _read(self.path) if rec["step"] <= resume_step]
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(run_dir: Path) -> list[dict]:
    """The good records of RUN/metrics.jsonl (damaged lines skipped with a warning)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [rec for _, rec in _read(path)]


def plot_loss(run_dir: Path) -> Path | None:
    """Train and validation loss against step, as RUN/loss.png. A plot is a by-product: any
    failure is a warning, never the end of the training run that asked for it."""
    try:
        return _plot_loss(Path(run_dir))
    except Exception as e:  # disk full, a matplotlib backend problem, ...
        print(f"azllm: warning: {run_dir}/loss.png not written ({e})", file=sys.stderr)
        return None


def _plot_loss(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    # --eval-tasks: {"step", "tasks": {name: score}} records get a second panel, accuracy
    tasks: dict[str, list] = {}
    for r in records:
        if isinstance(r.get("tasks"), dict):
            for name, v in r["tasks"].items():
                if _number(v):
                    tasks.setdefault(name, []).append((r["step"], v))
    # preference tuning (chat.dpo): held-out reward accuracy beside the tasks, log-probs below
    dpo = {"reward accuracy": "val_reward_acc", "chosen": "val_chosen_logp"}
    dpo["rejected"] = "val_rejected_logp"
    dpo = {n: [(r["step"], r[k]) for r in records if _number(r.get(k))] for n, k in dpo.items()}
    if dpo["reward accuracy"]:
        tasks["held-out reward accuracy"] = dpo.pop("reward accuracy")
    logps = {f"held-out {n}": pts for n, pts in dpo.items() if n != "reward accuracy" and pts}
    panels = [p for p in (tasks, logps) if p]
    fig, axes = plt.subplots(
        1 + len(panels), 1, figsize=(7, 4 + 2.5 * len(panels)), dpi=100, sharex=True, squeeze=False
    )
    ax = axes[0][0]
    for (ax2,), pan in zip(axes[1:], panels, strict=True):
        for name, pts in sorted(pan.items()):
            ax2.plot(*zip(*pts, strict=True), "o-", label=name, markersize=3)
        if pan is tasks:
            ax2.set_ylabel("accuracy")
            ax2.set_ylim(0, 1)
        else:
            ax2.set_ylabel("completion log-prob (nats)")
        ax2.grid(alpha=0.3)
        ax2.legend()
    try:
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val, strict=True), "o-", label="val loss", markersize=3)
        ax.set_xlabel("step")
        pref = "held-out reward accuracy" in tasks
        ax.set_ylabel("preference loss" if pref else "cross-entropy (nats/token)")
        ax.set_title(run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = run_dir / "loss.png"
        tmp = out.with_name(".loss.tmp.png")
        fig.savefig(tmp)
    finally:
        plt.close(fig)
    tmp.replace(out)
    return out
