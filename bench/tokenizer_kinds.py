"""Tokenizer kinds side by side: byte-level BPE, SentencePiece BPE, SentencePiece unigram.

    python bench/tokenizer_kinds.py --data ../shared/data/az/pretrain \
        --heldout flores200_sib200_azj_Latn.txt --vocab-size 4096 --steps 300 --json kinds.json

For each kind, on the same files (the held-out file taken out of training for every kind):
1. the tokenizer is trained (`azllm tokenizer train --kind`'s function) and timed;
2. fertility (tokens per whitespace word) and bytes per token on the held-out text;
3. parity, every line of every --data file: our tokenizer.json vs sentencepiece's own processor
   (SentencePiece kinds), and vs llama.cpp reading a GGUF export (a random-weights model is
   enough for tokenizing); each differing line counted. The unigram kind's GGUF export is
   refused (llama.cpp's unigram tokenizer has no byte fallback), so it has no llama.cpp count;
4. a small llama (--n-layer/--n-embd, --block-size) trained on the same number of tokens
   (--steps x --batch x --block-size) with each tokenizer, then held-out bits per byte
   (azllm.evaluate.evaluate_text; bpb is comparable across tokenizers, loss is not).
A figure, not a pass/fail. The issue asks for a `baby` per kind; that is hours on a CPU, so the
defaults here are a few minutes' scale (see bench/README.md "SentencePiece").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import unicodedata
from pathlib import Path


def parity(tok, kind: str, spm_model: bytes | None, files: list[Path], workdir: Path) -> dict:
    """Differing lines: ours vs sentencepiece (spm kinds), ours vs llama.cpp (GGUF kinds)."""
    import torch

    from azllm.checkpoint import save_weights
    from azllm.config import Config, ModelConfig
    from azllm.model import GPT

    lines = []
    for f in files:
        lines += [unicodedata.normalize("NFC", x) for x in f.read_text("utf-8").split("\n")]
    ours = tok.encode_batch(lines)
    out = {"lines": len(lines)}
    if spm_model is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=spm_model)
        out["vs_sentencepiece"] = sum(a != b for a, b in zip(ours, sp.encode(lines), strict=True))
    if kind == "sentencepiece-unigram":
        out["vs_llama_cpp"] = "refused (no byte fallback in llama.cpp's unigram)"
        return out
    from azllm.export.gguf import export_gguf
    from azllm.export.llamacpp import loaded, tokenize

    run = workdir / f"random-{kind}"
    run.mkdir(parents=True, exist_ok=True)
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1,
                                   n_head=2, n_embd=64))  # fmt: skip
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    save_weights(GPT(cfg.model), run / "model.safetensors")
    path = export_gguf(run, workdir / f"{kind}.gguf", "f32")
    with loaded(path) as llm:
        out["vs_llama_cpp"] = sum(
            tokenize(llm, x) != ids for x, ids in zip(lines, ours, strict=True)
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/az/pretrain")
    ap.add_argument("--heldout", default="flores200_sib200_azj_Latn.txt", help="file in --data")
    ap.add_argument("--kinds", nargs="+", default=["bpe", "sentencepiece-bpe",
                                                   "sentencepiece-unigram"])  # fmt: skip
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    from azllm.config import Config, ModelConfig, TrainConfig
    from azllm.documents import iter_all_documents
    from azllm.evaluate import evaluate_text
    from azllm.shards import tokenize_to_shards
    from azllm.tokenizer import AzTokenizer, tokenizer_stats, train_tokenizer
    from azllm.tokenizer_spm import train_sentencepiece
    from azllm.train import train

    torch.set_num_threads(1)
    data = Path(args.data)
    files = sorted(data.glob("*.txt"))
    held = data / args.heldout
    train_files = [f for f in files if f != held]
    held_text = held.read_text("utf-8")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="azllm-kinds-") as tmp:
        work = Path(tmp)
        for kind in args.kinds:
            t0 = time.perf_counter()
            docs = iter_all_documents(train_files)
            if kind == "bpe":
                tok, spm_model = AzTokenizer(train_tokenizer(docs, args.vocab_size)), None
            else:
                t, spm_model = train_sentencepiece(docs, args.vocab_size, kind)
                tok = AzTokenizer(t)
            row = {"tokenizer_train_s": round(time.perf_counter() - t0, 1)}
            st = tokenizer_stats(tok, iter_all_documents([held]))
            row.update(fertility=round(st["fertility"], 3),
                       bytes_per_token=round(st["bytes_per_token"], 3))  # fmt: skip
            row["parity"] = parity(tok, kind, spm_model, files, work)
            shards = work / f"shards-{kind}"
            tokenize_to_shards(tok, train_files, shards, val_fraction=0.02, progress=False)
            cfg = Config(
                model=ModelConfig(vocab_size=tok.vocab_size, block_size=args.block_size,
                                  n_layer=args.n_layer, n_head=4, n_embd=args.n_embd),
                train=TrainConfig(micro_batch=args.batch, grad_accum=1, max_steps=args.steps,
                                  warmup_steps=args.steps // 10, lr=3e-3,
                                  eval_interval=args.steps, eval_batches=1,
                                  log_interval=args.steps, ckpt_interval=args.steps, keep_last=1,
                                  precision="fp32", device="cpu", seed=1234),
            )  # fmt: skip
            t0 = time.perf_counter()
            run = work / f"run-{kind}"
            train(cfg, shards, run, progress=False)
            row["train_s"] = round(time.perf_counter() - t0, 1)
            from azllm.checkpoint import load_run

            model, rtok, _ = load_run(run, device="cpu")
            ev = evaluate_text(model, rtok, held_text)
            row.update(heldout_bpb=round(ev["bpb"], 4), heldout_tokens=ev["tokens"],
                       train_tokens=args.steps * args.batch * args.block_size)  # fmt: skip
            rows[kind] = row
            print(kind, json.dumps(row), flush=True)
    print(
        f"\n{'kind':22} {'tok/word':>8} {'B/tok':>6} {'bpb':>7} {'vs spm':>7} {'vs llama.cpp':>13}"
    )
    for kind, r in rows.items():
        p = r["parity"]
        cpp = p["vs_llama_cpp"] if isinstance(p["vs_llama_cpp"], int) else "refused"
        spm_diff = str(p.get("vs_sentencepiece", "-"))
        print(f"{kind:22} {r['fertility']:8.3f} {r['bytes_per_token']:6.2f} "
              f"{r['heldout_bpb']:7.4f} {spm_diff:>7} {cpp!s:>13}")  # fmt: skip
    print(f"({rows[next(iter(rows))]['parity']['lines']:,} lines compared per kind)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
