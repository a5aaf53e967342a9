"""`azllm export hf|gguf|ollama`: argument parsing only (the work is in hf.py, gguf.py,
ollama.py). `python -m azllm.export ...` runs the same commands on their own."""

from __future__ import annotations

import argparse
from pathlib import Path

from azllm.errors import require


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="the run directory to export")
    p.add_argument(
        "--weights",
        choices=("model", "best"),
        default="model",
        help="latest weights (model) or lowest validation loss (best)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _size(path: Path) -> str:
    n = (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else (path.stat().st_size)
    )
    return f"{n / 2**20:.1f} MiB"


def _note_fallback(path: Path, kind: str) -> None:
    from azllm.export.gguf import LLAMA_CPP_TYPES, fallback_note

    note = fallback_note(path) if kind in LLAMA_CPP_TYPES else None
    if note:
        print(f"note: {note}")


def cmd_export_hf(args) -> int:
    from azllm.export.hf import export_hf

    out = export_hf(args.run, args.out, weights=args.weights, force=args.force)
    print(
        f"wrote {out} ({_size(out)}): load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})"
    )
    return 0


def _kind(args, default: str) -> str:
    """--type, or the type a QAT run was trained for, or `default`; a note when --type
    quantizes a QAT run by another rule than the one it was trained for."""
    from azllm.export.gguf import trained_kind

    trained = trained_kind(args.run)
    if args.type and trained and args.type.lower() != trained:
        print(
            f"note: {args.run} was trained for {trained} (QAT); --type {args.type} stores other "
            f"weights than the ones it trained with (omit --type for {trained})"
        )
    return args.type or trained or default


def cmd_export_gguf(args) -> int:
    require("gguf", "azllm export gguf", modules=["gguf"])  # K-quants also need llama_cpp
    from azllm.export.gguf import export_gguf

    args.type = _kind(args, "f16")
    out = export_gguf(args.run, args.out, args.type, weights=args.weights, force=args.force)
    print(f"wrote {out} ({args.type}, {_size(out)})")
    _note_fallback(out, args.type)
    return 0


def cmd_export_ollama(args) -> int:
    require("gguf", "azllm export ollama", modules=["gguf"])  # K-quants also need llama_cpp
    from azllm.export.ollama import export_ollama

    args.type = _kind(args, "q4_k_m")
    out, command = export_ollama(
        args.run, args.out, args.type, name=args.name, weights=args.weights, force=args.force
    )
    print(f"wrote {out}/Modelfile and the GGUF ({args.type}, {_size(out)})")
    _note_fallback(next(out.glob("*.gguf")), args.type)
    print(f"load it into Ollama with:\n  {command}")
    return 0


def register(subparsers) -> None:
    from azllm.export.gguf import TYPES

    ex = subparsers.add_parser("export", help="export a run for transformers, llama.cpp, Ollama")
    exs = ex.add_subparsers(dest="export_command", required=True)

    p = exs.add_parser("hf", help="Hugging Face transformers folder (model, tokenizer, template)")
    _common(p)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export_hf)

    p = exs.add_parser("gguf", help="GGUF file for llama.cpp, optionally quantized")
    _common(p)
    p.add_argument("--out", required=True, help="output file, e.g. model.gguf")
    p.add_argument(
        "--type",
        choices=TYPES,
        help="f32|f16|q8_0|q4_0 written by azllm; q4_k_m|q5_k_m by llama.cpp (default: f16, "
        "or the type a QAT run was trained for)",
    )
    p.set_defaults(func=cmd_export_gguf)

    p = exs.add_parser("ollama", help="GGUF + Modelfile for `ollama create`")
    _common(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--type", choices=TYPES, help="default: q4_k_m, or a QAT run's type")
    p.add_argument("--name", default=None, help="Ollama model name (default: the run's name)")
    p.set_defaults(func=cmd_export_ollama)
