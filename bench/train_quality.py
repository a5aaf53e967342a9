"""Recipe comparison: azllm against karpathy/nanoGPT at equal tokens on held-out Azerbaijani text.

    python bench/train_quality.py --data ../shared/data/az/pretrain \
        --heldout ../shared/data/az/pretrain/flores200_sib200_azj_Latn.txt \
        --nanogpt-dir /tmp/nanogpt --steps 370 --seeds 3 --json quality.json

nanoGPT is not part of azllm and is never committed: save karpathy/nanoGPT's model.py in a
folder outside the repository and pass it with --nanogpt-dir. The peer script
(../shared/tools/peer_nanogpt.py, --peer) trains it.

1. The held-out file is taken out of the training files (for every arm alike). A byte-level BPE
   is trained on the rest, and azllm token shards are written from it (`azllm tokenize`'s
   documents and split; --per-line-docs rebuilds the old split of a file without blank lines
   into a document per line, to measure what that cost).
2. Arms, each trained on the same number of tokens (--steps x --batch x --block-size):
   nanogpt  nanoGPT's model.py through the peer script (subprocess): whole files, EOS between
            files, random windows, AdamW, warmup then cosine to 0.1x;
   adamw    azllm llama + AdamW, today's recipe: the shape, lr and warmup given here;
   gpt2     the same through azllm with model.arch=gpt2 (diagnosis: architecture vs pipeline);
   default  the `baby` preset as the config defines it now (architecture options, optimizer,
            lr, batch, eval and checkpoint intervals, precision): `azllm train --config baby`
            with only the step count (from the token budget), seed and device set, and the
            shape if --n-layer/--n-head/--n-embd/--block-size scale it down. It reads the
            defaults at run time, so re-running it measures whatever they have become.
   The azllm arms run azllm.train.train, every overhead included (evaluation, checkpoints,
   matmul-peak measurement, prefetch thread).
3. Every arm is scored by the same procedure, the peer's: the raw held-out text encoded whole,
   non-overlapping windows of the context, every token after the first predicted once, fp32;
   bpb = NLL in bits / UTF-8 bytes. For the azllm arms the table also shows `azllm eval --text`
   (the same windows after a leading EOS, so the first token is predicted too) and the held-out
   text with its line breaks replaced by spaces (same byte count).

Targets (issue 13): default <= 0.90 x nanogpt in bpb at equal tokens, and default's wall time
<= nanogpt's. Wall time on a shared machine is unreliable: tokens/s are shown per arm, measured
one after the other in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from azllm.checkpoint import load_run
from azllm.config import apply_overrides, load_config
from azllm.documents import iter_documents, text_files
from azllm.evaluate import nll_of_ids, read_text_file
from azllm.shards import tokenize_to_shards
from azllm.tokenizer import AzTokenizer, train_tokenizer
from azllm.train import train

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "tools" / "peer_nanogpt.py"
ARMS = ("nanogpt", "adamw", "gpt2", "default")


def per_line_copy(files: list[Path], out: Path) -> list[Path]:
    """The old documents of each file: a file without blank lines became a document per line
    (written here as JSON Lines, which the shard writer reads as one document per record)."""
    out.mkdir(parents=True, exist_ok=True)
    result = []
    for i, f in enumerate(files):
        lines = f.read_text(encoding="utf-8").splitlines()
        if any(not ln.strip() for ln in lines):
            result.append(f)
            continue
        dest = out / f"{i:02d}_{f.stem}.jsonl"
        with dest.open("w", encoding="utf-8") as w:
            for ln in lines:
                if ln.strip():
                    w.write(json.dumps({"text": ln.strip()}, ensure_ascii=False) + "\n")
        result.append(dest)
    return result


def heldout_scores(run_dir: Path, text: str) -> dict:
    """bpb of the run's final weights on `text`: the peer's procedure, azllm eval's, and the
    peer's on the text with line breaks as spaces."""
    model, tok, _ = load_run(run_dir, "cpu")
    n_bytes = len(text.encode("utf-8"))

    def bpb(ids: list[int]) -> float:
        nll, _ = nll_of_ids(model, ids, batch_size=16, precision="fp32")
        return nll / math.log(2) / n_bytes

    flat = text.replace("\r\n", "  ").replace("\n", " ")
    return {
        "bpb": bpb(tok.encode(text)),
        "bpb_azllm_eval": bpb([tok.eos_id] + tok.encode(text)),
        "bpb_newlines_as_spaces": bpb(tok.encode(flat)),
    }


def run_peer(args, tok_path: Path, files: list[Path], seed: int, steps: int) -> dict:
    cmd = [
        sys.executable, str(args.peer), "--nanogpt-dir", str(args.nanogpt_dir),
        "--tokenizer", str(tok_path), "--train", *map(str, files), "--heldout", str(args.heldout),
        "--minutes", "100000", "--max-steps", str(steps), "--n-layer", str(args.n_layer),
        "--n-head", str(args.n_head), "--n-embd", str(args.n_embd),
        "--block-size", str(args.block_size), "--batch", str(args.batch), "--lr", str(args.lr),
        "--precision", args.precision, "--seed", str(seed),
    ]  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"peer script failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "bpb": r["heldout_bpb"],
        "tokens": r["tokens_seen"],
        "tok_per_s_train": r["tok_per_s"],
        "wall_s": wall,  # the whole process: tokenizing the files and the held-out eval too
        "train_s": r["tokens_seen"] / r["tok_per_s"],
    }


def azllm_config(arm: str, args, seed: int, tokens: int, vocab: int):
    cfg = load_config("baby")
    if arm == "default":  # a candidate default, when asked for
        cfg = apply_overrides(cfg, args.default_set)
    m, tc = cfg.model, cfg.train
    m.vocab_size = vocab
    # The shape is the comparison's (baby's by default), the same for every arm.
    m.n_layer, m.n_head, m.n_embd, m.block_size = (
        args.n_layer, args.n_head, args.n_embd, args.block_size,
    )  # fmt: skip
    if arm == "default":  # everything else as the preset and the config defaults say now
        per_step = tc.micro_batch * tc.grad_accum * m.block_size
    else:
        m.arch = "gpt2" if arm == "gpt2" else "llama"
        m.qk_norm, tc.optimizer = False, "adamw"  # the recipe before issue 13 (the presets' now)
        tc.micro_batch, tc.grad_accum = args.batch // args.grad_accum, args.grad_accum
        tc.lr, tc.warmup_steps, tc.min_lr_ratio = args.lr, args.warmup, 0.1
        tc.precision = args.precision
        per_step = args.batch * args.block_size
    tc.max_steps = max(1, round(tokens / per_step))
    tc.seed, tc.device = seed, "cpu"
    return cfg


def run_azllm(arm: str, args, data_dir: Path, work: Path, seed: int, tokens: int, vocab: int):
    cfg = azllm_config(arm, args, seed, tokens, vocab)
    run_dir = work / f"run-{arm}-{seed}"
    t0 = time.perf_counter()
    last = train(cfg, data_dir, run_dir, progress=False)
    wall = time.perf_counter() - t0
    tc, m = cfg.train, cfg.model
    done = last["step"] * tc.micro_batch * tc.grad_accum * m.block_size
    return {
        "tokens": done,
        "tok_per_s_train": last.get("tok_per_s"),  # over the last log interval, training only
        "wall_s": wall,
        "recipe": {
            "arch": m.arch,
            "shape": [m.n_layer, m.n_head, m.n_embd, m.block_size],
            "optimizer": tc.optimizer,
            "lr": tc.lr,
            "warmup": tc.warmup_steps,
            "batch": tc.micro_batch * tc.grad_accum,
            "steps": tc.max_steps,
            "precision": tc.precision,
            "qk_norm": m.qk_norm,
            "tie": m.tie_embeddings,
        },  # fmt: skip
        **heldout_scores(run_dir, read_text_file(args.heldout)),
    }


def _value(raw: str):
    """A --default-set value as JSON where it parses (3e-3, true), else the string (muon)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("bpb", "bpb_azllm_eval", "bpb_newlines_as_spaces", "wall_s", "tok_per_s"):
        vals = [r[key] for r in rows if r.get(key) is not None]
        if vals:
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[key] = (statistics.mean(vals), sd)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder or files of Azerbaijani text")
    p.add_argument("--heldout", required=True, help="held-out text; excluded from training")
    p.add_argument("--nanogpt-dir", default=os.environ.get("NANOGPT_DIR"))
    p.add_argument("--peer", type=Path, default=PEER, help="the peer script")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337, help="first seed")
    p.add_argument("--steps", type=int, default=370, help="steps of --batch x --block-size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=2, help="azllm adamw/gpt2 arms (baby's)")
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--block-size", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--val-fraction", type=float, default=0.05, help="azllm's own val split")
    p.add_argument("--per-line-docs", action="store_true", help="the old per-line documents")
    p.add_argument(
        "--default-set",
        nargs="*",
        default=[],
        help="overrides for the default arm only (a candidate default): train.optimizer=muon",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (peer: same)")
    p.add_argument("--work", default=None, help="keep tokenizer, shards and runs here")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    args.default_set = {k: _value(v) for k, _, v in (i.partition("=") for i in args.default_set)}
    arms = [a for a in args.arms.split(",") if a]
    if bad := [a for a in arms if a not in ARMS]:
        p.error(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    if "nanogpt" in arms and not (args.nanogpt_dir and Path(args.nanogpt_dir, "model.py").exists()):
        p.error("--nanogpt-dir: a folder holding karpathy/nanoGPT's model.py (outside the repo)")
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the peer subprocess
    args.heldout = Path(args.heldout).resolve()

    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="azllm-quality-")
        work = Path(tmp.name)
    try:
        files = [f for f in text_files([args.data]) if f.resolve() != args.heldout]
        print(f"training files: {', '.join(f.name for f in files)}; held out: {args.heldout.name}")
        docs = (d for f in files for d in iter_documents(f))
        tok = AzTokenizer(train_tokenizer(docs, args.vocab_size))
        tok_path = work / "tokenizer.json"
        tok.save(tok_path)
        shard_inputs = per_line_copy(files, work / "per-line") if args.per_line_docs else files
        meta = tokenize_to_shards(
            tok, shard_inputs, work / "data", val_fraction=args.val_fraction, force=True,
            progress=False,
        )  # fmt: skip
        tr = meta["splits"]["train"]
        print(f"shards: {tr['tokens']:,} train tokens in {tr['documents']:,} documents")
        tokens = args.steps * args.batch * args.block_size
        print(f"{tokens:,} training tokens per arm ({args.steps} x {args.batch}x{args.block_size})")

        results: dict[str, list[dict]] = {a: [] for a in arms}
        for s in range(args.seeds):
            seed = args.seed + s
            for arm in arms:  # arms take turns per seed, so machine load falls on all alike
                if arm == "nanogpt":
                    r = run_peer(args, tok_path, files, seed, args.steps)
                else:
                    r = run_azllm(arm, args, work / "data", work, seed, tokens, tok.vocab_size)
                r["seed"] = seed
                r["tok_per_s"] = r["tokens"] / r["wall_s"]
                results[arm].append(r)
                if args.json:  # after every run: a long comparison stopped early keeps its rows
                    doc = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
                    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
                extra = (
                    f", azllm eval {r['bpb_azllm_eval']:.4f}, newlines as spaces "
                    f"{r['bpb_newlines_as_spaces']:.4f}"
                    if "bpb_azllm_eval" in r
                    else ""
                )
                print(
                    f"  {arm:<8} seed {seed}: held-out {r['bpb']:.4f} bpb{extra}; "
                    f"{r['tokens']:,} tokens, {r['wall_s']:.0f} s wall, "
                    f"{r['tok_per_s']:,.0f} tok/s",
                    flush=True,
                )

        summ = {a: summary(rs) for a, rs in results.items()}
        print(f"\n{'arm':<8} {'held-out bpb':>16} {'azllm eval':>16} {'no newlines':>16} "
              f"{'wall s':>12} {'tok/s (wall)':>14}")  # fmt: skip
        for a, sm in summ.items():
            cells = [
                f"{sm[k][0]:.4f} ± {sm[k][1]:.4f}" if k in sm else "-"
                for k in ("bpb", "bpb_azllm_eval", "bpb_newlines_as_spaces")
            ]
            print(
                f"{a:<8} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} "
                f"{sm['wall_s'][0]:>12.0f} {sm['tok_per_s'][0]:>14,.0f}"
            )
        print(
            f"(mean ± stdev over {args.seeds} seed(s); held-out bpb: the peer's procedure for all "
            "arms; wall: whole training call or peer process, shared machine)"
        )
        if "nanogpt" in summ:
            for a in arms:
                if a != "nanogpt":
                    ratio = summ[a]["bpb"][0] / summ["nanogpt"]["bpb"][0]
                    wall = summ[a]["wall_s"][0] / summ["nanogpt"]["wall_s"][0]
                    print(f"{a}/nanogpt: bpb {ratio:.3f}x (target <= 0.90), wall {wall:.2f}x")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
