"""Task evaluation: task files, scoring with shared prefixes, report cards, the three backends,
accuracy that moves when a model learns, agreement with lm-evaluation-harness."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE, run_cli

from azllm.config import ModelConfig
from azllm.documents import iter_all_documents
from azllm.errors import AzllmError
from azllm.evaluate.backends import RunBackend
from azllm.evaluate.harness import (
    evaluate_tasks,
    lm_eval_task_yaml,
    normalize,
    run_task,
    token_f1,
)
from azllm.evaluate.report import compare, mcnemar_p, wilson
from azllm.evaluate.tasks import load_tasks, shots_for
from azllm.model import GPT

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def cli(*args, **kw):
    return run_cli(*args, env=ONE_THREAD, **kw)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is fastest (two threads fight
    the other processes for the cores), here and in the processes the tests start."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _jsonl(path: Path, recs: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in recs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- the built-in task set -------------------------------------------------------------------


def test_az_basic_is_complete_and_balanced():
    mc, qa = load_tasks("az-basic")
    assert (mc.kind, qa.kind) == ("mc", "qa")
    assert len(mc.test) >= 200 and len(qa.test) >= 100 and mc.dev and qa.dev
    subjects = Counter(it.subject for it in mc.test)
    assert len(subjects) >= 5 and min(subjects.values()) >= 30
    assert all(len(it.choices) == 4 and len(set(it.choices)) == 4 for it in mc.test + mc.dev)
    # the right answer's position is spread evenly: a model that always says "A" gets chance
    pos = Counter(it.gold for it in mc.test + mc.dev)
    assert max(pos.values()) - min(pos.values()) <= 0.05 * len(mc.test)
    # no question twice, none in both dev and test (MC and QA may ask the same fact)
    mcs = [(it.question, *sorted(it.choices)) for it in mc.test + mc.dev]
    qas = [it.question for it in qa.test + qa.dev]
    assert len(mcs) == len(set(mcs)) and len(qas) == len(set(qas))
    text = " ".join(qas + [" ".join(q) for q in mcs])
    assert set("əıöüğşçƏİ") <= set(text)
    for it in mc.test[:5]:  # shots come from the question's own subject
        assert {s.subject for s in shots_for(it, mc.dev, 3)} == {it.subject}


# ---- formats and bad inputs ------------------------------------------------------------------


def test_reads_tumlu_folders_mmlu_indices_belebele_and_qa(tmp_path):
    q = {"question": "Bakı hansı dənizin sahilindədir?", "choices": ["Xəzər", "Qara", "Ağ"]}
    _jsonl(tmp_path / "t" / "test" / "cografiya.jsonl", [{**q, "answer": "A"}, {**q, "answer": 2}])
    _jsonl(tmp_path / "t" / "dev" / "cografiya.jsonl", [{**q, "answer": "a"}])
    (task,) = load_tasks(str(tmp_path / "t"))
    assert task.kind == "mc" and [it.gold for it in task.test] == [0, 2]
    assert task.test[1].where.endswith("cografiya.jsonl:2") and task.test[0].subject == "cografiya"
    assert len(task.dev) == 1
    bele = {
        "flores_passage": "Kür Azərbaycanın ən uzun çayıdır.",
        "question": "Ən uzun çay hansıdır?",
        **{f"mc_answer{i}": a for i, a in enumerate(["Araz", "Kür", "Samur", "Tərtər"], 1)},
        "correct_answer_num": "2",
    }
    (b,) = load_tasks(str(_jsonl(tmp_path / "belebele.jsonl", [bele])))
    assert b.test[0].gold == 1 and b.test[0].passage.startswith("Kür")
    (qa,) = load_tasks(str(_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "2"}])))
    assert qa.kind == "qa" and qa.test[0].answers == ["2"]


GOOD = {"question": "Sual?", "choices": ["a", "b", "c", "d"], "answer": "B"}


@pytest.mark.parametrize(
    ("records", "expect"),
    [
        ([GOOD, {"question": "Sual?", "answer": "A"}], [":2:", "'choices'"]),
        ([{**GOOD, "answer": "E"}], [":1:", "answer 'E'", "out of range", "A-D"]),
        ([{**GOOD, "answer": 7}], [":1:", "answer 7", "out of range"]),
        ([GOOD, "{not json"], [":2:", "not valid JSON"]),
        ([{**GOOD, "question": ""}], [":1:", "'question'"]),
        ([{"question": "Sual?"}], [":1:", "'answers'"]),
        # no record has "choices": multiple choice under another name is not read as QA
        ([{"question": "Sual?", "options": ["a", "b"], "answer": 1}], [":1:", "'choices'",
                                                                       "'options'"]),
        ([{"question": "1+1?", "answer": "2"}, {"question": "Sual?", "answer": "C"}],
         [":2:", "'choices'", "answer 'C'"]),
    ],
)  # fmt: skip
def test_bad_records_name_file_line_and_field(tmp_path, records, expect):
    path = _jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(AzllmError) as e:
        load_tasks(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    for part in expect:
        assert part in msg, msg


def test_bad_task_inputs_exit_2_with_one_line(tmp_path, tiny_run):
    (tmp_path / "nothing" / "dev").mkdir(parents=True)
    proc = cli("eval", "--run", tiny_run, "--tasks", tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and "test/" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    bad = _jsonl(tmp_path / "x.jsonl", [{**GOOD, "answer": "Z"}])
    proc = cli("eval", "--run", tiny_run, "--tasks", bad, check=False)
    assert proc.returncode == 2 and f"{bad}:1:" in proc.stderr and "answer" in proc.stderr
    with pytest.raises(AzllmError, match="no such file"):
        load_tasks(str(bad.with_name("y.jsonl")))
    # a shot count with no dev split to take the shots from
    (ok,) = load_tasks(str(_jsonl(tmp_path / "ok.jsonl", [GOOD])))
    with pytest.raises(AzllmError, match="no dev split"):
        run_task(None, ok, shots=2)


# ---- scoring ---------------------------------------------------------------------------------


def test_shared_prefix_scores_equal_one_sequence_at_a_time():
    """The context runs once into a KV cache shared by all continuations; each result must
    equal a plain forward pass over that one context + continuation, no cache, no padding."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg).eval()
    # the init's 0.02 gives near-uniform attention, blind to a wrong context's keys; at 0.3 the
    # sums still agree within 1e-5 (measured: above 1e-6), under the 1e-4 below
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.3)

    class Tok:
        pad_id, eos_id, end_id = 0, 1, 2

    backend = RunBackend(model, Tok(), batch_rows=5)  # small: several batches, mixed lengths
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 40, (n,), generator=g).tolist()

    groups = [
        (ids(3), [ids(1), ids(4), ids(2)]),
        (ids(12), [ids(5), ids(1)]),  # 12 + 5 - 1 = 16: fills the window
        (ids(1), [ids(3)]),
        (ids(7), [ids(2), ids(2), ids(6), ids(1)]),
    ]
    got = backend.loglikelihood(groups)
    for (ctx, conts), res in zip(groups, got, strict=True):
        for cont, (lp, greedy) in zip(conts, res, strict=True):
            full = ctx + cont
            with torch.no_grad():
                logits, _ = model(torch.tensor([full[:-1]]))
            logp = torch.log_softmax(logits[0].double(), -1)[len(ctx) - 1 :]
            ref = sum(logp[i, t].item() for i, t in enumerate(cont))
            assert lp == pytest.approx(ref, abs=1e-4)
            assert greedy == all(logp[i].argmax().item() == t for i, t in enumerate(cont))


def test_normalisation_and_token_f1():
    assert normalize("  İSTİ, BAKI! ") == "isti bakı"  # Azerbaijani İ/i and I/ı
    assert token_f1("Nizami Gəncəvi", "Nizami") == pytest.approx(2 / 3)
    assert token_f1("Xəzər dənizi", "xəzər  DƏNİZİ.") == 1.0
    assert token_f1("", "Bakı") == 0.0


def test_interval_and_paired_test_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 10), (7, 20), (150, 210)):
        ci = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    for b, c in ((0, 6), (3, 11), (10, 10), (0, 0)):
        ref = stats.binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
        assert mcnemar_p(b, c) == pytest.approx(ref, rel=1e-9)


# ---- the command and its report card ---------------------------------------------------------


def test_cli_prints_accuracy_with_chance_and_writes_report_card(tiny_run, tmp_path):
    out = tmp_path / "cards"
    proc = cli(
        "eval", "--run", tiny_run, "--tasks", "az-basic", "--limit", "12", "--shots", "1",
        "--json", "--out", out,
    )  # fmt: skip
    mc, qa = (json.loads(line) for line in proc.stdout.splitlines())
    assert (mc["task"], mc["n"], mc["shots"], mc["chance"]) == ("az-basic-mc", 12, 1, 0.25)
    lo, hi = mc["acc_ci95"]
    assert lo <= mc["acc"] <= hi and 0 <= mc["acc_norm"] <= 1 and mc["per_subject"]
    assert qa["task"] == "az-basic-qa" and 0 <= qa["exact_match"] <= qa["f1"] + 1e-9
    card = json.loads((out / "az-basic-mc.json").read_text(encoding="utf-8"))
    assert card["summary"]["acc"] == mc["acc"] and len(card["records"]) == 12
    rec = card["records"][0]
    assert rec["prompt"].count("Sual:") == 2 and len(rec["choice_logprobs"]) == 4
    assert rec["pred"] == max(range(4), key=lambda i: rec["choice_logprobs"][i])
    assert sum(r["correct"] for r in card["records"]) / 12 == mc["acc"]
    assert "| az-basic-mc |" in (out / "report.md").read_text(encoding="utf-8")
    # plain output: the table with the chance column, per-subject rows
    proc = cli("eval", "--run", tiny_run, "--tasks", "az-basic", "--limit", "4")
    assert "chance" in proc.stdout and "25.0" in proc.stdout and "by subject" in proc.stdout
    assert (Path(tiny_run) / "eval" / "az-basic-qa.json").is_file()


def test_chat_form_asks_with_letters(tiny_run, tmp_path):
    from azllm.checkpoint import load_run

    model, tok, _ = load_run(Path(tiny_run))
    mc = load_tasks("az-basic")[0]
    recs = run_task(RunBackend(model, tok), mc, shots=1, chat=True, limit=6)
    p = recs[0]["prompt"]
    assert p.startswith("<|bos|><|user|>") and p.endswith("<|assistant|>")
    assert "\nA. " in p and "\nD. " in p and p.count("<|user|>") == 2
    assert all(r["pred"] == r["pred_norm"] for r in recs)
    # a base card against a chat card of the same task: compared as one task, two forms
    backend = RunBackend(model, tok)
    for form, chat in (("base", False), ("chat", True)):
        evaluate_tasks(backend, [str(mc.source)], model=form, chat=chat, limit=6,
                       out_dir=tmp_path / form)  # fmt: skip
    assert {p.name for p in (tmp_path / "chat").iterdir()} == {"mc-chat.json", "report.md"}
    (row,) = compare(str(tmp_path / "base"), str(tmp_path / "chat"))
    assert row["task"] == "mc (base / chat)" and row["n"] == 6


# ---- a model that learned the task scores above chance on unseen questions; a random one not --


def _copy_task(folder: Path) -> tuple[Path, list[str]]:
    """Questions of one kind, "repeat the word W", with W and three other words as choices (the
    answer's position cycling through A-D). The 48 test words are held out: the training text
    (returned) asks the same about the sample corpus's other words, so the only thing to learn
    that helps on the test is the pattern (copy the word from the question), not the answers."""
    text = " ".join(iter_all_documents([SAMPLE]))
    words = sorted({w for w in re.findall(r"[^\W\d_]+", text.lower()) if 4 <= len(w) <= 8})
    test_words, train_words = words[::8][:48], [w for i, w in enumerate(words) if i % 8]
    test = []
    for i, w in enumerate(test_words):
        wrong = [test_words[(i + 1 + 7 * k) % len(test_words)] for k in range(3)]
        pos = i % 4
        test.append({"question": f"Təkrarla: {w}", "choices": wrong[:pos] + [w] + wrong[pos:],
                     "answer": "ABCD"[pos], "subject": "təkrar"})  # fmt: skip
    return _jsonl(folder / "test.jsonl", test).parent, train_words


def test_accuracy_rises_when_the_model_learns_the_task(tmp_path, tok):
    from azllm.config import apply_overrides, load_config
    from azllm.evaluate.harness import base_context
    from azllm.evaluate.tasks import Item
    from azllm.shards import tokenize_to_shards
    from azllm.train import train

    task_dir, train_words = _copy_task(tmp_path / "tekrar")
    (task,) = load_tasks(str(task_dir))
    # training text: the same kind of question about other words, as the prompt writes them
    docs = [base_context(Item("", f"Təkrarla: {w}", "", ""), []) + " " + w for w in train_words]
    corpus = "\n\n".join(docs * 3) + "\n"
    held_out = {w for it in task.test for w in it.choices}
    assert len(held_out) == 48 and not held_out & set(re.findall(r"[^\W\d_]+", corpus))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "copy.txt").write_text(corpus, encoding="utf-8")
    data = tmp_path / "shards"
    tokenize_to_shards(tok, [tmp_path / "corpus"], data, val_fraction=0.0, progress=False)
    # 400 steps: accuracy 0.75 measured (0.875 at 600, 0.375 at 400 with a longer question)
    cfg = apply_overrides(
        load_config("tiny"),
        {"train.precision": "fp32", "train.max_steps": 400, "train.micro_batch": 8,
         "train.warmup_steps": 10, "train.ckpt_interval": 400, "train.log_interval": 100},
    )  # fmt: skip
    run = tmp_path / "learned"
    train(cfg, data, run, progress=False)
    proc = cli("eval", "--run", run, "--tasks", task_dir, "--json")
    learned = json.loads(proc.stdout)
    rand = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        random_model = GPT(dataclasses.replace(cfg.model, vocab_size=tok.vocab_size))
        rand += evaluate_tasks(
            RunBackend(random_model.eval(), tok), [str(task_dir)], model=f"random{seed}",
            out_dir=tmp_path / f"random{seed}" / "eval",
        )  # fmt: skip
    assert learned["n"] == rand[0]["n"] == 48 and learned["chance"] == 0.25
    assert learned["acc_ci95"][0] > 0.25 and learned["acc"] >= 0.6, learned
    for r in rand:
        assert r["acc_ci95"][0] <= 0.25 <= r["acc_ci95"][1], r
    # --compare: each run against the first, side by side; the learned one beyond noise
    runs = [tmp_path / "random0", run, tmp_path / "random1"]
    proc = cli("eval", "--compare", *runs, "--json")
    row, row2 = (json.loads(line) for line in proc.stdout.splitlines())
    assert (row["task"], row["n"], row["b_run"], row2["b_run"]) == ("tekrar", 48, str(run),
                                                                    str(runs[2]))  # fmt: skip
    assert row["diff"] == pytest.approx(learned["acc"] - rand[0]["acc"])
    assert row["exceeds_noise"] and row["p_value"] < 0.05 and math.isclose(row["b"], learned["acc"])
    assert row2["diff"] == pytest.approx(rand[1]["acc"] - rand[0]["acc"])
    assert not row2["exceeds_noise"]
    out = cli("eval", "--compare", *runs).stdout
    assert "| task | n | A | B | B - A |" in out and "| C | C - A |" in out
    table_row = next(line for line in out.splitlines() if line.startswith("| tekrar |"))
    cells = [c.strip() for c in table_row.strip("|").split("|")]
    assert cells[:3] == ["tekrar", "48", f"{100 * rand[0]['acc']:.1f}"]
    assert (cells[3], cells[8], cells[9], cells[14]) == (
        f"{100 * learned['acc']:.1f}", "yes", f"{100 * rand[1]['acc']:.1f}", "no")  # fmt: skip
    proc = cli("eval", "--compare", run, check=False)  # one run: nothing to compare with
    assert proc.returncode == 2 and "at least two" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---- the other model forms -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tiny_run, tmp_path_factory):
    """tiny_run as a Hugging Face folder and as an F32 and a Q8_0 GGUF."""
    pytest.importorskip("transformers")
    from azllm.export.hf import export_hf

    out = tmp_path_factory.mktemp("exports")
    found = {"hf": export_hf(tiny_run, out / "hf")}
    if pytest.importorskip("llama_cpp"):
        from azllm.export.gguf import export_gguf

        for kind in ("f32", "q8_0"):
            found[kind] = export_gguf(tiny_run, out / f"tiny-{kind}.gguf", kind=kind)
    return found


def _lps(records):
    return [lp for r in records for lp in r["choice_logprobs"]]


def test_hf_and_gguf_score_as_the_run_does(tiny_run, exports, tmp_path):
    """The same questions on the run, its HF export and its GGUF: the same log-likelihoods
    (within float error: 1e-4 measured ~4e-6 for HF; GGUF F32 through llama.cpp's kernels) and
    the same predictions; Q8_0 runs and writes its own report card."""
    from azllm.evaluate.backends import open_backend

    task = _jsonl(tmp_path / "t" / "test.jsonl", _az_basic_lines(24))
    (tmp_path / "t" / "dev.jsonl").write_text(_az_basic_dev(), encoding="utf-8")
    (t,) = load_tasks(str(tmp_path / "t"))
    assert task.is_file()
    base = run_task(open_backend(run=tiny_run)[0], t, shots=1)
    hf = run_task(open_backend(hf=exports["hf"])[0], t, shots=1)
    assert _lps(hf) == pytest.approx(_lps(base), abs=1e-4)
    assert [r["pred"] for r in hf] == [r["pred"] for r in base]
    gg, _, _ = open_backend(gguf=exports["f32"])
    try:
        gguf = run_task(gg, t, shots=1)
        qa = load_tasks("az-basic")[1]
        gguf_qa = run_task(gg, qa, shots=1, limit=4)
    finally:
        gg.close()
    assert _lps(gguf) == pytest.approx(_lps(base), abs=2e-3)
    assert [r["pred"] for r in gguf] == [r["pred"] for r in base]
    ours_qa = run_task(open_backend(run=tiny_run)[0], qa, shots=1, limit=4)
    assert [r["output"] for r in gguf_qa] == [r["output"] for r in ours_qa]
    out = tmp_path / "q8"
    proc = cli("eval", "--gguf", exports["q8_0"], "--tasks", tmp_path / "t", "--json",
                   "--out", out)  # fmt: skip
    q8 = json.loads(proc.stdout)
    assert q8["n"] == 24 and (out / "t.json").is_file()


def test_gguf_that_is_not_a_model_is_one_line(tmp_path, tiny_run):
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"not a model" * 10)
    proc = cli("eval", "--gguf", bad, "--tasks", "az-basic", "--limit", "2", check=False)
    assert proc.returncode == 2 and str(bad) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli("eval", "--hf", tiny_run, "--tasks", "az-basic", check=False)
    assert proc.returncode == 2 and "config.json" in proc.stderr


def _az_basic_lines(n: int) -> list[str]:
    path = Path(__file__).resolve().parents[1] / "azllm/data/tasks/az-basic/mc/test/cografiya.jsonl"
    return path.read_text(encoding="utf-8").splitlines()[:n]


def _az_basic_dev() -> str:
    path = Path(__file__).resolve().parents[1] / "azllm/data/tasks/az-basic/mc/dev/cografiya.jsonl"
    return path.read_text(encoding="utf-8")


def test_lm_evaluation_harness_agrees(tiny_run, exports, tmp_path, monkeypatch):
    """lm-eval on the HF export (a local task over the same JSONL, same 2 shots and prompt) and
    `azllm eval` on the run: the same per-question log-likelihoods and predictions (acc and
    acc_norm). Prompts longer than the context (128) are cut from the left by both alike."""
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    test = _jsonl(tmp_path / "t" / "test.jsonl", _az_basic_lines(35))
    dev = tmp_path / "t" / "dev.jsonl"
    dev.write_text(_az_basic_dev(), encoding="utf-8")
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "agreement.yaml").write_text(
        lm_eval_task_yaml("azllm_agreement", test, dev)
    )
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={exports['hf']},dtype=float32",
        tasks=["azllm_agreement"],
        num_fewshot=2,
        task_manager=TaskManager(include_path=str(tmp_path / "yaml")),
        log_samples=True,
        batch_size=8,
        device="cpu",
    )
    samples = sorted(res["samples"]["azllm_agreement"], key=lambda s: s["doc_id"])
    (task,) = load_tasks(str(tmp_path / "t"))
    from azllm.evaluate.backends import open_backend

    ours = run_task(open_backend(run=tiny_run)[0], task, shots=2)
    assert len(samples) == len(ours) == 35
    theirs_lp = [float(r[0]) for s in samples for r in s["filtered_resps"]]
    assert _lps(ours) == pytest.approx(theirs_lp, abs=1e-4)
    assert [r["correct"] for r in ours] == [bool(s["acc"]) for s in samples]
    assert [r["correct_norm"] for r in ours] == [bool(s["acc_norm"]) for s in samples]
    metrics = res["results"]["azllm_agreement"]
    assert metrics["acc,none"] == pytest.approx(sum(r["correct"] for r in ours) / 35)
    assert max(r["prompt_tokens"] for r in ours) > 110  # some prompts were cut to fit 128


# ---- during training -------------------------------------------------------------------------


def test_train_logs_task_accuracy_and_plots_it(data_dir, tmp_path):
    from azllm.metrics import read_metrics

    run = tmp_path / "run"
    cli(
        "train", "--config", "tiny", "--data", data_dir, "--out", run, "--max-steps", "4",
        "--eval-interval", "4", "--precision", "fp32", "--eval-tasks", "az-basic",
        "--eval-tasks-every", "2", "--eval-tasks-limit", "4",
    )  # fmt: skip
    logged = [r for r in read_metrics(run) if "tasks" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for r in logged:
        assert set(r["tasks"]) == {"az-basic-mc", "az-basic-qa"}
        assert all(v in (0, 0.25, 0.5, 0.75, 1) for v in r["tasks"].values())  # 4 questions
    # the same scores as `azllm eval` on the final weights
    proc = cli("eval", "--run", run, "--tasks", "az-basic", "--limit", "4", "--json")
    final = {
        s["task"]: s.get("acc", s.get("exact_match"))
        for s in map(json.loads, proc.stdout.split("\n")[:2])
    }
    assert final == logged[-1]["tasks"]
    from PIL import Image

    assert Image.open(run / "loss.png").size[1] > 600  # two panels (one panel: 400 px high)
    bad = _jsonl(tmp_path / "bad.jsonl", [{**GOOD, "answer": "Q"}])
    proc = cli(
        "train", "--config", "tiny", "--data", data_dir, "--out", tmp_path / "r2",
        "--max-steps", "2", "--eval-tasks", bad, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and f"{bad}:1:" in proc.stderr
    assert not (tmp_path / "r2" / "checkpoints").exists() or not any(
        (tmp_path / "r2" / "checkpoints").iterdir()
    )
    # 0 is not "the default interval": refused in one line before anything is written
    proc = cli(
        "train", "--config", "tiny", "--data", data_dir, "--out", tmp_path / "r3",
        "--max-steps", "2", "--eval-tasks", "az-basic", "--eval-tasks-every", "0", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--eval-tasks-every 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r3").exists()
