"""One `azllm tune` worker: trials drawn by Optuna, each a real `azllm train` process.

Why a process per trial, not `train()` in this process: a trial that crashes, runs out of memory
or diverges ends its own process, not the study; pruning is terminating that process (the
training loop needs no hook), and the memory it held (GPU memory included) goes back for sure;
and each trial is exactly `azllm train --config DIR/trials/NNNN/config.toml`, re-runnable by
hand. The price, the start-up of each trial (3 s on a quiet CPU, 10-30 s on one shared with
other jobs), is small beside minutes of training.

A trial reports its validation bits per byte to Optuna each time the run's metrics.jsonl gains
an evaluation. Every trial gets the same budget: minutes of training (train.max_minutes; the
resource successive halving counts is then milliseconds since the trial's first logged step, so
process start-up, seconds on a busy machine, is left out), or a number of optimizer steps
(train.max_steps; the resource is the evaluation's step). A steps budget makes a trial's result
independent of the machine's load: on a shared CPU the same 12 s gave one config 92 to 176 steps.

Several workers (processes, GPUs, machines) share one study through its storage. Each keeps
drawing until the study holds N finished trials (complete, pruned, or crashed) — not N per
worker: a trial drawn once N are finished or running is a surplus and ends unrun, and a worker
with nothing left to draw waits while others' trials run, in case one of them dies. A trial
whose worker died (SIGKILL, power loss) is marked failed and its settings queued again: at once
when the worker ran on this machine (its pid is gone), else when its heartbeat goes stale.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azllm.atomic import atomic_write_text
from azllm.config import Config
from azllm.errors import AzllmError
from azllm.tune.settings import config_tables, toml_text, trial_config
from azllm.tune.space import Param, baseline_params, draw, space_to_dict

HOST = socket.gethostname()
POLL_S = 0.25  # how often a running trial's metrics.jsonl is read
HEARTBEAT_S, GRACE_S = 20, 90  # a worker on another machine is presumed dead after GRACE_S
MAX_RETRIES = 2  # a trial interrupted this often is given up (its slot is drawn afresh)
CRASHES_IN_A_ROW = 3  # this many failed trials in a row from one worker stop it


@dataclass
class TuneJob:
    base: Config
    preset: str | None
    data: Path
    out: Path
    trials: int
    minutes: float | None  # the trial budget: minutes of training, or
    space: dict[str, Param]
    storage: str
    study_name: str = "azllm"
    seed: int = 0
    steps: int | None = None  # ... exactly this many optimizer steps (then minutes is None)
    crashes: list[str] = field(default_factory=list)  # this worker's failures in a row

    def meta(self) -> dict[str, Any]:
        """What every worker of a study must agree on (stored on the study)."""
        return {
            "config": self.base.to_dict(),
            "preset": self.preset,
            "space": space_to_dict(self.space),
            "minutes_per_trial": self.minutes,
            "steps_per_trial": self.steps,
        }

    def budget(self) -> str:
        return budget_text(self.minutes, self.steps)


def budget_text(minutes: float | None, steps: int | None) -> str:
    """A study's trial budget as the flag that set it."""
    return f"--steps-per-trial {steps}" if steps else f"--minutes-per-trial {minutes:g}"


class Surplus(Exception):
    """Drawn after the study's N trials were all finished or running elsewhere."""


class TrialCrashed(Exception):
    """The training process failed (exit code, no validation result, NaN)."""


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def _quiet_optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # this module prints its own lines
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str, heartbeat: bool = True):
    """An RDB storage, retried briefly on database errors: workers that start together race to
    create the tables (a lock, or "UNIQUE constraint failed: alembic_version" on SQLite)."""
    optuna = _quiet_optuna()
    from sqlalchemy.exc import DBAPIError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if url.startswith("sqlite:///"):  # the database file's folder (--out) must exist
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=HEARTBEAT_S if heartbeat else None,
                grace_period=GRACE_S if heartbeat else None,
                heartbeat_stale_trial_callback=_retry,
            )
        except Exception as e:  # a bad URL, a missing driver, an unreachable server, a lock
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if attempt == 4 or not isinstance(e, DBAPIError):
                raise AzllmError(f"--storage {url}: cannot open the study ({reason})") from None
            time.sleep(0.5 * (attempt + 1))


def startup_trials(n_trials: int) -> int:
    """Random draws before TPE models the results, all run to the end (not pruned)."""
    return max(3, min(10, n_trials // 3))


def make_sampler(seed: int, n_trials: int):
    """TPE, seeded per trial (seed + trial number) so that workers drawing at the same moment
    draw differently and a study run again from scratch draws the same trials in order."""
    import optuna

    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=startup_trials(n_trials),
        multivariate=False,  # all draws happen at suggest time, after the trial number is known
        constant_liar=True,  # parallel workers see running trials as bad, and spread out
    )


def make_pruner(minutes: float | None, n_trials: int, steps: int | None = None):
    """Successive halving on training time (or steps, under a steps budget): at 1/4 and at 1/2
    of the budget a trial goes on only
    if it is in the better half of the trials measured there; but none is pruned before the
    first startup_trials() have completed. (Measured on `tiny`, 12 trials: with rungs from 1/9 of
    the budget and no such wait, the config's own trial 0 set the bar and every other trial was
    pruned at its first evaluation, so TPE never saw a finished trial to learn from.)"""
    import optuna
    from optuna.trial import TrialState

    class AfterStartup(optuna.pruners.BasePruner):
        def __init__(self, inner, startup: int) -> None:
            self.inner, self.startup = inner, startup

        def prune(self, study, trial) -> bool:
            if not self.inner.prune(study, trial):  # records the trial's rung values either way
                return False
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return len(complete) >= self.startup

    halving = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=max(1, steps // 4 if steps else int(60_000 * minutes / 4)),
        reduction_factor=2,
    )
    return AfterStartup(halving, startup_trials(n_trials))


def open_study(job: TuneJob, storage):
    """Create the study (this worker then queues the config's own settings as trial 0) or join
    it, refusing a study that was started with another config, space or budget."""
    optuna = _quiet_optuna()
    kw = dict(storage=storage, sampler=make_sampler(job.seed, job.trials),
              pruner=make_pruner(job.minutes, job.trials, job.steps))  # fmt: skip
    try:
        study = optuna.create_study(study_name=job.study_name, direction="minimize", **kw)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=job.study_name, **kw)
        created = False
    meta, stored = job.meta(), study.user_attrs.get("azllm")
    import json

    meta = json.loads(json.dumps(meta))  # as the storage gives it back (tuples as lists)
    if stored is None:
        study.set_user_attr("azllm", meta)
    else:
        # First: the default space follows the budget (steps keep the batch), so a
        # changed budget is the cause to name. (A study stored before steps budgets existed
        # has no steps_per_trial: None, minutes.)
        was = (stored.get("minutes_per_trial"), stored.get("steps_per_trial"))
        if was != (meta["minutes_per_trial"], meta["steps_per_trial"]):
            raise AzllmError(
                f"study {job.study_name!r} in {job.storage} was started with "
                f"{budget_text(*was)}, not {job.budget()}: trials of another length do not "
                "compare; give the same budget, or --study NAME for a new study"
            )
        for key, what in (("config", "--config"), ("space", "--space")):
            if stored.get(key) != meta[key]:
                raise AzllmError(
                    f"study {job.study_name!r} in {job.storage} was started with another "
                    f"{what}; give the same one, or --study NAME for a new study"
                )
    if created and baseline_params(job.base, job.space):
        study.enqueue_trial(baseline_params(job.base, job.space), user_attrs={"baseline": True})
    return study


def _finished(t) -> bool:
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and t.user_attrs.get("outcome") == "crashed"
    )


def _running(t) -> bool:
    from optuna.trial import TrialState

    return t.state == TrialState.RUNNING


def _pending(t) -> bool:
    """Running, or queued (the config's own settings, an interrupted trial's) for the next draw."""
    from optuna.trial import TrialState

    return t.state in (TrialState.RUNNING, TrialState.WAITING)


def _retry(study, t) -> None:
    """Queue an interrupted trial's settings again (without its dead worker's mark)."""
    retries = t.user_attrs.get("retries", 0)
    if retries < MAX_RETRIES:
        attrs = {"retry_of": t.number, "retries": retries + 1}
        if t.user_attrs.get("baseline"):
            attrs["baseline"] = True
        study.enqueue_trial(t.params, user_attrs=attrs)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_workers(study) -> None:
    """Trials still RUNNING whose worker on this machine is gone: failed, and queued again."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if host != HOST or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker reaped it first
            continue
        print(f"trial {t.number}: its worker (pid {pid}) is gone; marked failed, queued again")
        _retry(study, t)
    optuna.storages.fail_stale_trials(study)  # workers elsewhere: by heartbeat


def _die_with_parent() -> None:
    """In the trial's process (Linux): die when the worker dies, even by SIGKILL, so a killed
    study leaves no training running on."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not glibc: the trial then finishes on its own clock
        pass


class _ValTail:
    """New validation results of a growing metrics.jsonl (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.last_step = 0

    def read(self) -> list[tuple[int, float]]:
        """(step, validation bpb) of each evaluation logged since the last read."""
        import json

        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                self.last_step = max(self.last_step, rec["step"])
                if isinstance(rec.get("val_bpb"), int | float):
                    out.append((rec["step"], float(rec["val_bpb"])))
        return out


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def run_trial(job: TuneJob, trial, params: dict[str, Any]) -> float:
    """Train one trial's config in its own process; its final validation bpb."""
    import optuna

    tdir = job.out / "trials" / f"{trial.number:04d}"
    if tdir.exists():  # left by an earlier study in the same --out: trial numbers restart there
        shutil.rmtree(tdir)
    cfg = trial_config(job.base, params, job.minutes, job.steps)
    config_path = tdir / "config.toml"
    note = f"azllm tune: trial {trial.number} of study {job.study_name!r}"
    atomic_write_text(config_path, toml_text(config_tables(cfg), comments=[note]))
    trial.set_user_attr("dir", str(tdir))
    cmd = [sys.executable, "-m", "azllm.cli", "train", "--config", str(config_path),
           "--data", str(job.data), "--out", str(tdir / "run")]  # fmt: skip
    tail = _ValTail(tdir / "run" / "metrics.jsonl")
    budget_ms = 60_000 * job.minutes if not job.steps else 0
    last, t_train = None, None
    with open(tdir / "train.log", "wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
        try:
            while True:
                rc = proc.poll()
                values = tail.read()
                if t_train is None and tail.last_step:  # training has begun
                    t_train = time.monotonic()
                if values:
                    last = values[-1][1]
                    ms = int(1000 * (time.monotonic() - (t_train or t0)))
                    if job.steps:  # each evaluation at its step (every rung seen); the last
                        reports = [(v, at) for at, v in values if at < job.steps]  # completes
                        spent = f"{values[-1][0]} steps"
                    else:  # the newest at its time, unless at the end of the time: complete
                        reports = [(last, ms)] if rc is None and ms < 0.95 * budget_ms else []
                        spent = f"{ms / 1000:.0f} s"
                    for value, resource in reports:
                        trial.report(value, resource)
                    if reports and rc is None and trial.should_prune():  # ended: complete
                        trial.set_user_attr("seconds", round(time.monotonic() - t0, 1))
                        trial.set_user_attr("steps", tail.last_step)
                        raise optuna.TrialPruned(f"pruned after {spent} of training")
                if rc is not None:
                    break
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    trial.set_user_attr("seconds", round(time.monotonic() - t0, 1))
    trial.set_user_attr("steps", tail.last_step)
    error = None
    if rc != 0:
        error = f"azllm train exited with {rc}: {_last_line(tdir / 'train.log')}"
    elif last is None:
        error = "no validation result in metrics.jsonl"
    elif not math.isfinite(last):
        error = f"diverged (validation bpb {last})"
    if error:
        trial.set_user_attr("outcome", "crashed")
        trial.set_user_attr("error", error)
        raise TrialCrashed(f"{error} (log: {tdir / 'train.log'})")
    return last


def _fmt(params: dict[str, Any]) -> str:
    return " ".join(
        f"{k.partition('.')[2]}={v:.3g}" if isinstance(v, float) else f"{k.partition('.')[2]}={v}"
        for k, v in sorted(params.items())
    )


def _objective(job: TuneJob):
    def objective(trial) -> float:
        import optuna

        trial.study.sampler = make_sampler(job.seed + trial.number, job.trials)
        trial.set_user_attr("worker", f"{HOST}:{os.getpid()}")
        ahead = [t for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number]
        if sum(_finished(t) or _pending(t) for t in ahead) >= job.trials:
            trial.set_user_attr("outcome", "surplus")
            raise Surplus()
        params = draw(job.space, trial)
        try:
            value = run_trial(job, trial, params)
        except optuna.TrialPruned as e:
            print(f"trial {trial.number}: {e} | {_fmt(params)}", flush=True)
            job.crashes.clear()
            raise
        except TrialCrashed as e:
            print(f"trial {trial.number}: failed: {e}", flush=True)
            job.crashes.append(str(e))
            raise
        except KeyboardInterrupt:
            frozen = trial.study.get_trials(deepcopy=False)
            _retry(trial.study, next(t for t in frozen if t.number == trial.number))
            raise
        job.crashes.clear()
        print(f"trial {trial.number}: {value:.4f} bpb | {_fmt(params)}", flush=True)
        return value

    return objective


def run_worker(job: TuneJob):
    """Run trials until the study holds job.trials finished ones; the study."""
    study = open_study(job, open_storage(job.storage))
    job.out.mkdir(parents=True, exist_ok=True)
    done = sum(map(_finished, study.get_trials(deepcopy=False)))
    print(
        f"study {job.study_name!r} in {job.storage}: {done} of {job.trials} trials done; "
        f"{f'{job.steps} steps' if job.steps else f'{job.minutes:g} min'} per trial, "
        f"{len(job.space)} settings tuned",
        flush=True,
    )
    objective = _objective(job)
    while True:
        reap_dead_workers(study)
        trials = study.get_trials(deepcopy=False)
        done, running = sum(map(_finished, trials)), sum(map(_running, trials))
        if done >= job.trials:
            return study
        if done + running >= job.trials:  # the rest run elsewhere: wait, in case one dies
            time.sleep(1.0)
            continue
        # else draw: a queued trial first (optuna's ask takes those before sampling)
        study.optimize(objective, n_trials=1, catch=(Surplus, TrialCrashed), gc_after_trial=False)
        if len(job.crashes) >= CRASHES_IN_A_ROW:
            raise AzllmError(
                f"{len(job.crashes)} trials in a row failed; the last: {job.crashes[-1]}"
            )
