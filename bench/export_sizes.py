"""GGUF file size, llama.cpp decode speed and quality per type, against our own PyTorch decode.

    python bench/export_sizes.py [--preset small]             # a random-init `baby` model
    python bench/export_sizes.py --run runs/quickstart --text held_out.txt
    python bench/export_sizes.py --types f16,q8_0,q4_k_m --new-tokens 64 --threads 2 --json o.json

For each type the run is exported (azllm.export.gguf) and loaded by llama.cpp (llama-cpp-python,
CPU). Decode speed: for each prompt, llama.cpp's greedy sampler produces --new-tokens tokens; the
clock starts when the first new token arrives (so the prompt's processing is not counted) and
the rate is (new tokens - 1) / time, summed over prompts; the best of --repeats runs is kept.
PyTorch: azllm.generate.generate, batch 1, KV cache, greedy, same prompts, same thread count,
timed the same way (first token excluded).
With --text, bits per byte of that text per type (llama.cpp) and for PyTorch (azllm.evaluate).
Without --run, a model of --preset's shape (default `baby`) with random weights and a tokenizer
trained on the bundled corpus: size and speed do not depend on what the weights are (bits per byte
would, so --text is only meaningful with a trained --run). K-quants need rows that are a multiple
of 256 wide; llama.cpp stores narrower ones (`baby` is 384 wide) in a fallback type (Q5_0, Q5_1,
Q8_0), so `small` (512 wide) shows what Q4_K_M really does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from azllm.checkpoint import load_run
from azllm.export.gguf import TYPES, export_gguf, gguf_eval

PROMPTS = ["Azərbaycan", "Bakı şəhəri Xəzər dənizinin sahilində yerləşir və", "Bir gün qoca"]


def random_run(root: Path, preset: str) -> Path:
    """A run of the preset's shape with random weights (tokenizer from the bundled corpus)."""
    from azllm.checkpoint import save_weights
    from azllm.config import load_config
    from azllm.documents import iter_all_documents
    from azllm.model import GPT
    from azllm.tokenizer import AzTokenizer, train_tokenizer

    sample = Path(__file__).resolve().parents[1] / "azllm" / "data" / "sample"
    tok = AzTokenizer(train_tokenizer(iter_all_documents([sample]), 8192))
    cfg = load_config(preset)
    cfg.model.vocab_size = tok.vocab_size
    run = root / f"{preset}-random"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    save_weights(GPT(cfg.model), run / "model.safetensors")
    return run


def torch_decode_rate(model, tok, n_new: int) -> float:
    from azllm.generate import generate

    total_t, total_n = 0.0, 0
    for p in PROMPTS:
        stamps = []
        generate(
            model,
            [tok.encode(p)],
            max_new_tokens=n_new,
            temperature=0,
            on_token=lambda _i, _t, s=stamps: s.append(time.perf_counter()),
        )
        total_t += stamps[-1] - stamps[0]
        total_n += len(stamps) - 1
    return total_n / total_t


def llama_decode_rate(path: Path, tok, n_new: int, threads: int) -> float:
    from azllm.export.llamacpp import loaded

    total_t, total_n = 0.0, 0
    with loaded(path, threads=threads) as llm:
        for p in PROMPTS:
            stamps = []
            for _ in llm.generate(tok.encode(p), temp=0.0, top_k=1, repeat_penalty=1.0):
                stamps.append(time.perf_counter())
                if len(stamps) == n_new:
                    break
            total_t += stamps[-1] - stamps[0]
            total_n += len(stamps) - 1
    return total_n / total_t


def best_of(repeats: int, rate, *args) -> float:
    """The fastest of `repeats` measurements: a neighbour's load only ever slows a run down."""
    return max(rate(*args) for _ in range(repeats))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory (default: a random-init model of --preset)")
    ap.add_argument("--preset", default="baby", help="shape of the random model without --run")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--text", help="held-out text for bits per byte per type")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings per row")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="azllm-bench-") as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else random_run(tmp, args.preset)
        model, tok, cfg = load_run(run)
        n_params = model.num_params()
        n_new = min(
            args.new_tokens, cfg.model.block_size - max(len(tok.encode(p)) for p in PROMPTS) - 1
        )
        print(
            f"model: {run.name} ({cfg.model.arch}, {n_params / 1e6:.2f}M parameters, "
            f"context {cfg.model.block_size}); {args.threads} thread(s); "
            f"{n_new} new tokens x {len(PROMPTS)} prompts",
            flush=True,
        )
        torch_tps = best_of(args.repeats, torch_decode_rate, model, tok, n_new)
        rows = [
            {
                "type": "pytorch fp32",
                "bytes": (run / "model.safetensors").stat().st_size,
                "decode_tok_s": torch_tps,
            }
        ]
        if args.text:
            from azllm.evaluate import evaluate_text, read_text_file

            rows[0]["bpb"] = evaluate_text(model, tok, read_text_file(Path(args.text)))["bpb"]
        for kind in args.types.split(","):
            path = export_gguf(run, tmp / f"{kind}.gguf", kind)
            row = {
                "type": f"gguf {kind}",
                "bytes": path.stat().st_size,
                "decode_tok_s": best_of(
                    args.repeats, llama_decode_rate, path, tok, n_new, args.threads
                ),
            }
            if args.text:
                row["bpb"] = gguf_eval(path, args.text, threads=args.threads)["bpb"]
            rows.append(row)
            print(f"  {kind} done", file=sys.stderr, flush=True)

    print(
        f"\n{'type':<14} {'MiB':>8} {'bits/param':>10} {'decode tok/s':>13} {'vs torch':>9}"
        + (f" {'bpb':>7}" if args.text else "")
    )
    for r in rows:
        r["bits_per_param"] = 8 * r["bytes"] / n_params
        r["speedup_vs_torch"] = r["decode_tok_s"] / torch_tps
        print(
            f"{r['type']:<14} {r['bytes'] / 2**20:>8.2f} {r['bits_per_param']:>10.2f} "
            f"{r['decode_tok_s']:>13.1f} {r['speedup_vs_torch']:>8.2f}x"
            + (f" {r['bpb']:>7.4f}" if args.text else "")
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"run": str(run), "params": n_params, "threads": args.threads, "rows": rows},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
