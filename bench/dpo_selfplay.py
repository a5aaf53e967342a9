"""Self-play preference tuning end to end on the Azerbaijani chat set, at CPU scale.

    python bench/dpo_selfplay.py --out /tmp/dpo_bench   # ~40 min on 2 busy cores (3 seeds)

The chain, each step the project's own command code:
1. tokenizer (4096) and a small model pretrained for a few minutes on the bundled corpus;
2. `azllm sft` on ../shared/data/az/chat (225 single-turn conversations);
3. `azllm pairs`: the SFT model's own answers (--samples 2) as rejected, the reference
   answers as chosen, samples too similar to the reference (>= 0.9) dropped;
4. `azllm dpo` (sigmoid, beta 0.1) from the SFT run, once per seed (the seed orders the pairs);
5. held-out reward accuracy over every held-out pair (the split is by prompt, so no held-out
   prompt was trained on by DPO; SFT saw every conversation, as in SPIN), with its binomial
   standard error and the spread over seeds; held-out DPO loss before (log 2) and after;
6. `azllm eval --tasks az-basic --chat` on the SFT and the DPO run (a figure, not a check).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO.parent / "shared" / "data" / "az" / "chat"

MODEL = {
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.n_embd": 128,
    "model.block_size": 256,
    "model.dropout": 0.0,
}


def held_out(run: Path, base: Path, pairs: Path, val_fraction: float) -> dict:
    """DPO loss and reward accuracy of run's weights over every held-out pair (sigmoid, 0.1)."""
    from azllm.chat.dpo import DPOSettings, preference_loss, reference_logps
    from azllm.chat.pairdata import PairBatches, load_pairs
    from azllm.checkpoint import load_run

    model, tok, cfg = load_run(run)
    data = PairBatches(
        load_pairs([pairs]), tok, run / "tokenizer.json", cfg.model.block_size,
        cfg.train.seed, val_fraction,
    )  # fmt: skip
    n, cpu = data.count("val"), torch.device("cpu")
    policy = reference_logps(model, data, "val", 8, cpu, "fp32")  # the same no-grad pass
    ref = reference_logps(load_run(base)[0], data, "val", 8, cpu, "fp32")
    counts = (data.take("val", list(range(n))).targets != -1).sum(-1)
    loss, st = preference_loss(policy, ref, counts, DPOSettings())
    return {"n": n, "loss": loss.item(), **{k: v.item() for k, v in st.items()}}


def task_scores(run: Path) -> dict:
    cmd = [sys.executable, "-m", "azllm.cli", "eval", "--run", str(run), "--tasks", "az-basic"]
    cmd += ["--chat", "--json", "--out", str(run / "eval")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout
    scores = {}
    for line in out.splitlines():  # one JSON object per task
        r = json.loads(line)
        scores[r["task"]] = round(r["acc"] if "acc" in r else r["f1"], 3)
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--pretrain-minutes", type=float, default=4.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    from azllm.chat.dpo import DPOSettings, dpo
    from azllm.chat.pairs import pairs_command
    from azllm.chat.sft import sft
    from azllm.config import apply_overrides, load_config
    from azllm.documents import iter_all_documents
    from azllm.quickstart import sample_corpus
    from azllm.sampling import SamplingSettings
    from azllm.shards import tokenize_to_shards
    from azllm.tokenizer import AzTokenizer, load_tokenizer, train_tokenizer
    from azllm.train import train

    w = args.out
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, chat_run, pairs = w / "base", w / "sft", w / "pairs.jsonl"
    if not (base / "model.safetensors").exists():
        tok_path = w / "tokenizer.json"
        AzTokenizer(train_tokenizer(iter_all_documents(sample_corpus()), 4096)).save(tok_path)
        tokenize_to_shards(load_tokenizer(tok_path), sample_corpus(), w / "shards", progress=False)
        cfg = apply_overrides(
            load_config("baby"),
            {**MODEL, "train.precision": "fp32", "train.max_steps": 100_000, "train.lr": 3e-3,
             "train.micro_batch": 16, "train.eval_interval": 100, "train.ckpt_interval": 100_000,
             "train.warmup_steps": 20},
        )  # fmt: skip
        cfg.train.max_minutes = args.pretrain_minutes
        last = train(cfg, w / "shards", base, progress=False)
        print(f"pretrained: step {last['step']}, val loss {last.get('val_loss', float('nan')):.3f}")
    if not (chat_run / "model.safetensors").exists():
        last = sft(base, [CHAT], chat_run, overrides={"train.precision": "fp32"}, progress=False)
        print(f"sft: step {last['step']}, val loss {last['val_loss']:.3f}")
    if not pairs.exists():
        stats = pairs_command(
            chat_run, [CHAT], pairs, samples=2, max_similarity=0.9,
            sampling=SamplingSettings(max_new_tokens=160, seed=0), batch_size=32,
        )  # fmt: skip
        print(f"pairs: {stats}")
    print(f"[{(time.perf_counter() - t0) / 60:.1f} min]")
    results = []
    for seed in range(args.seeds):
        run = w / f"dpo-seed{seed}"
        if not (run / "model.safetensors").exists():
            over = {"train.precision": "fp32", "train.seed": seed, "train.lr": args.lr}
            over["train.eval_interval"] = 25
            dpo(chat_run, [pairs], run, DPOSettings(), overrides=over, epochs=args.epochs,
                val_fraction=0.2, progress=False)  # fmt: skip
        before = held_out(chat_run, chat_run, pairs, 0.2) if seed == 0 else results[0]["before"]
        after = held_out(run, chat_run, pairs, 0.2)
        results.append({"seed": seed, "before": before, "after": after})
        se = math.sqrt(after["reward_acc"] * (1 - after["reward_acc"]) / after["n"])
        print(
            f"seed {seed}: {after['n']} held-out pairs, DPO loss {before['loss']:.3f} -> "
            f"{after['loss']:.3f}, reward accuracy {after['reward_acc']:.3f} +- {se:.3f} (binomial "
            f"SE), margin {after['margin']:.2f}"
        )
    accs = [r["after"]["reward_acc"] for r in results]
    sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
    n = results[0]["after"]["n"]
    print(
        f"reward accuracy over {len(accs)} seeds: mean {statistics.mean(accs):.3f}, sd {sd:.3f}; "
        f"chance 0.5 +- {math.sqrt(0.25 / n):.3f} (SE of a coin over {n} pairs)"
    )
    for name, run in (("sft", chat_run), ("dpo seed 0", w / "dpo-seed0")):
        print(f"az-basic ({name}): {task_scores(run)}")
    print(f"[{(time.perf_counter() - t0) / 60:.1f} min]")
    (w / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
