"""Evaluation: bits per byte on text (text.py) and tasks (multiple choice, chat multiple choice,
generative QA) on a run directory, a Hugging Face folder or a GGUF file.

    text.py      loss, perplexity, bits per byte of a text (`azllm eval --text`)
    tasks.py     task files: TUMLU/MMLU JSONL, dev/ + test/ folders, Belebele, QA; az-basic
    backends.py  the three model forms behind one interface (log-likelihoods, greedy answers)
    harness.py   prompts, scoring, metrics of one task
    report.py    intervals, report cards (JSON, markdown), paired comparison of two runs

Only text.py is imported here: the task code loads on demand, so the core install (no
transformers, no llama.cpp) imports azllm.evaluate as before.
"""

from azllm.evaluate.text import evaluate_text, nll_of_ids, read_text_file, text_metrics

__all__ = ["evaluate_text", "nll_of_ids", "read_text_file", "text_metrics"]
