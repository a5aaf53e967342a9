"""Preference pairs: read in the forms Hugging Face TRL reads, tokenized with the chat template,
batched as a `batch.BatchSource` for `azllm dpo` (chat.dpo).

One JSON object per line:
- {"prompt": "..." or [messages], "chosen": ..., "rejected": ...}
- {"messages": [messages], "chosen": ..., "rejected": ...}   ("messages" = the prompt)
- {"chosen": [messages], "rejected": [messages]}             (prompt = their common start)
where chosen/rejected are a string (one assistant reply) or a list of assistant messages. Each
side is chat-templated (tokenizer.encode_chat) and trained on its completion tokens only.
Problems are reported as file:line and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from azllm.batch import Batch, in_val, step_generator
from azllm.chat.data import read_records, to_messages
from azllm.errors import AzllmError
from azllm.tokenizer import AzTokenizer

# ---- reading pairs --------------------------------------------------------------------------


def _side(value: object, name: str, where: str) -> list[dict]:
    """chosen/rejected as a list of messages (a string is one assistant reply)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value:
        return value
    raise AzllmError(f'{where}: "{name}" must be a string or a non-empty list of messages')


def to_pair(record: object, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """One record -> (prompt messages, chosen completion, rejected completion), validated."""
    if not isinstance(record, dict):
        raise AzllmError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in ("chosen", "rejected"):
        if name not in record:
            raise AzllmError(
                f'{where}: no "{name}" field; a pair needs "prompt" (or "messages"), '
                f'"chosen" and "rejected"; keys are {sorted(record)[:6]}'
            )
    chosen = _side(record["chosen"], "chosen", where)
    rejected = _side(record["rejected"], "rejected", where)
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is None:  # implicit prompt: the messages both sides start with
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while (
            n > 0 and isinstance(chosen[n - 1], dict) and chosen[n - 1].get("role") == ("assistant")
        ):
            n -= 1  # a shared first reply belongs to the completions, not the prompt
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not isinstance(prompt, list) or not prompt:
        raise AzllmError(f'{where}: "prompt" must be a string or a non-empty list of messages')
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in side):
            raise AzllmError(f'{where}: "{name}" must be assistant messages (the completion)')
    # the whole conversation goes through the chat reader's checks (roles, contents, system)
    prompt_n = len(prompt)
    chosen = to_messages({"messages": prompt + chosen}, where)[prompt_n:]
    rejected = to_messages({"messages": prompt + rejected}, where)[prompt_n:]
    prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if chosen == rejected:
        raise AzllmError(
            f"{where}: chosen and rejected are identical; a pair needs two different answers"
        )
    return prompt, chosen, rejected


def load_pairs(paths: list) -> list[tuple[list[dict], list[dict], list[dict]]]:
    return read_records(paths, to_pair, "preference pairs")


# ---- the batch source -----------------------------------------------------------------------


def _encode(tok: AzTokenizer, prompt: list[dict], completion: list[dict], block: int):
    """(inputs, targets, cut): targets are -1 except on the completion's trained tokens."""
    n_prompt = len(tok.encode_chat(prompt)[0])
    ids, mask = tok.encode_chat(prompt + completion)
    mask = [m and i >= n_prompt for i, m in enumerate(mask)]
    cut = len(ids) > block + 1
    ids, mask = ids[: block + 1], mask[: block + 1]
    return ids[:-1], [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)], cut


class PairBatches:
    """Preference pairs as a `batch.BatchSource`. A row is one pair: inputs/targets [rows, 2, T]
    (chosen, rejected), T the longest sequence of the split; ref_logps [rows, 2] once the
    reference is set (`set_reference`). The split is by prompt (several pairs of one prompt,
    as `azllm pairs` makes, never straddle train and held-out). Training rows are dealt in
    shuffled epochs drawn from (seed, split, epoch) alone, as ChatBatches does; held-out rows
    in file order, so eval_batches x rows >= count covers them all."""

    def __init__(
        self,
        pairs: list[tuple[list[dict], list[dict], list[dict]]],
        tok: AzTokenizer,
        tokenizer_path: Path,
        block_size: int,
        seed: int,
        val_fraction: float = 0.1,
        label: str = "pairs",
    ) -> None:
        self.tokenizer_path, self.block_size, self.seed = Path(tokenizer_path), block_size, seed
        self.label = label
        self.pairs: dict[str, list] = {"train": [], "val": []}
        self.bytes = {"train": 0, "val": 0}
        self.truncated = self.dropped = 0
        for prompt, chosen, rejected in pairs:
            c_ids, c_tg, c_cut = _encode(tok, prompt, chosen, block_size)
            r_ids, r_tg, r_cut = _encode(tok, prompt, rejected, block_size)
            self.truncated += c_cut or r_cut
            if all(t == -1 for t in c_tg) or all(t == -1 for t in r_tg):
                self.dropped += 1  # a completion wholly beyond the context: nothing to compare
                continue
            key = json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode("utf-8")
            split = "val" if in_val(key, val_fraction) else "train"
            self.pairs[split].append(((c_ids, c_tg), (r_ids, r_tg)))
            self.bytes[split] += sum(len(m["content"].encode()) for m in chosen + rejected)
        if not self.pairs["train"]:
            raise AzllmError(f"{label}: no pair fits the context of {block_size} tokens")
        self.width = {
            s: max((len(x) for pair in ps for x, _ in pair), default=1)
            for s, ps in self.pairs.items()
        }
        self.ref: dict[str, torch.Tensor | None] = {"train": None, "val": None}
        self.pad_id = tok.pad_id
        self.meta = {"tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size}

    def has_split(self, split: str) -> bool:
        return bool(self.pairs[split])

    def count(self, split: str) -> int:
        return len(self.pairs[split])

    def bytes_per_token(self, split: str) -> float:
        tokens = sum(sum(t != -1 for t in y) for pair in self.pairs[split] for _, y in pair)
        return self.bytes[split] / max(tokens, 1)

    def digest(self) -> str:
        """A hash of the tokenized pairs and their split (so of the data and the tokenizer)."""
        h = hashlib.sha256(self.meta["tokenizer_sha256"].encode())
        for split in ("train", "val"):
            h.update(json.dumps([split, self.pairs[split]]).encode())
        return h.hexdigest()

    def set_reference(self, ref: dict[str, torch.Tensor]) -> None:
        for split, t in ref.items():
            if t.shape != (self.count(split), 2):
                raise ValueError(f"reference log-probs of {split}: shape {tuple(t.shape)}")
            self.ref[split] = t

    def batch(self, split: str, key: int, n: int, rows: slice | None = None) -> Batch:
        total = self.count(split)
        if split == "val":
            picks = [i % total for i in range(key * n, key * n + n)]
        else:
            picks, perms = [], {}
            for i in range(key * n, key * n + n):
                epoch = i // total
                if epoch not in perms:
                    g = step_generator(self.seed, split, f"epoch{epoch}")
                    perms[epoch] = torch.randperm(total, generator=g).tolist()
                picks.append(perms[epoch][i % total])
        return self.take(split, picks[rows] if rows is not None else picks)

    def take(self, split: str, picks: list[int]) -> Batch:
        t = self.width[split]
        x = torch.full((len(picks), 2, t), self.pad_id, dtype=torch.long)
        y = torch.full((len(picks), 2, t), -1, dtype=torch.long)
        for r, i in enumerate(picks):
            for side, (ids, targets) in enumerate(self.pairs[split][i]):
                x[r, side, : len(ids)] = torch.tensor(ids)
                y[r, side, : len(targets)] = torch.tensor(targets)
        ref = self.ref[split]
        return Batch(x, y, ref_logps=ref[picks] if ref is not None else None)
