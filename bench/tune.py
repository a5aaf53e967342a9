"""`azllm tune` finds better settings than the preset's: a 12-trial study on `tiny` (bundled
corpus, short trials), then the preset's defaults and the best settings trained again, fresh,
with the same budget, interleaved (default, best, default, best, ...) so both see the same
load on a shared machine. Prints both validation bpb figures and their ratio (issue 13 target:
best < default).

    python bench/tune.py [--trials 12] [--minutes 0.2 | --steps 300] [--repeats 2] [--threads 1]
                         [--json out.json]

--steps budgets the trials (`azllm tune --steps-per-trial`) and the fresh runs in optimizer
steps: figures a busy machine does not move (it only takes longer). About (trials + 2 x repeats)
x (budget + ~5 s start-up); pruned trials end early.
Every run is a real `azllm tune` / `azllm train` process; nothing here is faked or cached.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "azllm" / "data" / "sample"


def azllm(*args, env) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "azllm.cli", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    if proc.returncode:
        sys.exit(f"azllm {' '.join(map(str, args[:2]))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def final_bpb(run: Path) -> tuple[float, int, int]:
    """Final validation bpb, steps, and tokens trained (at equal steps a larger batch sees more:
    printed so that a win bought with tokens is visible)."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = [r for r in recs if "val_bpb" in r]
    tokens = max((r["tokens"] for r in recs if "tokens" in r), default=0)
    return val[-1]["val_bpb"], recs[-1]["step"], tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--minutes", type=float, default=0.2, help="training time per run")
    ap.add_argument(
        "--steps", type=int, default=0,
        help="trials and fresh runs train this many steps (no clock) instead of --minutes",
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=2, help="fresh runs of each setting")
    ap.add_argument(
        "--fresh-steps", type=int, default=0,
        help="fresh runs train this many steps instead of --minutes: a comparison that a busy "
        "machine (fewer steps in the same minutes) does not move",
    )  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's)")
    ap.add_argument("--eval-interval", type=int, default=25)
    # tiny's own 2 validation batches (512 tokens) measure a run to about +-0.1 bpb: too coarse
    # to rank trials or to compare two settings; 25 batches are cheap on this model.
    ap.add_argument("--eval-batches", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="keep the study here (default: a temporary folder)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.steps:
        args.fresh_steps = args.fresh_steps or args.steps

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="azllm-bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    tok, data = work / "tok.json", work / "data"
    if not (data / "meta.json").exists():
        azllm("tokenizer", "train", "--input", SAMPLE, "--vocab-size", 512, "--out", tok, env=env)
        azllm("tokenize", "--tokenizer", tok, "--input", SAMPLE, "--out", data,
              "--val-fraction", 0.1, env=env)  # fmt: skip
    # The preset exactly, plus where it runs and how often it is measured (not tuned).
    base = work / "base.toml"
    base.write_text(
        f'preset = "tiny"\n[train]\ndevice = "cpu"\nprecision = "fp32"\n'
        f"eval_interval = {args.eval_interval}\neval_batches = {args.eval_batches}\n"
        "log_interval = 10\n",
        encoding="utf-8",
    )
    study = work / "study"
    trial_budget = (["--steps-per-trial", args.steps] if args.steps
                    else ["--minutes-per-trial", args.minutes])  # fmt: skip
    trials_of = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    t0 = time.perf_counter()
    report = azllm("tune", "--config", base, "--data", data, "--out", study,
                   "--trials", args.trials, *trial_budget, "--seed", args.seed,
                   env=env)  # fmt: skip
    study_s = time.perf_counter() - t0
    print(report)

    budget = [f"train.max_minutes={args.minutes}", "train.max_steps=1000000000",
              "train.ckpt_interval=1000000000"]  # fmt: skip
    if args.fresh_steps:
        budget = [f"train.max_steps={args.fresh_steps}", f"train.ckpt_interval={args.fresh_steps}"]
    fresh = f"{args.fresh_steps} steps" if args.fresh_steps else f"{args.minutes:g} min"
    figures: dict[str, list] = {"default": [], "best": []}
    for r in range(args.repeats):
        for name, config in (("default", base), ("best", study / "best.toml")):
            run = work / f"{name}-{r}"
            shutil.rmtree(run, ignore_errors=True)  # a run of an earlier invocation
            t1 = time.perf_counter()
            azllm("train", "--config", config, "--data", data, "--out", run,
                  "--set", *budget, f"train.seed={1337 + r}", env=env)  # fmt: skip
            figures[name].append((*final_bpb(run), round(time.perf_counter() - t1, 1)))
            bpb, steps, tokens, secs = figures[name][-1]
            print(f"{name} run {r}: {bpb:.4f} bpb after {steps} steps, {tokens} tokens "
                  f"(logged), {secs:.0f} s", flush=True)  # fmt: skip
    mean = {k: statistics.mean(f[0] for f in v) for k, v in figures.items()}
    print(
        f"\n{args.trials} trials of {trials_of} in {study_s:.0f} s; fresh runs of "
        f"{fresh}, {args.repeats} seeds each:\n"
        f"  default (tiny preset): {mean['default']:.4f} bpb  "
        f"({', '.join(f'{f[0]:.4f}' for f in figures['default'])})\n"
        f"  best (best.toml):      {mean['best']:.4f} bpb  "
        f"({', '.join(f'{f[0]:.4f}' for f in figures['best'])})\n"
        f"  best / default = {mean['best'] / mean['default']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "study_s": study_s, "runs": figures, "mean": mean},
                       indent=2), encoding="utf-8")  # fmt: skip


if __name__ == "__main__":
    main()
