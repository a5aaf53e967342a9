"""Evidence for retrieval on a question set: recall@k of the index, and answer exact match / F1
with and without retrieval through the evaluation harness (azllm/evaluate/harness.py).

Questions are short-answer QA records (`{"question", "answers": [...], "source"}`, the bundled
set is azllm/data/rag/questions.jsonl). A question is recalled at k when one of its top k chunks
comes from its `source` document and contains one of its answers (Azerbaijani-cased).

With retrieval, the harness scores the same questions with the sources in the prompt: in the
chat form through `RagBackend`, whose `chat_ids` adds the system turn with sources exactly as
`azllm chat --rag` and `serve --rag` do (prompt.add_sources); in the base form as the harness's
own passage ("Mətn: ...\\nSual: ...\\nCavab:"), the numbered sources being the passage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from azllm.rag.index import Index
from azllm.rag.normalise import az_lower
from azllm.rag.prompt import add_sources, retrieve

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "rag"


def recall_at_k(index: Index, questions: list[dict], ks: tuple[int, ...] = (1, 3, 5)) -> dict:
    """{k: share of questions whose answer is in one of their top-k chunks from their source}."""
    top = max(ks)
    found = {k: 0 for k in ks}
    for q in questions:
        hits = index.search(q["question"], top)
        answers = [az_lower(a) for a in q["answers"]]
        rank = next(
            (
                i
                for i, h in enumerate(hits)
                if Path(h.source).name == q["source"]
                and any(a in az_lower(h.text) for a in answers)
            ),
            None,
        )
        for k in ks:
            found[k] += rank is not None and rank < k
    return {k: found[k] / len(questions) for k in ks}


class RagBackend:
    """A harness backend (RunBackend: it needs the model's AzTokenizer) whose chat prompts get
    the retrieved sources, searched on the last user message; everything else is the inner
    backend's."""

    def __init__(self, inner, index: Index, k: int, reply_room: int) -> None:
        self.inner, self.index, self.k = inner, index, k
        self.budget = inner.block_size - reply_room

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        hits = retrieve(self.index, messages, self.k)
        messages, _ = add_sources(self.inner.tok, messages, hits, self.budget)
        return self.inner.chat_ids(messages)


def with_passages(task, index: Index, k: int):
    """The task with each question's top-k chunks as its passage (the base form's "Mətn:")."""

    def one(it):
        hits = index.search(it.question, k)
        text = "\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, 1))
        return dataclasses.replace(it, passage=text or None)

    return dataclasses.replace(task, test=[one(it) for it in task.test])


def qa_scores(backend, task, index: Index | None, *, k: int, chat: bool) -> dict:
    """Mean exact match and F1 of the task's questions, with retrieval when index is given."""
    from azllm.evaluate.harness import QA_MAX_NEW, run_task

    if index is not None:
        if chat:
            backend = RagBackend(backend, index, k, QA_MAX_NEW)
        else:
            task = with_passages(task, index, k)
    records = run_task(backend, task, chat=chat)
    n = len(records)
    return {
        "exact_match": sum(r["exact_match"] for r in records) / n,
        "f1": sum(r["f1"] for r in records) / n,
        "n": n,
        "examples": [(r["gold"][0], r["output"]) for r in records[:3]],
    }
