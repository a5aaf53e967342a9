"""Chat data: conversations from JSONL, validated, tokenized with the chat template, batched.

Accepted records (one JSON object per line; files or folders of *.jsonl):
- {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}  (multi-turn)
- Alpaca: {"instruction": ..., "input": ... (optional), "output": ...}
- DialogSum: {"dialogue": ..., "summary": ...}  -> "summarise this dialogue" / summary
Problems are reported as file:line and what is wrong.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import torch

from azllm.batch import Batch, in_val, step_generator
from azllm.documents import jsonl_records
from azllm.errors import AzllmError
from azllm.tokenizer import CHAT_ROLES, AzTokenizer

SUMMARY_PROMPT = "Bu dialoqun qısa xülasəsini yaz:\n\n"


def to_messages(record: object, where: str) -> list[dict]:
    """One record in any accepted shape -> a validated list of messages."""
    if not isinstance(record, dict):
        raise AzllmError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "instruction" in record and "output" in record:
        prompt = str(record["instruction"]).strip()
        if str(record.get("input") or "").strip():
            prompt += "\n\n" + str(record["input"]).strip()
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": str(record["output"])},
        ]
    elif "dialogue" in record and "summary" in record:
        messages = [
            {"role": "user", "content": SUMMARY_PROMPT + str(record["dialogue"])},
            {"role": "assistant", "content": str(record["summary"])},
        ]
    else:
        raise AzllmError(
            f'{where}: no "messages" field (nor Alpaca instruction/output, nor '
            f"DialogSum dialogue/summary); keys are {sorted(record)[:6]}"
        )
    if not isinstance(messages, list) or not messages:
        raise AzllmError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise AzllmError(f'{where}: messages[{i}] needs a string "content"')
        if m.get("role") not in CHAT_ROLES:
            raise AzllmError(
                f"{where}: messages[{i}].role {m.get('role')!r} is not one of "
                f"{', '.join(CHAT_ROLES)}"
            )
        if m["role"] == "system" and i != 0:
            raise AzllmError(f"{where}: messages[{i}]: a system message may only come first")
    if not any(m["role"] == "assistant" for m in messages):
        raise AzllmError(f"{where}: no assistant message, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def jsonl_files(paths: list[str | Path]) -> list[Path]:
    """The files named by --data: files as given, folders as their .jsonl files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.rglob("*.jsonl"))
            if not found:
                raise AzllmError(f"{p}: folder has no .jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise AzllmError(f"--data {p}: no such file or folder")
    return files


def read_records(paths: list[str | Path], parse, what: str) -> list:
    """parse(record, "file:line") of every JSONL record in the --data files; `what` names them
    in the error when there are none."""
    out = []
    for f in jsonl_files(paths):
        try:
            lines = f.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise AzllmError(f"{f}: not UTF-8 text; convert it to UTF-8") from None
        for n, record in jsonl_records(lines, f):
            out.append(parse(record, f"{f}:{n}"))
    if not out:
        raise AzllmError(f"no {what} in {', '.join(map(str, paths))}")
    return out


def load_conversations(paths: list[str | Path]) -> list[list[dict]]:
    return read_records(paths, to_messages, "conversations")


def is_val(messages: list[dict], val_fraction: float) -> bool:
    """batch.in_val over the conversation's canonical JSON."""
    key = json.dumps(messages, ensure_ascii=False, sort_keys=True).encode("utf-8")
    return in_val(key, val_fraction)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of items grouped into rows of at most `capacity` positions.

    Longest first, each into the open row it fills most tightly (else a new row). Unlike filling
    rows in file order, which leaves about half a conversation of padding at every row end, this
    wastes almost nothing; it is deterministic (ties keep file order), and O(n log n).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []  # sorted distinct free capacities that some open row has
    by_free: dict[int, list[int]] = {}  # free capacity -> rows with exactly that much room
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, n)
        if at < len(free):
            room = free[at]
            r = by_free[room].pop()
            if not by_free[room]:
                del by_free[room], free[at]
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        left = room - n
        if left > 0:
            if left not in by_free:
                bisect.insort(free, left)
                by_free[left] = []
            by_free[left].append(r)
    return rows


class ChatBatches:
    """Conversations as rows of block_size: inputs, and targets that are -1 except on the
    assistant's tokens. A `batch.BatchSource`, so the pretraining loop trains on it.

    Rows are dealt in epochs: step k takes rows k*n .. k*n+n-1 of an endless sequence of
    shuffled passes, each pass a permutation drawn from (seed, split, pass number) alone. Every
    row is seen once per epoch (drawing with replacement left ~5% unseen after 3 "epochs"), and
    a resumed run or K processes still see exactly what one uninterrupted process would.

    pack=False: one conversation per row, the rest padding; batches have no segments.
    pack=True: several conversations per row (see pack_rows); batches carry segment ids, and
    the model keeps each conversation to itself (GPT.forward(segments=...)), so the loss on a
    packed row is the loss of its conversations run alone.
    """

    def __init__(
        self,
        conversations: list[list[dict]],
        tok: AzTokenizer,
        tokenizer_path: Path,
        block_size: int,
        seed: int,
        val_fraction: float = 0.1,
        label: str = "chat",
        pack: bool = True,
    ) -> None:
        self.tokenizer_path, self.block_size, self.seed = Path(tokenizer_path), block_size, seed
        self.label, self.pack = label, pack
        # Each conversation as (inputs, targets) = (ids[:-1], ids[1:] masked), so in a packed row
        # no target ever crosses into the next conversation.
        self.convs: dict[str, list[tuple[list[int], list[int]]]] = {"train": [], "val": []}
        self.bytes = {"train": 0, "val": 0}
        self.truncated = 0
        for messages in conversations:
            ids, mask = tok.encode_chat(messages)
            if len(ids) > block_size + 1:
                ids, mask = ids[: block_size + 1], mask[: block_size + 1]
                self.truncated += 1
            targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
            if all(t == -1 for t in targets):  # the reply fell beyond the context: nothing to learn
                continue
            split = "val" if is_val(messages, val_fraction) else "train"
            self.convs[split].append((ids[:-1], targets))
            self.bytes[split] += sum(
                len(m["content"].encode()) for m in messages if m["role"] == "assistant"
            )
        if not self.convs["train"]:
            raise AzllmError(f"{label}: no conversation fits the context of {block_size} tokens")
        # rows[split]: the conversations (indices into convs) that share each row.
        self.rows = {
            split: pack_rows([len(x) for x, _ in convs], block_size)
            if pack
            else [[i] for i in range(len(convs))]
            for split, convs in self.convs.items()
        }
        self.pad_id = tok.pad_id
        self.meta = {"tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size}

    def has_split(self, split: str) -> bool:
        return bool(self.convs[split])

    def count(self, split: str) -> int:
        """Conversations in the split (rows: len(self.rows[split]))."""
        return len(self.convs[split])

    def trained_tokens(self, split: str) -> int:
        return sum(sum(t != -1 for t in y) for _, y in self.convs[split])

    def bytes_per_token(self, split: str) -> float:
        """UTF-8 bytes of assistant text per trained token (for bits per byte of replies)."""
        return self.bytes[split] / max(self.trained_tokens(split), 1)

    def input_tokens(self, split: str) -> int:
        """Real (non-padding) input positions of the split."""
        return sum(len(x) for x, _ in self.convs[split])

    def padding_fraction(self, split: str) -> float:
        """Share of the split's input positions (rows x block_size) that are padding."""
        total = len(self.rows[split]) * self.block_size
        return 1 - self.input_tokens(split) / max(total, 1)

    def batch(self, split: str, key: int, n: int, rows: slice | None = None) -> Batch:
        total = len(self.rows[split])
        picks, perms = [], {}
        for i in range(key * n, key * n + n):
            epoch = i // total
            if epoch not in perms:
                g = step_generator(self.seed, split, f"epoch{epoch}")
                perms[epoch] = torch.randperm(total, generator=g).tolist()
            picks.append(perms[epoch][i % total])
        return self.take(split, picks[rows] if rows is not None else picks)

    def take(self, split: str, picks: list[int]) -> Batch:
        """Rows `picks` of the split (segment ids only when packed)."""
        x = torch.full((len(picks), self.block_size), self.pad_id, dtype=torch.long)
        y = torch.full((len(picks), self.block_size), -1, dtype=torch.long)
        seg = torch.zeros((len(picks), self.block_size), dtype=torch.long)
        for r, i in enumerate(picks):
            at = 0
            for s, c in enumerate(self.rows[split][i]):
                ids, targets = self.convs[split][c]
                x[r, at : at + len(ids)] = torch.tensor(ids)
                y[r, at : at + len(targets)] = torch.tensor(targets)
                seg[r, at : at + len(ids)] = s
                at += len(ids)
            seg[r, at:] = s + 1  # the padding at the row end is a segment of its own
        return Batch(x, y, seg if self.pack else None)
