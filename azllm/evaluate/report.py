"""Report cards: a task's summary (accuracy, interval, chance, per subject), the per-question
file RUN/eval/<task>.json, a markdown table, and the paired comparison of evaluations (each
run against the first, side by side).

The 95% interval is Wilson's score interval (sound at small n and near 0 or 1, unlike the
normal approximation). Two models on the same questions are compared by McNemar's exact test on
the questions one got right and the other wrong: the difference "exceeds noise" when p < 0.05.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from azllm.atomic import atomic_write_text
from azllm.errors import AzllmError

Z95 = 1.959963984540054


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b, c = questions only A / only B got right."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def summarize(task, records: list[dict], *, model: str, form: str, shots: int) -> dict:
    """One task's report-card entry (what --json prints)."""
    n = len(records)
    out = {"task": task.name, "kind": task.kind, "form": form, "shots": shots, "model": model}
    out["n"] = n
    if task.kind == "mc":
        k = sum(r["correct"] for r in records)
        out["acc"] = k / n if n else 0.0
        out["acc_ci95"] = list(wilson(k, n))
        out["acc_norm"] = sum(r["correct_norm"] for r in records) / n if n else 0.0
        out["acc_bytes"] = sum(r["correct_bytes"] for r in records) / n if n else 0.0
        out["chance"] = sum(1 / r["n_choices"] for r in records) / n if n else 0.0
        metric = "correct"
    else:
        k = sum(r["exact_match"] for r in records)
        out["exact_match"] = k / n if n else 0.0
        out["exact_match_ci95"] = list(wilson(k, n))
        out["f1"] = sum(r["f1"] for r in records) / n if n else 0.0
        metric = "exact_match"
    subjects: dict[str, list[dict]] = {}
    for r in records:
        subjects.setdefault(r["subject"], []).append(r)
    out["per_subject"] = {
        s: {"n": len(rs), "score": sum(float(r[metric]) for r in rs) / len(rs)}
        for s, rs in sorted(subjects.items())
    }
    return out


def card_name(task_name: str, form: str) -> str:
    return f"{task_name}-chat" if form == "chat" else task_name


def write_card(folder: Path, summary: dict, records: list[dict]) -> Path:
    path = Path(folder) / f"{card_name(summary['task'], summary['form'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"summary": summary, "records": records}, ensure_ascii=False, indent=1)
    atomic_write_text(path, text + "\n")
    return path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(summaries: list[dict]) -> str:
    """The report card as a markdown table (one row per task)."""
    rows = [
        "| task | form | shots | n | score | 95% interval | acc_norm | chance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        if s["kind"] == "mc":
            score, ci, norm, chance = s["acc"], s["acc_ci95"], _pct(s["acc_norm"]), s["chance"]
            name = "acc"
        else:
            score, ci, norm, chance = s["exact_match"], s["exact_match_ci95"], "-", None
            name = f"EM (F1 {_pct(s['f1'])})"
        rows.append(
            f"| {s['task']} | {s['form']} | {s['shots']} | {s['n']} | {_pct(score)} {name} | "
            f"{_pct(ci[0])}-{_pct(ci[1])} | {norm} | {'-' if chance is None else _pct(chance)} |"
        )
    return "\n".join(rows)


def subject_table(summary: dict) -> str:
    rows = ["| subject | n | score |", "|---|---|---|"]
    rows += [f"| {s} | {v['n']} | {_pct(v['score'])} |" for s, v in summary["per_subject"].items()]
    return "\n".join(rows)


def _cards(where: str) -> dict[str, dict]:
    """Report cards (by file stem) of a run directory, an eval folder, an HF folder or a GGUF."""
    p = Path(where)
    for folder in (p / "eval", p, Path(f"{p}.eval")):
        cards = sorted(folder.glob("*.json")) if folder.is_dir() else []
        found = {}
        for c in cards:
            try:
                data = json.loads(c.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(data, dict) and {"summary", "records"} <= data.keys():
                found[c.stem] = data
        if found:
            return found
    raise AzllmError(
        f"--compare {where}: no report cards (eval/<task>.json); run "
        f"`azllm eval --run {where} --tasks ...` first"
    )


def _pairs(ca: dict[str, dict], cb: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(row name, card of A, card of B): the same card names, then cards of the same task in
    different forms (a base run's az-basic-mc against its SFT run's az-basic-mc-chat)."""
    pairs = [(s, s, s) for s in sorted(ca.keys() & cb.keys())]
    done = {s for s, _, _ in pairs}

    def by_task(cards: dict) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for stem, card in cards.items():
            if stem not in done:
                out.setdefault(card["summary"].get("task", stem), []).append(stem)
        return out

    ta, tb = by_task(ca), by_task(cb)
    for task in sorted(ta.keys() & tb.keys()):
        if len(ta[task]) == len(tb[task]) == 1:
            fa, fb = (c[ta[task][0] if c is ca else tb[task][0]]["summary"] for c in (ca, cb))
            pairs.append(
                (f"{task} ({fa.get('form')} / {fb.get('form')})", ta[task][0], tb[task][0])
            )
    return pairs


def compare(a: str, b: str) -> list[dict]:
    """Side by side: each task both have, on the questions both answered."""
    ca, cb = _cards(a), _cards(b)
    pairs = _pairs(ca, cb)
    if not pairs:
        raise AzllmError(
            f"--compare: {a} and {b} have no task in common ({sorted(ca)} / {sorted(cb)})"
        )
    out = []
    for name, sa, sb in pairs:
        ra = {r["id"]: bool(r["correct"]) for r in ca[sa]["records"]}
        rb = {r["id"]: bool(r["correct"]) for r in cb[sb]["records"]}
        ids = sorted(ra.keys() & rb.keys())
        n = len(ids)
        only_a = sum(ra[i] and not rb[i] for i in ids)
        only_b = sum(rb[i] and not ra[i] for i in ids)
        acc_a = sum(ra[i] for i in ids) / n if n else 0.0
        acc_b = sum(rb[i] for i in ids) / n if n else 0.0
        p = mcnemar_p(only_a, only_b)
        out.append(
            {
                "task": name,
                "n": n,
                "a": acc_a,
                "b": acc_b,
                "diff": acc_b - acc_a,
                "only_a": only_a,
                "only_b": only_b,
                "p_value": p,
                "exceeds_noise": p < 0.05,
            }
        )
    return out


def compare_runs(runs: list[str]) -> list[dict]:
    """`--compare A B C ...`: each later run against the first (the baseline), as compare()
    does for two; every row also names its pair (`a_run`, `b_run`)."""
    if len(runs) < 2:
        raise AzllmError(
            f"--compare {' '.join(runs)}: needs at least two evaluated runs (A B ...); "
            "each is compared with the first"
        )
    return [{**r, "a_run": runs[0], "b_run": b} for b in runs[1:] for r in compare(runs[0], b)]


def _label(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"R{i + 1}"


def compare_markdown(runs: list[str], rows: list[dict]) -> str:
    """The runs side by side: one row per task; per later run its accuracy, the difference from
    the first, the discordant questions, McNemar's p and whether the difference beats noise."""
    others = runs[1:]
    head = ["task", "n", "A"]
    for i in range(1, len(runs)):
        x = _label(i)
        head += [x, f"{x} - A", "only A right", f"only {x} right", "McNemar p", "beyond noise"]
    lines = [*(f"{_label(i)} = {r}" for i, r in enumerate(runs)), ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        mine = {r["b_run"]: r for r in rows if r["task"] == task}
        ns = list(dict.fromkeys(str(r["n"]) for r in mine.values()))
        accs = list(dict.fromkeys(_pct(r["a"]) for r in mine.values()))
        cells = [task, "/".join(ns), "/".join(accs)]  # several values: pairs saw other questions
        for b in others:
            r = mine.get(b)
            if r is None:
                cells += ["-"] * 6
                continue
            cells += [
                _pct(r["b"]),
                f"{100 * r['diff']:+.1f}",
                str(r["only_a"]),
                str(r["only_b"]),
                f"{r['p_value']:.3g}",
                "yes" if r["exceeds_noise"] else "no",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
