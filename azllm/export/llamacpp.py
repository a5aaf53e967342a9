"""Running a GGUF with llama.cpp (llama-cpp-python): load, tokenize, greedy decode, bits per byte.

`evaluate_gguf` computes exactly what azllm.evaluate.evaluate_text computes, with llama.cpp doing
the tokenizing and the forward passes: the text preceded by EOS, cut into windows of the model's
context that overlap by one token (each window a fresh context), every token predicted once, NLL
in bits divided by the UTF-8 bytes of the text. So `azllm eval --gguf` and `azllm eval --run`
print comparable numbers, and a quantized file's loss of quality is one number.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from azllm.errors import AzllmError
from azllm.export.gguf import quiet_llama_cpp, require_llama_cpp


def open_gguf(path: str | Path, *, logits_all: bool = False, threads: int | None = None):
    """A llama_cpp.Llama on the CPU with the file's own context length; quiet."""
    llama_cpp = require_llama_cpp("running a GGUF")
    path = Path(path)
    if not path.is_file():
        raise AzllmError(f"--gguf {path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise AzllmError(f"{path}: not a GGUF file; make one with `azllm export gguf`")
    threads = threads or os.cpu_count() or 1
    try:  # quiet: llama.cpp warns on stderr that it pads the context to a multiple of 256
        with quiet_llama_cpp():
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=0,  # 0: the context length the model was trained with
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                logits_all=logits_all,
                verbose=False,
            )
    except (ValueError, RuntimeError) as e:
        raise AzllmError(f"{path}: llama.cpp could not load it ({e}); re-export it") from None


@contextmanager
def loaded(path: str | Path, *, logits_all: bool = False, threads: int | None = None) -> Iterator:
    """open_gguf, closed on exit (llama-cpp-python frees models noisily at interpreter exit)."""
    llm = open_gguf(path, logits_all=logits_all, threads=threads)
    try:
        yield llm
    finally:
        with quiet_llama_cpp():  # freeing the context logs its buffer sizes
            llm.close()


def context_length(llm) -> int:
    meta = llm.metadata
    return int(meta[f"{meta['general.architecture']}.context_length"])


def tokenize(llm, text: str) -> list[int]:
    """Plain text -> ids as azllm's tokenizer gives them (no BOS; NFC as our normalizer does)."""
    data = unicodedata.normalize("NFC", text).encode("utf-8")
    return llm.tokenize(data, add_bos=False, special=False)


def greedy(llm, prompt: list[int], n: int) -> list[int]:
    """n tokens chosen by llama.cpp's greedy sampler after `prompt` (no stop at EOS)."""
    out = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == n:
            break
    return out


def nll_of_ids(llm, ids: list[int]) -> tuple[float, int]:
    """Total NLL (nats) of ids[1:], windows of the model's context overlapping by one token.

    `llm` must be opened with logits_all=True.
    """
    ctx = context_length(llm)
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, ctx):
        w = ids[s : s + ctx + 1]
        n = len(w) - 1
        llm.reset()
        llm.eval(w[:-1])
        logits = np.asarray(llm.scores[:n], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        total += float((lse - logits[np.arange(n), w[1:]]).sum())
        count += n
    return total, count


def evaluate_gguf(
    gguf_path: str | Path, text_path: str | Path, *, threads: int | None = None
) -> dict:
    """{"loss", "perplexity", "bpb", "tokens", "bytes"} of the text under the GGUF model."""
    from azllm.evaluate import read_text_file, text_metrics

    require_llama_cpp("azllm eval --gguf")
    text = read_text_file(Path(text_path))
    with loaded(gguf_path, logits_all=True, threads=threads) as llm:
        ids = [llm.token_eos()] + tokenize(llm, text)
        nll, n = nll_of_ids(llm, ids)
    return text_metrics(nll, n, text)
