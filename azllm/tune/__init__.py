"""Hyper-parameter search: Optuna studies over real `azllm train` runs (`azllm tune`).

space.py (what is tuned), settings.py (trial and best configs as TOML), study.py (the worker:
trials as processes, pruning, resuming), report.py (best.toml, trials.png), cli.py.
Nothing here imports optuna at import time: it is an optional extra ('azllm[tune]').
"""

from azllm.tune.cli import register

__all__ = ["register"]
