"""Tiny trained runs shared by the export tests (test_export_hf/gguf/ollama).

Each architecture is trained once per test process (a module-level cache, not a conftest fixture,
so the three test files share it): a 2-layer, 256-wide model with a 768-token tokenizer, trained
for a couple of hundred steps on the bundled corpus with Muon (train.optimizer = "muon"), which
in the same steps reaches held-out 2.52 (llama) and 2.57 (gpt2) bits per byte where AdamW reached
2.59 and 3.11 (more steps overfit this small corpus: Muon's 400 llama steps end at 2.71), so
predictions are peaked enough for greedy comparisons and for quantization to show. 256 wide and
a 768-wide SwiGLU layer keep every weight row a multiple of 256, so the K-quants (Q4_K, Q5_K,
Q6_K) are really used, not replaced by llama.cpp's fallback types. The llama
run uses grouped-query attention (4 query heads, 2 key/value heads) so the export's Q/K
permutation is tested with n_kv_head != n_head. The last two corpus files are held out.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "azllm" / "data" / "sample"
HELD_OUT = ("15_dil_oyrenme.txt", "16_hikmetler.txt")
STEPS = {"llama": 200, "gpt2": 120}
OPTIMIZER = "muon"  # peaked in the same steps (see above); muon_lr stays the default

# Azerbaijani prompts with every letter that differs from English (ə ı ğ ş ç ö ü İ).
PROMPTS = [
    "Azərbaycan",
    "Bakı şəhəri Xəzər dənizinin sahilində",
    "İnsanlar çörəyi",
    "Göygöl gözəl gölüdür və",
    "Şuşa, Gəncə, Şəki, Quba",
]
PARAGRAPH = (
    "İlkin Əliyev dünən Gəncədən Şəkiyə getdi. Yolda çörək, pendir və göy-göyərti aldı; "
    "üzüm bağlarının yanında dayanıb ŞƏKİ PAXLAVASI haqqında soruşdu. «Çox sağ olun!» — dedi. "
    "2024-cü ildə 1918 nəfər iştirak etdi, qiymət 3,75 manat idi.\n\n"
    "Yeni sətir:\tTAB və  iki boşluq."
)
CHAT = [
    {"role": "system", "content": "Sən köməkçisən."},
    {"role": "user", "content": "Salam! Bakı haqqında danış."},
    {"role": "assistant", "content": "Bakı Azərbaycanın paytaxtıdır."},
    {"role": "user", "content": "Bəs Şəki?"},
]

_cache: dict[str, Path] = {}
_root: Path | None = None


def _workdir() -> Path:
    global _root
    if _root is None:
        base = os.environ.get("AZLLM_EXPORT_FIXTURES")  # reuse between local runs if set
        if base:
            _root = Path(base)
            _root.mkdir(parents=True, exist_ok=True)
        else:
            _root = Path(tempfile.mkdtemp(prefix="azllm-export-"))
            atexit.register(shutil.rmtree, _root, ignore_errors=True)
    return _root


def held_out_text() -> str:
    return "\n\n".join((SAMPLE / name).read_text(encoding="utf-8") for name in HELD_OUT)


def _data_dir(root: Path) -> Path:
    from azllm.documents import iter_all_documents
    from azllm.shards import tokenize_to_shards
    from azllm.tokenizer import AzTokenizer, train_tokenizer

    data = root / "data"
    if (data / "meta.json").exists():
        return data
    files = sorted(p for p in SAMPLE.glob("*.txt") if p.name not in HELD_OUT)
    tok = AzTokenizer(train_tokenizer(iter_all_documents(files), 768))
    tokenize_to_shards(tok, files, data, val_fraction=0.1, progress=False, force=True)
    return data


def trained_run(arch: str) -> Path:
    """A run directory (config.json, tokenizer.json, model.safetensors) for arch llama|gpt2."""
    if arch in _cache:
        return _cache[arch]
    import torch

    from azllm.config import Config, ModelConfig, TrainConfig
    from azllm.train import train

    root = _workdir()
    run = root / f"run-{arch}"
    if not (run / "model.safetensors").exists():
        model = ModelConfig(
            arch=arch,
            block_size=64,
            n_layer=2,
            n_head=4,
            n_kv_head=2 if arch == "llama" else 4,
            n_embd=256,
            ffn_hidden=768 if arch == "llama" else 1024,
        )
        steps = STEPS[arch]
        tc = TrainConfig(
            micro_batch=8,
            grad_accum=1,
            max_steps=steps,
            warmup_steps=20,
            lr=3e-3,
            optimizer=OPTIMIZER,
            eval_interval=steps,
            eval_batches=1,
            log_interval=steps,
            ckpt_interval=steps,
            keep_last=1,
            precision="auto",  # bf16 autocast where the CPU has it (1.5x faster here)
            device="cpu",
            seed=1234,
        )
        # One thread: this tiny model gains little from two, and on a busy machine two OpenMP
        # threads waiting on each other are several times slower than one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(Config(model=model, train=tc), _data_dir(root), run, progress=False)
        finally:
            torch.set_num_threads(threads)
    _cache[arch] = run
    return run


def random_run(arch: str, *, tie: bool = False, experts: int = 0) -> Path:
    """An untrained run written by hand (config.json, tokenizer.json, model.safetensors):
    covers what the trained runs do not, e.g. an untied output layer or (experts > 0) a
    mixture of experts. Weights are scaled up so logits are far from uniform and numeric
    comparisons are not trivially small."""
    key = f"random-{arch}-{'tied' if tie else 'untied'}" + (f"-moe{experts}" if experts else "")
    if key in _cache:
        return _cache[key]
    import json

    import torch

    from azllm.checkpoint import save_weights
    from azllm.config import Config, ModelConfig
    from azllm.model import GPT
    from azllm.tokenizer import load_tokenizer

    root = _workdir()
    run = root / key
    if not (run / "model.safetensors").exists():
        tok = load_tokenizer(_data_dir(root) / "tokenizer.json")
        cfg = Config(
            model=ModelConfig(
                arch=arch,
                vocab_size=tok.vocab_size,
                block_size=64,
                n_layer=2,
                n_head=4,
                n_kv_head=1 if arch == "llama" else 4,
                n_embd=128,
                tie_embeddings=tie,
                n_experts=experts,
                expert_ffn_hidden=64 if experts else 0,
            )
        )
        torch.manual_seed(7)
        model = GPT(cfg.model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2:
                    p.mul_(4.0)
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.1)
                else:
                    p.uniform_(0.5, 1.5)  # norm gains: not all ones, so a mix-up shows
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        tok.save(run / "tokenizer.json")
        save_weights(model, run / "model.safetensors")
    _cache[key] = run
    return run


def run_export_cli(*args: str):
    """`python -m azllm.export ARGS` as a real process."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "azllm.export", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


def both_logits(llm, model, ids: list[int], *others) -> tuple:
    """llama.cpp's logits (an open Llama with logits_all=True) and ours (then each model in
    `others`) for one window of ids, as numpy arrays [len(ids), vocab]."""
    import numpy as np
    import torch

    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        x = torch.tensor([ids])
        return (theirs, *(m(x)[0][0].numpy() for m in (model, *others)))
