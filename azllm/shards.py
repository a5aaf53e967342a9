"""Token shards: text -> flat token files on disk (+ meta.json), and batches sampled from them.

Layout of a data folder (written atomically by `azllm tokenize`):
    DIR/meta.json          counts, bytes, dtype, the tokenizer's sha256
    DIR/tokenizer.json     a copy of the tokenizer the shards were made with
    DIR/train_000.bin ...  token ids (uint16, or uint32 for vocabularies over 65,536), documents
    DIR/val_000.bin ...    separated by EOS; read back with numpy.memmap

Each document goes to train or val by a hash of its text, so the split does not depend on input
order, worker count or earlier runs. Batches are a pure function of (seed, split, step): a resumed
run, or a run on K processes, sees exactly the sequences an uninterrupted single run would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from azllm.atomic import atomic_dir, atomic_write_text
from azllm.batch import Batch, in_val, step_generator
from azllm.documents import iter_documents, split_hint, text_files
from azllm.errors import AzllmError
from azllm.tokenizer import AzTokenizer

SHARD_FORMAT = "azllm-shards/1"


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.tokens = self.bytes = self.documents = 0

    def add(self, ids: list[int], n_bytes: int) -> None:
        if self.file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            if self.file is not None:
                self.file.close()
            name = f"{self.split}_{len(self.shards):03d}.bin"
            self.file = open(self.out / name, "wb")
            self.shards.append({"file": name, "tokens": 0})
        self.file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.shards[-1]["tokens"] += len(ids)
        self.tokens += len(ids)
        self.bytes += n_bytes
        self.documents += 1

    def close(self) -> dict:
        if self.file is not None:
            self.file.close()
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
            "shards": self.shards,
        }


def _encode_into(
    tok: AzTokenizer, batch: list[str], writers: dict, hint: str | None, val_fraction: float
) -> None:
    """Encode a batch of documents (Rust threads over all cores) and append each to its split."""
    for text, ids in zip(batch, tok.encode_batch(batch), strict=True):
        split = hint or ("val" if in_val(text.encode("utf-8"), val_fraction) else "train")
        writers[split].add(ids + [tok.eos_id], len(text.encode("utf-8")))
    batch.clear()


def tokenize_to_shards(
    tok: AzTokenizer,
    inputs: list[str | Path],
    out_dir: Path,
    *,
    val_fraction: float = 0.05,
    shard_tokens: int = 1 << 27,
    batch_docs: int = 1024,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Encode documents (in parallel, batch by batch) into train/val shards. Returns meta."""
    if not 0.0 <= val_fraction < 1.0:
        raise AzllmError(f"--val-fraction {val_fraction} must be in [0, 1)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise AzllmError(f"{out_dir}: output folder is not empty; pass --force to replace it")
    files = text_files(inputs)
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)

    from tqdm import tqdm

    with atomic_dir(out_dir, replace=True) as tmp:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        bar = tqdm(
            total=len(files), unit="file", desc="tokenize", disable=None if progress else True
        )
        for path in files:
            hint = split_hint(path)
            batch: list[str] = []
            for text in iter_documents(path):
                batch.append(text)
                if len(batch) >= batch_docs:
                    _encode_into(tok, batch, writers, hint, val_fraction)
            _encode_into(tok, batch, writers, hint, val_fraction)
            bar.update(1)
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
        if splits["train"]["tokens"] == 0:
            raise AzllmError("the corpus is empty: no documents found in the inputs")
        if val_fraction > 0 and splits["val"]["tokens"] == 0:
            raise AzllmError(
                f"no document fell into the validation split ({splits['train']['documents']} "
                "documents); raise --val-fraction or add more documents"
            )
        meta = {
            "format": SHARD_FORMAT,
            "tokenizer_sha256": tok.sha256(),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype.name,
            "val_fraction": val_fraction,
            "inputs": [str(f) for f in files],
            "splits": splits,
        }
        tok.save(tmp / "tokenizer.json")
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2))
    return meta


def read_meta(data_dir: Path) -> dict:
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.exists():
        raise AzllmError(
            f"{data_dir}: no meta.json, so no token shards here; make them with "
            f"`azllm tokenize --tokenizer T --input TEXT --out {data_dir}`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AzllmError(f"{path}: corrupt JSON ({e}); run `azllm tokenize` again") from None
    if meta.get("format") != SHARD_FORMAT:
        raise AzllmError(f"{path}: not an azllm shard folder (format {meta.get('format')!r})")
    return meta


@dataclass
class _Shard:
    data: np.ndarray
    starts: int  # number of valid window starts in this shard


class TokenBatches:
    """Random windows of block_size+1 tokens, addressed by (split, key) instead of by state.

    A `batch.BatchSource`. `global_batch(split, key, n)` returns the same n windows for the same
    key on any machine and any number of processes; each process then takes its own rows.
    Training uses key=step, so resuming needs no loader state beyond the step number.
    """

    def __init__(self, data_dir: Path, block_size: int, seed: int) -> None:
        self.dir = Path(data_dir)
        self.label = str(self.dir)
        self.meta = read_meta(self.dir)
        self.block_size, self.seed = block_size, seed
        self.splits: dict[str, list[_Shard]] = {}
        for split, info in self.meta["splits"].items():
            shards = []
            for s in info["shards"]:
                path = self.dir / s["file"]
                if not path.exists():
                    raise AzllmError(f"{path}: shard listed in meta.json is missing; re-tokenize")
                data = np.memmap(path, dtype=np.dtype(self.meta["dtype"]), mode="r")
                if len(data) != s["tokens"]:
                    raise AzllmError(
                        f"{path}: has {len(data)} tokens, meta.json says "
                        f"{s['tokens']}; the shard is truncated — re-tokenize"
                    )
                if len(data) > block_size:
                    shards.append(_Shard(data, len(data) - block_size))
            self.splits[split] = shards

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    def has_split(self, split: str) -> bool:
        return bool(self.splits.get(split))

    def batch(self, split: str, key: int, n: int, rows: slice | None = None) -> Batch:
        """Inputs and next-token targets, each [rows, block_size]."""
        b = self.global_batch(split, key, n, rows)
        return Batch(b[:, :-1], b[:, 1:])

    def tokens(self, split: str) -> int:
        return self.meta["splits"][split]["tokens"]

    def bytes_per_token(self, split: str) -> float:
        info = self.meta["splits"][split]
        return info["bytes"] / max(info["tokens"], 1)

    def global_batch(self, split: str, key: int, n: int, rows: slice | None = None) -> torch.Tensor:
        """n windows [n, block_size+1] (int64) for this key; `rows` picks this process's part."""
        shards = self.splits.get(split) or []
        if not shards:
            have = self.meta["splits"].get(split, {}).get("tokens", 0)
            raise AzllmError(
                f"{self.dir}: the {split} split has {have} tokens, fewer than the context "
                f"({self.block_size}) + 1; add data, raise --val-fraction or lower block_size"
            )
        g = step_generator(self.seed, split, key)
        bounds = np.cumsum([0] + [s.starts for s in shards])
        picks = torch.randint(0, int(bounds[-1]), (n,), generator=g).numpy()
        picks = picks[rows] if rows is not None else picks
        out = np.empty((len(picks), self.block_size + 1), dtype=np.int64)
        for i, p in enumerate(picks):
            k = int(np.searchsorted(bounds, p, side="right") - 1)
            start = int(p - bounds[k])
            out[i] = shards[k].data[start : start + self.block_size + 1]
        return torch.from_numpy(out)
