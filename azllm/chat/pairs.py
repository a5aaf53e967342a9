"""Preference pairs from what a user has: an SFT set and a model (self-play, as in SPIN).

    azllm pairs --run RUN --data CHAT.jsonl --out PAIRS.jsonl --samples 2 --max-similarity 0.9

For each conversation the prompt is everything before its last assistant turn; the reference
answer (that turn) is "chosen" and each of the model's own sampled answers is "rejected". A
sample too close to the reference (word-level similarity >= max_similarity) is dropped: the
pair would teach the model to avoid an answer as good as the reference. Identical samples of one
prompt are written once. The output is in TRL's conversational form, read by `azllm dpo`:
    {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...], ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path

from azllm.atomic import atomic_write_text
from azllm.chat.data import load_conversations
from azllm.errors import AzllmError
from azllm.sampling import SamplingSettings


def similarity(reference: str, sample: str) -> float:
    """Word-level Ratcliff/Obershelp ratio in [0, 1] (1 = the same words in the same order),
    on words as answers are compared (evaluate.harness.normalize: Azerbaijani I/ı İ/i case,
    no punctuation). Words, not characters: answers sharing most letters but few words differ."""
    from azllm.evaluate.harness import normalize

    a, b = normalize(reference).split(), normalize(sample).split()
    if not a and not b:
        return 1.0
    return SequenceMatcher(None, a, b, autojunk=False).ratio()


@dataclass
class PairStats:
    prompts: int = 0
    no_prompt: int = 0  # conversations that open with the assistant's turn
    too_long: int = 0  # prompts that leave no room in the context for an answer
    sampled: int = 0
    too_similar: int = 0
    duplicates: int = 0
    written: int = 0


def _check(samples: int, max_similarity: float, sampling: SamplingSettings) -> SamplingSettings:
    if samples < 1:
        raise AzllmError(f"--samples must be an integer >= 1, got {samples}")
    if not 0 < max_similarity <= 1:
        raise AzllmError(f"--max-similarity must be in (0, 1], got {max_similarity}")
    return sampling.check("--")


def split_prompt(messages: list[dict]) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def make_pairs(
    model,
    tok,
    conversations: list[list[dict]],
    *,
    samples: int = 2,
    max_similarity: float = 0.9,
    sampling: SamplingSettings | None = None,
    precision: str = "fp32",
    batch_size: int = 16,
) -> tuple[list[dict], PairStats]:
    """Pair records (in conversation order, samples in drawing order) and what was dropped.

    Each batch of prompts draws with its own seed (sampling.seed + batch number) when a seed is
    given, so the same command writes the same file."""
    from azllm.generate import generate

    sampling = _check(samples, max_similarity, sampling or SamplingSettings())
    stats = PairStats()
    todo = []  # (prompt messages, reference, prompt ids)
    for messages in conversations:
        prompt, reference = split_prompt(messages)
        stats.prompts += 1
        if not prompt:  # an assistant turn first: no question to answer
            stats.no_prompt += 1
            continue
        ids = tok.encode_chat(prompt, add_generation_prompt=True)[0]
        if len(ids) >= model.cfg.block_size:
            stats.too_long += 1
            continue
        todo.append((prompt, reference, ids))
    records = []
    per_batch = max(1, batch_size // samples)
    for n, start in enumerate(range(0, len(todo), per_batch)):
        chunk = todo[start : start + per_batch]
        seed = None if sampling.seed is None else sampling.seed + n
        outs = generate(
            model,
            [ids for _, _, ids in chunk for _ in range(samples)],
            sampling.override(seed=seed),
            eos_id=tok.end_id,  # a reply ends at <|end|>
            pad_id=tok.pad_id,
            precision=precision,
        )
        for i, (prompt, reference, _) in enumerate(chunk):
            seen = set()
            for out in outs[i * samples : (i + 1) * samples]:
                stats.sampled += 1
                text = tok.decode(out).strip()
                sim = similarity(reference, text)
                if sim >= max_similarity:
                    stats.too_similar += 1
                    continue
                if text in seen:
                    stats.duplicates += 1
                    continue
                seen.add(text)
                records.append(
                    {
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": reference}],
                        "rejected": [{"role": "assistant", "content": text}],
                        "similarity": round(sim, 4),
                    }
                )
    stats.written = len(records)
    return records, stats


def pairs_command(
    run: Path,
    data: list,
    out: Path,
    *,
    samples: int,
    max_similarity: float,
    sampling: SamplingSettings,
    device: str = "auto",
    precision: str = "fp32",
    weights: str = "model",
    batch_size: int = 16,
    force: bool = False,
) -> PairStats:
    from azllm.checkpoint import load_run
    from azllm.device import resolve_device, resolve_precision

    _check(samples, max_similarity, sampling)  # before the model loads
    out = Path(out)
    if out.exists() and not force:
        raise AzllmError(f"--out {out}: already exists; pass --force to replace it")
    conversations = load_conversations(data)  # bad files fail before the model loads
    dev = resolve_device(device)
    model, tok, _ = load_run(Path(run), dev, weights)
    records, stats = make_pairs(
        model,
        tok,
        conversations,
        samples=samples,
        max_similarity=max_similarity,
        sampling=sampling,
        precision=resolve_precision(precision, dev),
        batch_size=batch_size,
    )
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(out, text)
    return stats
