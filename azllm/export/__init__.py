"""Exports of a run directory for other runtimes, each checked by the real consumer in tests:

- hf.py      Hugging Face transformers folder (LlamaForCausalLM / GPT2LMHeadModel + tokenizer);
- gguf.py    a GGUF file for llama.cpp (F32/F16/Q8_0/Q4_0 from Python, K-quants by llama.cpp),
             and `gguf_eval`, bits per byte computed by llama.cpp itself;
- ollama.py  the GGUF plus a Modelfile for `ollama create`.

Everything here reads RUN/ only (config.json, tokenizer.json, weights) and never imports train.
"""

from __future__ import annotations

from pathlib import Path

from azllm.errors import AzllmError
from azllm.sampling import SamplingSettings

# Sampling defaults shared by every export, the same as `azllm generate`'s defaults.
SAMPLING = SamplingSettings()  # what exported models recommend: the project's defaults


def load_for_export(run_dir: str | Path, weights: str = "model"):
    """(model in fp32 on the CPU, tokenizer, ModelConfig) of a run."""
    from azllm.checkpoint import load_run

    model, tok, cfg = load_run(Path(run_dir), device="cpu", weights=weights)
    return model.float(), tok, cfg.model


def state_tensors(model) -> dict:
    """Our parameter names -> fp32 tensors, tied weights once (under embed.weight)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = p.detach().float().contiguous()
    return out


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AzllmError(f"--out {out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AzllmError(f"--out {out}: folder is not empty; pass --force to replace it")


def check_out_file(out: Path, force: bool) -> None:
    if out.is_dir():
        raise AzllmError(f"--out {out}: is a folder; give a file name such as model.gguf")
    if out.exists() and not force:
        raise AzllmError(f"--out {out}: file exists; pass --force to replace it")
