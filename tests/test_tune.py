"""`azllm tune`: a real study of real `azllm train` processes on the tiny preset.

Each trial trains for MINUTES of wall time, so these tests take tens of seconds, not minutes.
The study is read back through Optuna's own storage, as a second worker would read it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE, run_cli

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402
from sqlalchemy.exc import DBAPIError  # noqa: E402

from azllm.cli import main  # noqa: E402
from azllm.config import load_config  # noqa: E402

MINUTES = 0.04  # 2.4 s of training per trial
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def base_toml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "base.toml"
    # Evaluations every 5 steps (one batch each): several reports per trial for the pruner.
    path.write_text(
        'preset = "tiny"\n[train]\ndevice = "cpu"\nprecision = "fp32"\n'
        "eval_interval = 5\neval_batches = 1\n",
        encoding="utf-8",
    )
    return path


def tune_args(base_toml, data_dir, out, trials, *extra) -> list[str]:
    return [
        "tune", "--config", str(base_toml), "--data", str(data_dir), "--out", str(out),
        "--trials", str(trials), "--minutes-per-trial", str(MINUTES), *extra,
    ]  # fmt: skip


def start(args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "azllm.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def load_study(out: Path):
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{out / 'study.db'}", engine_kwargs={"connect_args": {"timeout": 60}}
    )
    return optuna.load_study(study_name="azllm", storage=storage)


def finished(study) -> list:
    return study.get_trials(deepcopy=False, states=FINISHED)


def test_killed_study_resumes_without_losing_finished_trials(tmp_path, data_dir, base_toml):
    out, n = tmp_path / "study", 3
    args = tune_args(base_toml, data_dir, out, n)
    proc = start(args)
    study, deadline = None, time.monotonic() + 300
    try:
        # Kill once two trials are finished and a third is training (its metrics.jsonl exists).
        while True:
            assert proc.poll() is None, f"tune ended before the kill:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no two finished trials in 300 s"
            if study is None and (out / "study.db").exists():
                try:
                    study = load_study(out)
                except (KeyError, DBAPIError):  # the worker is still making the database
                    pass
            if study is not None:
                trials = study.get_trials(deepcopy=False)
                done = [t for t in trials if t.state in FINISHED]
                training = [
                    t
                    for t in trials
                    if t.state == TrialState.RUNNING
                    and (Path(t.user_attrs.get("dir", out / "none")) / "run/metrics.jsonl").exists()
                ]
                if len(done) >= 2 and training:
                    break
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    before = {t.number: (t.state, t.value, t.params) for t in done}
    cut = training[0]

    again = run_cli(*args, cwd=REPO, timeout=300)
    assert f"trial {cut.number}: its worker (pid {proc.pid}) is gone" in again.stdout
    study = load_study(out)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, (state, value, params) in before.items():  # kept as they were
        assert (trials[number].state, trials[number].value, trials[number].params) == (
            state,
            value,
            params,
        )
    assert len(finished(study)) == n
    # The interrupted trial is failed, and its settings ran again to the end.
    assert trials[cut.number].state == TrialState.FAIL
    rerun = [t for t in finished(study) if t.user_attrs.get("retry_of") == cut.number]
    assert len(rerun) == 1 and rerun[0].params == cut.params
    assert [t.number for t in trials.values() if t.state == TrialState.FAIL] == [cut.number]
    # its training process died with the worker: it never reached its final checkpoint
    assert not list((Path(cut.user_attrs["dir"]) / "run" / "checkpoints").glob("step-*"))
    assert trials[0].params == {  # the config's own settings are trial 0
        "train.lr": 3e-3, "train.warmup_steps": 2, "train.weight_decay": 0.1, "train.beta2": 0.95,
        "train.micro_batch": 4, "train.grad_accum": 1, "model.dropout": 0.0,
        "train.optimizer": "adamw",  # tiny's; no train.muon_lr, which only acts under muon
    }  # fmt: skip


SPACE = """\
train.lr = {low = 1e-3, high = 1e-2, log = true}
train.warmup_steps = {low = 0, high = 5}
train.grad_accum = {choices = [1, 2]}
model.dropout = {low = 0.01, high = 0.1}
"""


@pytest.fixture(scope="module")
def two_worker_study(tmp_path_factory, data_dir, base_toml):
    """Two `azllm tune` processes started together on one SQLite study of 4 trials, over a
    space where no trial can keep the preset's dropout (so best.toml must carry a drawn one)."""
    out, n = tmp_path_factory.mktemp("tune2") / "study", 4
    space = out.parent / "space.toml"
    space.write_text(SPACE, encoding="utf-8")
    procs = [start(tune_args(base_toml, data_dir, out, n, "--space", space)) for _ in range(2)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=400)[0])
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text
    return out, n, outputs


def test_two_workers_share_one_study_without_duplicates(two_worker_study):
    out, n, _ = two_worker_study
    study = load_study(out)
    done = finished(study)
    assert len(done) == n  # exactly N between them, not N each
    assert len({t.number for t in done}) == n
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == n  # no setting twice
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both worked
    assert len({t.user_attrs["dir"] for t in done}) == n
    # nothing interrupted or crashed; a draw beyond N never trained (no trial folder)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        assert t.user_attrs.get("outcome") == "surplus" and "dir" not in t.user_attrs


def test_best_toml_reproduces_the_best_trial(two_worker_study, base_toml, tmp_path):
    out, _, outputs = two_worker_study
    study = load_study(out)
    best = min(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    text = (out / "best.toml").read_text(encoding="utf-8")
    assert text in outputs[0] + outputs[1]  # printed too
    assert text.count('preset = "tiny"') == 1
    cfg = load_config(str(out / "best.toml")).to_dict()
    ran = json.loads((Path(best.user_attrs["dir"]) / "run" / "config.json").read_text())
    budget = {"model.vocab_size", "train.max_minutes", "train.max_steps", "train.ckpt_interval"}
    base = load_config(str(base_toml)).to_dict()
    for section in ("model", "train"):
        for key, value in ran[section].items():
            if f"{section}.{key}" not in budget:
                assert cfg[section][key] == value, f"{section}.{key}"
            elif key != "vocab_size":  # the trial's budget, not the user's run length
                assert cfg[section][key] == base[section][key], f"{section}.{key}"
    for key, value in best.params.items():
        section, _, name = key.partition(".")
        assert cfg[section][name] == value
    assert 0.01 <= cfg["model"]["dropout"] <= 0.1  # drawn, not the preset's 0.0
    png = (out / "trials.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # --report writes the same best.toml again from the study alone
    (out / "best.toml").unlink()
    (out / "trials.png").unlink()
    proc = run_cli("tune", "--out", out, "--report", cwd=tmp_path)
    assert (out / "best.toml").read_text(encoding="utf-8") == text
    assert text in proc.stdout and (out / "trials.png").exists()


def test_a_draw_beyond_n_is_a_surplus_and_never_trains(tmp_path, data_dir):
    """The race two workers can lose: both see N-1 finished and draw at once. The later draw
    counts the trials before it (finished or running) and ends unrun."""
    from azllm.tune import study as st
    from azllm.tune.space import default_space

    base = load_config("tiny")
    job = st.TuneJob(
        base=base, preset="tiny", data=data_dir, out=tmp_path, trials=2, minutes=MINUTES,
        space=default_space(base), storage=f"sqlite:///{tmp_path / 'study.db'}",
    )  # fmt: skip
    study = st.open_study(job, st.open_storage(job.storage, heartbeat=False))
    for _ in range(2):  # trial 0 (the baseline) and trial 1, running in this (live) process
        study.ask().set_user_attr("worker", f"{st.HOST}:{os.getpid()}")
    study.optimize(st._objective(job), n_trials=1, catch=(st.Surplus, st.TrialCrashed))
    t = study.trials[2]
    assert t.state == TrialState.FAIL and t.user_attrs["outcome"] == "surplus"
    assert not (tmp_path / "trials").exists()


@pytest.fixture(scope="module")
def data_without_val(tmp_path_factory, tok):
    from azllm.shards import tokenize_to_shards

    out = tmp_path_factory.mktemp("noval") / "shards"
    tokenize_to_shards(tok, [SAMPLE], out, val_fraction=0.0, progress=False)
    return out


@pytest.mark.parametrize(
    "space, data, extra, message",
    [
        ("train.lrr = {low = 1e-4, high = 1e-2}", None, [], "unknown config key 'train.lrr'"),
        ("optim.lr = {low = 1e-4, high = 1e-2}", None, [], "unknown config key 'optim'"),
        ("train.lr = {low = 0.1, high = 0.01}", None, [], "train.lr: low (0.1) must be below"),
        ("train.lr = 0.01", None, [], "train.lr must be a table"),
        ("train.lr = {low = 0.0, high = 0.1, log = true}", None, [], "log range needs low > 0"),
        ("train.lr = {low = 1e-4, hi = 0.1}", None, [], "train.lr: expected {low"),
        ("model.n_head = {choices = [4, 3]}", None, [], "model.n_head = 3 is not a valid"),
        ("train.warmup_steps = {low = 0.5, high = 10}", None, [], "must both be int"),
        ("train.max_minutes = {low = 1, high = 2}", None, [], "train.max_minutes cannot be tuned"),
        ("train.lr = {low = 1e-4", None, [], "not valid TOML"),
        (None, "missing", [], "no meta.json"),
        (None, "noval", [], "no validation split"),
        (None, None, ["--trials", "0"], "--trials 0: give at least 1"),
        (None, None, ["--minutes-per-trial", "0"], "--minutes-per-trial 0.0: give a positive"),
        (None, None, ["--storage", "nosuch://db"], "--storage nosuch://db: cannot open the study"),
        (None, None, ["--steps-per-trial", "5"], "give exactly one trial budget"),
    ],
)
def test_bad_inputs_are_one_line_errors(
    space, data, extra, message, tmp_path, data_dir, data_without_val, base_toml, capsys
):
    data = {None: data_dir, "missing": tmp_path / "nothing", "noval": data_without_val}[data]
    args = tune_args(base_toml, data, tmp_path / "out", 2)
    if space is not None:
        (tmp_path / "space.toml").write_text(space + "\n", encoding="utf-8")
        args += ["--space", str(tmp_path / "space.toml")]
    assert main([*args, *extra]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("azllm: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()  # refused before any study or trial


def test_report_without_a_study_is_one_line(tmp_path, capsys):
    assert main(["tune", "--out", str(tmp_path), "--report"]) == 2
    assert "no study.db here" in capsys.readouterr().err


def test_missing_optuna_names_the_extra(tmp_path, data_dir, base_toml):
    code = (
        "import sys\nsys.modules['optuna'] = None\nfrom azllm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    args = tune_args(base_toml, data_dir, tmp_path / "out", 2)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "azllm: error: azllm tune needs the 'tune' extra (optuna not installed): "
        "pip install 'azllm[tune]'"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", ["tiny", "az-1b"])
def test_every_config_field_survives_the_toml_writer(preset, tmp_path):
    """A trial's config.toml and best.toml are written by tune.settings: every field of every
    table, a dict (model.rope_scaling of an imported Llama 3) included, reads back equal."""
    from azllm.config import apply_overrides
    from azllm.tune.settings import config_tables, toml_text

    scaling = dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )  # fmt: skip
    cfg = apply_overrides(load_config(preset), {"model.rope_scaling": scaling})
    path = tmp_path / "c.toml"
    path.write_text(toml_text(config_tables(cfg)), encoding="utf-8")
    assert load_config(str(path)).to_dict() == cfg.to_dict()


STEPS = 12  # evaluations at steps 5 and 10 (reported to the pruner) and 12 (the result)


def steps_args(base_toml, data_dir, out, trials, steps=STEPS) -> list[str]:
    return [
        "tune", "--config", str(base_toml), "--data", str(data_dir), "--out", str(out),
        "--trials", str(trials), "--steps-per-trial", str(steps),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def steps_study(tmp_path_factory, data_dir, base_toml):
    """A study of 3 trials budgeted in steps, on the default space (optimizer choice included)."""
    out = tmp_path_factory.mktemp("tune_steps") / "study"
    proc = run_cli(*steps_args(base_toml, data_dir, out, 3), cwd=REPO, timeout=400)
    return out, proc.stdout


def test_a_steps_budgeted_trial_trains_exactly_n_steps(steps_study):
    out, stdout = steps_study
    study = load_study(out)
    assert study.user_attrs["azllm"]["steps_per_trial"] == STEPS
    assert study.user_attrs["azllm"]["minutes_per_trial"] is None
    done = finished(study)
    assert len(done) == 3
    for t in done:
        run = Path(t.user_attrs["dir"]) / "run"
        cfg = json.loads((run / "config.json").read_text())["train"]
        assert (cfg["max_steps"], cfg["max_minutes"]) == (STEPS, 0.0)  # no clock: N steps
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in recs if "step" in r) == STEPS
        assert t.user_attrs["steps"] == STEPS
        # the pruner's resource is the evaluation's step (not milliseconds), before the end
        assert set(t.intermediate_values) == {5, 10}
        # the batch is the config's (tiny: 4 x 1): no trial wins by more tokens per step
        assert (cfg["micro_batch"], cfg["grad_accum"]) == (4, 1)
        assert not {"train.micro_batch", "train.grad_accum"} & set(t.params)
        # the drawn optimizer is the one that trained; Muon's lr is drawn only for Muon
        assert cfg["optimizer"] == t.params["train.optimizer"]
        assert ("train.muon_lr" in t.params) == (cfg["optimizer"] == "muon")
    text = (out / "best.toml").read_text(encoding="utf-8")
    assert f"after {STEPS} steps of training (every trial)" in text and text in stdout
    assert f"{STEPS} steps per trial" in stdout
    cfg = load_config(str(out / "best.toml")).to_dict()
    assert cfg["train"]["max_steps"] == 20  # tiny's own run length, not the trials' budget


def test_a_steps_study_resumes_and_refuses_another_budget(
    steps_study, base_toml, data_dir, tmp_path, capsys
):
    out, _ = steps_study
    # resumed copy (the module's study stays as it was for the other test)
    import shutil

    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    before = {t.number: (t.state, t.value, t.params) for t in finished(load_study(copy))}
    for extra, was in (
        (["--minutes-per-trial", str(MINUTES)], f"--minutes-per-trial {MINUTES:g}"),
        (["--steps-per-trial", str(STEPS + 1)], f"--steps-per-trial {STEPS + 1}"),
    ):
        args = steps_args(base_toml, data_dir, copy, 4)[:-2] + extra
        assert main(args) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and f"was started with --steps-per-trial {STEPS}, not {was}" in err[0]
    assert len(load_study(copy).trials) == len(before)  # refused before drawing anything
    main(steps_args(base_toml, data_dir, copy, 4))  # the same budget: one more trial
    study = load_study(copy)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, (state, value, params) in before.items():
        assert (trials[number].state, trials[number].value, trials[number].params) == (
            state,
            value,
            params,
        )
    assert len(finished(study)) == 4
    new = [t for t in finished(study) if t.number not in before]
    assert (
        json.loads((Path(new[0].user_attrs["dir"]) / "run" / "config.json").read_text())["train"][
            "max_steps"
        ]
        == STEPS
    )


def test_default_space_chooses_the_optimizer_on_llama():
    from optuna.trial import FixedTrial

    from azllm.config import apply_overrides, derived_lr
    from azllm.tune.space import baseline_params, default_space, draw

    tiny = load_config("tiny")  # llama, AdamW
    space = default_space(tiny)
    assert space["train.optimizer"].choices == ("adamw", "muon")
    mlr = space["train.muon_lr"]
    assert mlr.log and mlr.low < tiny.train.muon_lr < mlr.high
    # Muon's lr is drawn only for a Muon trial, whatever order the space lists the keys in
    fixed = {"train.optimizer": "adamw", "train.muon_lr": 0.03}
    reordered = {k: space[k] for k in ["train.muon_lr", "train.optimizer"]}
    assert draw(reordered, FixedTrial(fixed)) == {"train.optimizer": "adamw"}
    fixed["train.optimizer"] = "muon"
    assert draw(reordered, FixedTrial(fixed)) == fixed
    # the study's trial 0 is the config's own point: tiny's AdamW alone, baby's Muon with its lr
    assert baseline_params(tiny, space)["train.optimizer"] == "adamw"
    assert "train.muon_lr" not in baseline_params(tiny, space)
    baby = load_config("baby")
    base = baseline_params(baby, default_space(baby))
    assert (base["train.optimizer"], base["train.muon_lr"]) == ("muon", baby.train.muon_lr)
    assert base["train.lr"] == derived_lr(baby.model, "muon")  # baby's lr = 0: derived, named
    assert base["train.warmup_steps"] == 0  # baby's warmup = -1: derived (none with Muon)
    # not on gpt2 blocks (Muon is measured on llama only); an explicit Muon keeps its lr tuned
    gpt2 = apply_overrides(tiny, {"model.arch": "gpt2"})
    assert not {"train.optimizer", "train.muon_lr"} & set(default_space(gpt2))
    gpt2_muon = apply_overrides(gpt2, {"train.optimizer": "muon"})
    assert "train.muon_lr" in default_space(gpt2_muon)
    assert "train.optimizer" not in default_space(gpt2_muon)
