"""`azllm tune`: hyper-parameter search over real `azllm train` runs, and its report.

azllm tune --config baby --data data/ --out tune/ --trials 30 --minutes-per-trial 10
azllm tune --config baby --data data/ --out tune/ --trials 30 --steps-per-trial 500
azllm tune --out tune/ --report                      # best.toml and trials.png again
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from azllm.config import PRESETS, load_config
from azllm.errors import AzllmError, require


def _preset_of(config: str) -> str | None:
    """The preset a --config starts from: its name, or a TOML file's `preset = ...`."""
    if config in PRESETS:
        return config
    return tomllib.loads(Path(config).read_text(encoding="utf-8")).get("preset")


def _check_data(data: str, cfg) -> Path:
    from azllm.shards import TokenBatches

    path = Path(data)
    source = TokenBatches(path, cfg.model.block_size, cfg.train.seed)  # AzllmError if no shards
    if not source.has_split("val"):
        raise AzllmError(
            f"--data {data}: no validation split, and trials are ranked by validation bits per "
            "byte; make one with `azllm tokenize ... --val-fraction 0.05`"
        )
    return path.resolve()


def cmd_tune(args) -> int:
    require("tune", "azllm tune")
    from azllm.tune.report import write_report
    from azllm.tune.study import TuneJob, default_storage, open_storage, run_worker

    out = Path(args.out)
    storage = args.storage or default_storage(out)
    if args.report:
        if not args.storage and not (out / "study.db").exists():
            raise AzllmError(f"--out {out}: no study.db here; run azllm tune with --out {out}")
        import optuna

        try:
            study = optuna.load_study(study_name=args.study, storage=open_storage(storage, False))
        except KeyError:
            raise AzllmError(f"--study {args.study}: no such study in {storage}") from None
        print(write_report(study, out, storage))
        return 0
    required = {"--config": args.config, "--data": args.data, "--trials": args.trials}
    for flag, value in required.items():
        if value is None:
            raise AzllmError(f"azllm tune: {flag} is required (or --report to see a study)")
    if (args.minutes is None) == (args.steps is None):
        raise AzllmError(
            "azllm tune: give exactly one trial budget, --minutes-per-trial M or "
            "--steps-per-trial N (steps: results that do not depend on the machine's load)"
        )
    if args.trials < 1:
        raise AzllmError(f"--trials {args.trials}: give at least 1")
    if args.minutes is not None and not args.minutes > 0:
        raise AzllmError(f"--minutes-per-trial {args.minutes}: give a positive number")
    if args.steps is not None and args.steps < 1:
        raise AzllmError(f"--steps-per-trial {args.steps}: give at least 1")
    from azllm.tune.space import default_space, load_space

    base = load_config(args.config)
    data = _check_data(args.data, base)
    space = (  # a steps budget keeps the batch: else more tokens per step win the study
        load_space(Path(args.space), base)
        if args.space
        else default_space(base, fixed_batch=args.steps is not None)
    )
    job = TuneJob(
        base=base, preset=_preset_of(args.config), data=data, out=out, trials=args.trials,
        minutes=args.minutes, space=space, storage=storage, study_name=args.study, seed=args.seed,
        steps=args.steps,
    )  # fmt: skip
    study = run_worker(job)
    print(write_report(study, out, storage))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="hyper-parameter search (Optuna) over real azllm train runs"
    )
    p.add_argument("--config", help="preset (tiny, baby, small, az-100m) or TOML: the base")
    p.add_argument("--data", help="token shards with a validation split (azllm tokenize)")
    p.add_argument("--out", required=True, help="study folder: trials/, best.toml, trials.png")
    p.add_argument("--trials", type=int, help="finished trials the study should hold")
    p.add_argument(
        "--minutes-per-trial", dest="minutes", type=float, help="training time of each trial"
    )
    p.add_argument(
        "--steps-per-trial", dest="steps", type=int,
        help="or: optimizer steps of each trial (results independent of the machine's load)",
    )  # fmt: skip
    p.add_argument("--space", help="SPACE.toml: the keys to tune and their ranges")
    p.add_argument(
        "--storage", help="Optuna storage URL (default sqlite:///OUT/study.db; postgresql://...)"
    )
    p.add_argument("--study", default="azllm", help="study name inside the storage")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument(
        "--report", action="store_true", help="only write best.toml and trials.png of --out"
    )
    p.set_defaults(func=cmd_tune)
