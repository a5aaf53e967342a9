"""The three model forms behind one interface, so a task scores the same way on each.

A backend gives: `encode` (plain text to ids, as the model's own tokenizer does), `chat_ids` (a
conversation through the chat template, ready for the assistant's reply), `loglikelihood`
(groups of one context and several continuations -> each continuation's summed log-probability
and whether greedy decoding would produce it) and `greedy` (batched greedy answers).

- RunBackend: our model. A group's context runs once (a batch of contexts, left-padded, into a
  KV cache), the cache rows are copied once per continuation, and the continuations then run
  in batches of similar length: a question's shared prompt costs one forward pass, not one per
  choice.
- HFBackend: transformers' AutoModelForCausalLM on an `azllm export hf` folder (full sequences,
  batched, right-padded: what lm-evaluation-harness does).
- GGUFBackend: llama.cpp's own logits (llama-cpp-python, logits_all=True); the context is
  evaluated once per group and the KV cache rewound to it for each continuation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from azllm.errors import AzllmError

Group = tuple[list[int], list[list[int]]]  # (context ids, continuation ids per choice)
CONT_ROWS = 16  # continuation rows per pass (sorted by length: little padding)


def _score(logp: torch.Tensor, targets: list[int]) -> tuple[float, bool]:
    """logp [n, V] predicting targets [n] -> (sum of their log-probs, all of them argmax)."""
    t = torch.tensor(targets, device=logp.device)
    lp = logp.gather(1, t[:, None]).sum().item()
    return lp, bool((logp.argmax(-1) == t).all())


class RunBackend:
    """A run directory (or a model and tokenizer already in memory: training's --eval-tasks)."""

    def __init__(self, model, tok, *, precision: str = "fp32", batch_rows: int = 64) -> None:
        self.model, self.tok, self.precision = model, tok, precision
        self.block_size = model.cfg.block_size
        self.batch_rows = batch_rows
        self.stop_ids = {tok.eos_id, tok.end_id}

    @classmethod
    def from_run(cls, run: Path, device, weights: str, precision: str) -> RunBackend:
        from azllm.checkpoint import load_run

        model, tok, _ = load_run(Path(run), device, weights)
        return cls(model, tok, precision=precision)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tok.encode_chat(messages, add_generation_prompt=True)[0]

    @torch.no_grad()
    def loglikelihood(self, groups: list[Group]) -> list[list[tuple[float, bool]]]:
        from azllm.device import DTYPES, autocast

        model, dev = self.model, next(self.model.parameters()).device
        out: list[list[tuple[float, bool]]] = [[] for _ in groups]
        order = sorted(range(len(groups)), key=lambda g: -len(groups[g][0]))
        i = 0
        # A batch: as many groups as fit in batch_rows continuation rows, and whose longest
        # context (left-padded) plus longest continuation still fits the context window.
        while i < len(order):
            batch, rows, lc, lk = [], 0, 0, 0
            while i < len(order):
                ctx, conts = groups[order[i]]
                new_lc, new_lk = max(lc, len(ctx)), max(lk, *map(len, conts))
                if batch and (
                    rows + len(conts) > self.batch_rows or new_lc + new_lk - 1 > self.block_size
                ):
                    break
                batch.append(order[i])
                rows, lc, lk, i = rows + len(conts), new_lc, new_lk, i + 1
            ctxs = [groups[g][0] for g in batch]
            conts = [c for g in batch for c in groups[g][1]]
            owner = [j for j, g in enumerate(batch) for _ in groups[g][1]]
            x = torch.full((len(batch), lc), self.tok.pad_id, dtype=torch.long)
            real = torch.zeros((len(batch), lc), dtype=torch.bool)
            for j, c in enumerate(ctxs):
                x[j, lc - len(c) :], real[j, lc - len(c) :] = torch.tensor(c), True
            cache = _unfilled_cache(model.cfg, len(batch), lc + lk - 1, dev, DTYPES[self.precision])
            with autocast(dev, self.precision):
                last, _ = model(x.to(dev), cache=cache, real=real.to(dev), last_only=True)
            first = torch.log_softmax(last[:, -1].float(), -1)  # predicts each first token
            logps = [first[owner[r]][None] for r in range(len(conts))]
            # The rest of every continuation, on copies of its context's cache rows: rows sorted
            # by length, CONT_ROWS at a time, so a short answer is not padded to the batch's
            # longest (az-basic's choices: 1-11 tokens, 3.4 on average).
            longer = sorted(
                (r for r, c in enumerate(conts) if len(c) > 1), key=lambda r: len(conts[r])
            )
            for s in range(0, len(longer), CONT_ROWS):
                rows = longer[s : s + CONT_ROWS]
                k = len(conts[rows[-1]]) - 1
                rc = _unfilled_cache(model.cfg, len(rows), lc + k, dev, DTYPES[self.precision])
                for q, r in enumerate(rows):  # row by row: ~6x faster than a gather cache.k[:, idx]
                    rc.k[:, q, :, :lc] = cache.k[:, owner[r], :, :lc]
                    rc.v[:, q, :, :lc] = cache.v[:, owner[r], :, :lc]
                idx = torch.tensor([owner[r] for r in rows], device=dev)
                rc.valid[:, :lc], rc.next_pos, rc.len = (
                    cache.valid[idx, :lc],
                    cache.next_pos[idx],
                    lc,
                )
                y = torch.full((len(rows), k), self.tok.pad_id, dtype=torch.long)
                yreal = torch.zeros((len(rows), k), dtype=torch.bool)
                for q, r in enumerate(rows):
                    n = len(conts[r]) - 1
                    y[q, :n], yreal[q, :n] = torch.tensor(conts[r][:-1]), True
                with autocast(dev, self.precision):
                    logits, _ = model(y.to(dev), cache=rc, real=yreal.to(dev))
                rest = torch.log_softmax(logits.float(), -1)
                for q, r in enumerate(rows):
                    logps[r] = torch.cat([logps[r], rest[q, : len(conts[r]) - 1]])
            for r, c in enumerate(conts):
                out[batch[owner[r]]].append(_score(logps[r], c))
        return out

    def greedy(self, prompts: list[list[int]], max_new: int, batch: int = 32) -> list[list[int]]:
        from azllm.generate import generate

        outs: list[list[int]] = []
        for i in range(0, len(prompts), batch):
            made = generate(
                self.model,
                prompts[i : i + batch],
                temperature=0.0,
                max_new_tokens=max_new,
                eos_id=self.tok.eos_id,
                pad_id=self.tok.pad_id,
                precision=self.precision,
            )
            outs += [_cut(m, self.stop_ids) for m in made]
        return outs


def _unfilled_cache(cfg, batch: int, max_len: int, device, dtype):
    """A KVCache whose keys/values are not zeroed: attention reads only the slots written so far
    (model.py: [:cache.len + t]), and zero-filling the caches was ~20% of scoring time (profiled
    on a 4-layer 256-wide model, 64 questions, 2 shots)."""
    from azllm.model import KVCache

    c = KVCache(cfg, batch, 0, device, dtype)  # the masks and counters; no slots yet
    shape = (cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim)
    c.k = torch.empty(shape, device=device, dtype=dtype)
    c.v = torch.empty_like(c.k)
    c.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    c.max_len = max_len
    return c


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    for j, t in enumerate(ids):
        if t in stops:
            return ids[:j]
    return ids


class HFBackend:
    """An `azllm export hf` folder through transformers; its tokenizer.json is ours unchanged,
    so plain text encodes to the same ids either way (tests/test_special_tokens.py)."""

    def __init__(self, folder: Path, device, batch: int = 16) -> None:
        from azllm.errors import require

        require("hf", "azllm eval --hf")
        import transformers

        from azllm.tokenizer import load_tokenizer

        folder = Path(folder)
        cfg = folder / "config.json"
        if not cfg.is_file() or not (folder / "tokenizer.json").is_file():
            raise AzllmError(
                f"--hf {folder}: not a Hugging Face model folder (config.json and "
                "tokenizer.json expected); make one with `azllm export hf`"
            )
        try:
            meta = json.loads(cfg.read_text(encoding="utf-8"))
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32
            )
        except (OSError, ValueError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise AzllmError(f"--hf {folder}: transformers could not load it ({msg})") from None
        self.model = self.model.to(device).eval()
        self.tok = load_tokenizer(folder / "tokenizer.json")
        self.block_size = int(
            meta.get("max_position_embeddings") or meta.get("n_positions") or 2048
        )
        self.batch, self.device = batch, device
        self.stop_ids = {self.tok.eos_id, self.tok.end_id}

    encode = RunBackend.encode
    decode = RunBackend.decode
    chat_ids = RunBackend.chat_ids

    @torch.no_grad()
    def _logps(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """log_softmax of each sequence's logits (right-padded batch)."""
        out = []
        for i in range(0, len(seqs), self.batch):
            chunk = seqs[i : i + self.batch]
            n = max(map(len, chunk))
            x = torch.full((len(chunk), n), self.tok.pad_id, dtype=torch.long)
            att = torch.zeros((len(chunk), n), dtype=torch.long)
            for j, s in enumerate(chunk):
                x[j, : len(s)], att[j, : len(s)] = torch.tensor(s), 1
            logits = self.model(input_ids=x.to(self.device), attention_mask=att.to(self.device))
            lp = torch.log_softmax(logits.logits.float(), -1)
            out += [lp[j, : len(s)] for j, s in enumerate(chunk)]
        return out

    def loglikelihood(self, groups: list[Group]) -> list[list[tuple[float, bool]]]:
        reqs = [(ctx, c) for ctx, conts in groups for c in conts]
        order = sorted(range(len(reqs)), key=lambda r: -len(reqs[r][0]) - len(reqs[r][1]))
        lps = self._logps([(reqs[r][0] + reqs[r][1])[:-1] for r in order])
        scores: list = [None] * len(reqs)
        for r, lp in zip(order, lps, strict=True):
            ctx, c = reqs[r]
            scores[r] = _score(lp[len(ctx) - 1 :], c)
        out, k = [], 0
        for _, conts in groups:
            out.append(scores[k : k + len(conts)])
            k += len(conts)
        return out

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        outs = []
        for p in prompts:  # one at a time: no padding question for a model we did not build
            ids = list(p)
            for _ in range(min(max_new, self.block_size - len(p))):
                logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits
                t = int(logits[0, -1].argmax())
                if t in self.stop_ids:
                    break
                ids.append(t)
            outs.append(ids[len(p) :])
        return outs


class GGUFBackend:
    """A GGUF file through llama.cpp, with llama.cpp's tokenizer and logits."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from azllm.export import llamacpp

        self.lc = llamacpp
        self.llm = llamacpp.open_gguf(path, logits_all=True, threads=threads)
        self.block_size = llamacpp.context_length(self.llm)
        self.special = {
            name: self.llm.tokenize(name.encode(), add_bos=False, special=True)[0]
            for name in ("<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
        }
        self.stop_ids = {self.llm.token_eos(), self.special["<|end|>"]}

    def close(self) -> None:
        from azllm.export.gguf import quiet_llama_cpp

        with quiet_llama_cpp():
            self.llm.close()

    def encode(self, text: str) -> list[int]:
        return self.lc.tokenize(self.llm, text)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        ids = [self.special["<|bos|>"]]
        for m in messages:
            ids += [self.special[f"<|{m['role']}|>"], *self.encode(m["content"])]
            ids.append(self.special["<|end|>"])
        return ids + [self.special["<|assistant|>"]]

    def loglikelihood(self, groups: list[Group]) -> list[list[tuple[float, bool]]]:
        import numpy as np

        llm, out = self.llm, []
        for ctx, conts in groups:
            llm.reset()
            llm.eval(ctx)
            base, res = len(ctx), []
            for c in conts:
                llm.n_tokens = base  # rewind to the context: eval() drops the KV cache beyond it
                if len(c) > 1:
                    llm.eval(c[:-1])
                lg = torch.from_numpy(np.array(llm.scores[base - 1 : base - 1 + len(c)]))
                res.append(_score(torch.log_softmax(lg.double(), -1), c))
            out.append(res)
        return out

    def greedy(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        outs = []
        for p in prompts:
            made: list[int] = []
            n = min(max_new, self.block_size - len(p))
            for t in self.llm.generate(p, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                if int(t) in self.stop_ids or len(made) >= n:
                    break
                made.append(int(t))
            outs.append(made)
        return outs


def open_backend(*, run=None, hf=None, gguf=None, device="cpu", weights="model", precision="fp32"):
    """(backend, a name for the report, the default report-card folder) of one model form."""
    if sum(x is not None for x in (run, hf, gguf)) != 1:
        raise AzllmError("azllm eval needs one of --run RUN, --hf DIR or --gguf FILE")
    if run is not None:
        return (
            RunBackend.from_run(Path(run), device, weights, precision),
            str(run),
            Path(run) / "eval",
        )
    if hf is not None:
        return HFBackend(Path(hf), device), str(hf), Path(hf) / "eval"
    from azllm.export.gguf import require_llama_cpp

    require_llama_cpp("azllm eval --gguf")
    return GGUFBackend(Path(gguf)), str(gguf), Path(f"{gguf}.eval")
