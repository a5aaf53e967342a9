"""Scoring one task on one backend: prompts, predictions, per-question records, metrics.

Base form (pretrained models), as lm-evaluation-harness scores multiple choice:
    [shots: "Sual: Q\\nCavab: A" joined by blank lines, then a blank line]
    "Sual: {question}\\nCavab:" + " {choice}"      (Belebele: "Mətn: {passage}\\n" first)
Each choice's log-likelihood given the prompt; `acc` takes the largest, `acc_norm` divides by
the choice's length in characters (lm-eval's acc_norm), `acc_bytes` by its UTF-8 bytes (lm-eval's
acc_bytes; for Azerbaijani, where ə, ş, ı... are two bytes, the two differ). Tokenized as lm-eval
does: ids(prompt) and ids(prompt + continuation)[len(ids(prompt)):], the prompt cut from the left
when prompt + continuation exceed the context.

Chat form (SFT models): the question and lettered choices are a user turn (the shots are earlier
turns answered with their letter); the answer is the letter the model ranks first.

QA: greedy answers (base: after "Cavab:", up to the line's end; chat: the assistant's reply),
exact match and token F1 against the references after normalisation (Azerbaijani casing).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path

from azllm.evaluate.tasks import LETTERS, Item, Task, shots_for

CHAT_INSTRUCTION = "Düzgün cavabın hərfini yazın."
QA_MAX_NEW = 24


def _base_prompt(it: Item) -> str:
    head = f"Mətn: {it.passage}\n" if it.passage else ""
    return f"{head}Sual: {it.question}\nCavab:"


def lm_eval_task_yaml(name: str, test: str | Path, dev: str | Path) -> str:
    """lm-evaluation-harness's definition of the same multiple-choice task (same prompt, shots,
    delimiters), for a local `--include_path`: the agreement test and bench/eval_speed.py use it."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
doc_to_text: "Sual: {{{{question}}}}\\nCavab:"
doc_to_choice: choices
doc_to_target: "{{{{['A','B','C','D'].index(answer)}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _target(it: Item) -> str:
    return it.choices[it.gold] if it.choices else it.answers[0]


def base_context(it: Item, shots: list[Item]) -> str:
    done = "".join(f"{_base_prompt(s)} {_target(s)}\n\n" for s in shots)
    return done + _base_prompt(it)


def chat_question(it: Item) -> str:
    head = f"{it.passage}\n\n" if it.passage else ""
    lines = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(it.choices))
    return f"{head}{it.question}\n{lines}\n{CHAT_INSTRUCTION}"


def chat_messages(it: Item, shots: list[Item]) -> list[dict]:
    msgs = []
    for s in shots:
        q = chat_question(s) if s.choices else s.question
        a = LETTERS[s.gold] if s.choices else s.answers[0]
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    q = chat_question(it) if it.choices else it.question
    return msgs + [{"role": "user", "content": q}]


def prompt_text(task: Task, it: Item, shots: int, chat: bool) -> str:
    """The prompt as text, for the per-question records (chat: the template written out)."""
    from azllm.tokenizer import render_chat

    sh = shots_for(it, task.dev, shots)
    if chat:
        return render_chat(chat_messages(it, sh), add_generation_prompt=True)
    return base_context(it, sh)


def encode_pair(backend, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context go to the continuation; the continuation's
    ids are those of the whole after the context's."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = backend.encode(context + continuation), backend.encode(context)
    return ctx, whole[len(ctx) :]


def fit(ctx: list[int], cont: list[int], block: int) -> list[int]:
    """The context, cut from the left so that context + continuation - 1 fits the model."""
    keep = block + 1 - len(cont)
    return ctx[-keep:] if len(ctx) > keep else ctx


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first of equals, as numpy's argmax


def _mc_requests(backend, task: Task, it: Item, shots: int, chat: bool) -> list[tuple]:
    """(context ids, continuation ids) per choice of one question."""
    sh = shots_for(it, task.dev, shots)
    if chat:
        ctx = backend.chat_ids(chat_messages(it, sh))
        pairs = [(ctx, backend.encode(LETTERS[i])) for i in range(len(it.choices))]
    else:
        context = base_context(it, sh)
        pairs = [encode_pair(backend, context, " " + c) for c in it.choices]
    return [(fit(x, c, backend.block_size), c) for x, c in pairs]


def _mc_loglikelihoods(backend, requests: list[list[tuple]]) -> list[list[float]]:
    """Each question's choice log-likelihoods, one group per distinct context (all of a
    question's choices share one, unless cutting to the context split them)."""
    groups: list[tuple[list[int], list[list[int]]]] = []
    where = []
    for q, reqs in enumerate(requests):
        by_ctx: dict[tuple, int] = {}
        for k, (ctx, cont) in enumerate(reqs):
            g = by_ctx.setdefault(tuple(ctx), len(groups))
            if g == len(groups):
                groups.append((ctx, []))
            where.append((q, k, g, len(groups[g][1])))
            groups[g][1].append(cont)
    scores = backend.loglikelihood(groups)
    lls = [[0.0] * len(r) for r in requests]
    for q, k, g, j in where:
        lls[q][k] = scores[g][j][0]
    return lls


def score_mc(backend, task: Task, items: list[Item], shots: int, chat: bool, bar=None) -> list:
    """Per-question records of a multiple-choice task, 32 questions per backend call."""
    records = []
    for i in range(0, len(items), 32):
        chunk = items[i : i + 32]
        requests = [_mc_requests(backend, task, it, shots, chat) for it in chunk]
        for it, ll, reqs in zip(
            chunk, _mc_loglikelihoods(backend, requests), requests, strict=True
        ):
            chars = [len(c) for c in it.choices]
            nbytes = [len(c.encode("utf-8")) for c in it.choices]
            pred = _argmax(ll)
            # chat form: every continuation is one letter, so normalising changes nothing
            pred_norm = pred if chat else _argmax([v / n for v, n in zip(ll, chars, strict=True)])
            pred_bytes = pred if chat else _argmax([v / n for v, n in zip(ll, nbytes, strict=True)])
            records.append(
                {
                    "id": it.id,
                    "subject": it.subject,
                    "prompt": prompt_text(task, it, shots, chat),
                    "prompt_tokens": len(reqs[0][0]),
                    "choice_logprobs": ll,
                    "pred": pred,
                    "pred_norm": pred_norm,
                    "pred_bytes": pred_bytes,
                    "gold": it.gold,
                    "correct": pred == it.gold,
                    "correct_norm": pred_norm == it.gold,
                    "correct_bytes": pred_bytes == it.gold,
                    "n_choices": len(it.choices),
                }
            )
        if bar is not None:
            bar.update(len(chunk))
    return records


def normalize(text: str) -> str:
    """Casefold with Azerbaijani I/ı, İ/i; drop punctuation and symbols; collapse spaces."""
    text = unicodedata.normalize("NFC", text).replace("I", "ı").replace("İ", "i").lower()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or not common:
        return float(p == r)
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def score_qa(backend, task: Task, items: list[Item], shots: int, chat: bool, bar=None) -> list:
    prompts = []
    for it in items:
        sh = shots_for(it, task.dev, shots)
        if chat:
            ids = backend.chat_ids(chat_messages(it, sh))
        else:
            ids = backend.encode(base_context(it, sh))
        prompts.append(ids[-(backend.block_size - QA_MAX_NEW) :])
    records = []
    step = 32
    for i in range(0, len(prompts), step):
        outs = backend.greedy(prompts[i : i + step], QA_MAX_NEW)
        for it, p, out in zip(items[i : i + step], prompts[i : i + step], outs, strict=True):
            text = backend.decode(out)
            answer = text if chat else text.split("\n")[0]
            answer = answer.strip()
            em = max(float(normalize(answer) == normalize(a)) for a in it.answers)
            f1 = max(token_f1(answer, a) for a in it.answers)
            records.append(
                {
                    "id": it.id,
                    "subject": it.subject,
                    "prompt": prompt_text(task, it, shots, chat),
                    "prompt_tokens": len(p),
                    "output": answer,
                    "gold": it.answers,
                    "exact_match": em,
                    "f1": f1,
                    "correct": em == 1.0,
                }
            )
        if bar is not None:
            bar.update(len(outs))
    return records


def run_task(
    backend,
    task: Task,
    *,
    shots: int = 0,
    chat: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Per-question records of `task` (its first `limit` test questions)."""
    from tqdm import tqdm

    from azllm.errors import AzllmError

    if shots and not task.dev:
        raise AzllmError(
            f"--shots {shots}: task {task.name} ({task.source}) has no dev split to take them "
            "from; put dev/ beside test/ or use --shots 0"
        )
    items = task.test[:limit] if limit else task.test
    bar = tqdm(total=len(items), desc=task.name, unit="q", disable=not progress, leave=False)
    try:
        score = score_mc if task.kind == "mc" else score_qa
        return score(backend, task, items, shots, chat, bar)
    finally:
        bar.close()


def evaluate_tasks(
    backend,
    specs: list[str],
    *,
    model: str,
    shots: int = 0,
    chat: bool = False,
    limit: int | None = None,
    out_dir=None,
    progress: bool = False,
) -> list[dict]:
    """Summaries of every task named in `specs`; with out_dir, each task's report card is
    written there as <task>.json (summary + per-question records) and report.md."""
    from pathlib import Path

    from azllm.atomic import atomic_write_text
    from azllm.evaluate.report import markdown, summarize, write_card
    from azllm.evaluate.tasks import load_tasks

    tasks = [t for spec in specs for t in load_tasks(spec)]  # every file checked before scoring
    form = "chat" if chat else "base"
    summaries = []
    for task in tasks:
        records = run_task(backend, task, shots=shots, chat=chat, limit=limit, progress=progress)
        summary = summarize(task, records, model=model, form=form, shots=shots)
        if out_dir is not None:
            summary["records_file"] = str(write_card(Path(out_dir), summary, records))
        summaries.append(summary)
    if out_dir is not None:
        atomic_write_text(Path(out_dir) / "report.md", markdown(summaries) + "\n")
    return summaries
