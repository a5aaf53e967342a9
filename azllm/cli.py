"""`azllm` command line: argument parsing and dispatch only.

Every command's work lives in its own module; users' mistakes arrive here as AzllmError and are
printed on one line with exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from azllm.chat.cli import run_flags, sampling_flags
from azllm.config import ARCHS, OPTIMIZER_STATES, OPTIMIZERS, PRECISIONS, STRATEGIES
from azllm.errors import AzllmError

# Flags of `azllm train` that override config fields: flag -> "section.field".
TRAIN_OVERRIDES = {
    "max_steps": "train.max_steps",
    "micro_batch": "train.micro_batch",
    "grad_accum": "train.grad_accum",
    "global_batch": "train.global_batch",
    "lr": "train.lr",
    "warmup_steps": "train.warmup_steps",
    "precision": "train.precision",
    "eval_interval": "train.eval_interval",
    "eval_batches": "train.eval_batches",
    "log_interval": "train.log_interval",
    "ckpt_interval": "train.ckpt_interval",
    "keep_last": "train.keep_last",
    "seed": "train.seed",
    "device": "train.device",
    "compile": "train.compile",
    "activation_checkpointing": "train.activation_checkpointing",
    "strategy": "train.strategy",
    "optimizer_state": "train.optimizer_state",
    "optimizer": "train.optimizer",
    "chunked_ce": "train.chunked_ce",
    "block_size": "model.block_size",
    "arch": "model.arch",
    "qat": "train.qat",
    "lora_rank": "train.lora_rank",
    "lora_alpha": "train.lora_alpha",
    "lora_targets": "train.lora_targets",
    "qlora": "train.qlora",
}


def _parse_set(items: list[str]) -> dict:
    """--set model.n_layer=4 train.lr=3e-4: values parsed as JSON where they can be."""
    out = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or "." not in key:
            raise AzllmError(f"--set {item}: expected section.key=value, e.g. model.n_layer=4")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def cmd_tokenizer_train(args) -> int:
    from azllm.documents import iter_all_documents
    from azllm.tokenizer import AzTokenizer, train_tokenizer

    docs, out, spm_model = iter_all_documents(args.input, train_only=True), Path(args.out), None
    if args.kind == "bpe":
        t = train_tokenizer(
            docs, args.vocab_size, min_frequency=args.min_frequency, show_progress=True
        )
    else:
        from azllm.tokenizer_spm import train_sentencepiece

        t, spm_model = train_sentencepiece(docs, args.vocab_size, args.kind)
    tok = AzTokenizer(t)
    if spm_model is not None:  # sentencepiece's own file beside it (azllm reads either)
        from azllm.atomic import atomic_write_bytes

        atomic_write_bytes(out.with_suffix(".model"), spm_model)
    tok.save(out)
    print(f"wrote {args.out}: {tok.vocab_size} tokens (sha256 {tok.sha256()[:12]})")
    return 0


def cmd_tokenizer_stats(args) -> int:
    from azllm.documents import iter_all_documents
    from azllm.tokenizer import load_tokenizer, tokenizer_stats

    if len(args.tokenizer) > 1:  # kinds side by side on the same text
        rows = {
            t: tokenizer_stats(load_tokenizer(t), iter_all_documents(args.text))
            for t in args.tokenizer
        }
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'tokenizer':40} {'kind':22} {'vocab':>7} {'tokens/word':>11} {'bytes/token':>11}")
        for t, r in rows.items():
            kind, fert, bpt = load_tokenizer(t).kind, r["fertility"], r["bytes_per_token"]
            print(f"{t[-40:]:40} {kind:22} {r['vocab_size']:7,} {fert:11.3f} {bpt:11.3f}")
        return 0
    stats = tokenizer_stats(load_tokenizer(args.tokenizer[0]), iter_all_documents(args.text))
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(f"words {stats['words']:,}  tokens {stats['tokens']:,}  bytes {stats['bytes']:,}")
        print(f"fertility (tokens/word)  {stats['fertility']:.3f}")
        print(f"bytes per token          {stats['bytes_per_token']:.3f}")
        print(
            f"vocabulary used          {stats['vocab_used']:,} of {stats['vocab_size']:,} "
            f"({100 * stats['vocab_used_fraction']:.1f}%)"
        )
    return 0


def cmd_tokenize(args) -> int:
    from azllm.shards import tokenize_to_shards
    from azllm.tokenizer import load_tokenizer

    meta = tokenize_to_shards(
        load_tokenizer(args.tokenizer),
        args.input,
        Path(args.out),
        val_fraction=args.val_fraction,
        force=args.force,
    )
    for split, info in meta["splits"].items():
        print(
            f"{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
            f"{info['bytes']:,} bytes in {len(info['shards'])} shard(s)"
        )
    print(f"wrote {args.out}/meta.json ({meta['dtype']})")
    return 0


def cmd_model_summary(args) -> int:
    from azllm.config import apply_overrides, load_config
    from azllm.model import GPT

    cfg = apply_overrides(load_config(args.config), _parse_set(args.set))
    model = GPT(cfg.model)
    rows = model.summary_rows()
    width = max(len(r[0]) for r in rows)
    print(f"{'parameter':<{width}}  {'shape':>14}  {'count':>12}")
    for name, shape, n in rows:
        print(f"{name:<{width}}  {shape:>14}  {n:>12,}")
    total = model.num_params()
    emb = model.embed.weight.numel()
    print(
        f"total {total:,} ({total / 1e6:.1f}M); without token embeddings {total - emb:,}; "
        f"{model.flops_per_token() / 1e6:.1f} MFLOP per training token"
    )
    m = cfg.model
    if m.n_experts:  # MoE: what a token uses vs what memory holds
        active = model.num_active_params()
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        print(
            f"MoE: {m.n_experts} experts x {m.n_layer} layers, {m.experts_per_token} per token: "
            f"active {active:,} ({active / 1e6:.1f}M) of {total:,} per token; experts hold "
            f"{experts:,} parameters = {experts * 4 / 2**20:.1f} MiB in fp32"
        )
    return 0


def cmd_train(args) -> int:
    from azllm.config import apply_overrides, load_config
    from azllm.train import train

    cfg = apply_overrides(load_config(args.config), _overrides(args))
    if args.vram:
        cfg = _apply_vram_plan(cfg, args.vram, Path(args.data))
    last = train(
        cfg, Path(args.data), Path(args.out), resume=args.resume, task_eval=_task_eval(args, cfg)
    )
    _report(last, args.out)
    return 0


def _task_eval(args, cfg, chat: bool = False):
    """--eval-tasks PATH... --eval-tasks-every N (default: the validation interval)."""
    if not args.eval_tasks:
        return None
    from azllm.evaluate.training import TaskEval

    every = cfg.train.eval_interval if args.eval_tasks_every is None else args.eval_tasks_every
    return TaskEval(args.eval_tasks, every, chat=chat, limit=args.eval_tasks_limit)


def _apply_vram_plan(cfg, vram: str, data_dir: Path):
    """`azllm train --vram 4GB`: micro-batch, accumulation and memory savers from azllm plan,
    keeping the configured global batch."""
    import os

    from azllm.config import apply_overrides
    from azllm.device import resolve_device
    from azllm.memory import fmt_bytes
    from azllm.plan import make_plan, parse_vram
    from azllm.shards import read_meta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = apply_overrides(cfg, {"model.vocab_size": read_meta(data_dir)["vocab_size"]})
    tc = cfg.train
    target = tc.global_batch or tc.micro_batch * tc.grad_accum * world
    plan = make_plan(
        cfg,
        parse_vram(vram),
        target_global_batch=target,
        precision=tc.precision,
        device_type=resolve_device(tc.device).type,
        world=world,
        strategy=tc.strategy,
    )
    if not plan.fits:
        raise AzllmError(
            f"--vram {vram}: this config does not fit; the smallest budget that "
            f"fits is {fmt_bytes(plan.min_vram_bytes)} (see `azllm plan`)"
        )
    print(
        f"plan for {vram}: micro-batch {plan.micro_batch} x accumulation {plan.grad_accum}, "
        f"checkpointing {'on' if plan.activation_checkpointing else 'off'}, "
        f"optimizer states {plan.optimizer_state}, chunked CE {plan.chunked_ce or 'off'}, "
        f"estimated peak {fmt_bytes(plan.estimated_peak_bytes)}"
    )
    return apply_overrides(
        cfg,
        {
            "train.micro_batch": plan.micro_batch,
            "train.grad_accum": plan.grad_accum,
            "train.global_batch": 0,
            "train.activation_checkpointing": plan.activation_checkpointing,
            "train.chunked_ce": plan.chunked_ce,
            "train.optimizer_state": plan.optimizer_state,
            "train.precision": tc.precision if plan.precision == "auto" else plan.precision,
        },
    )


def cmd_qat(args) -> int:
    from azllm.qat import qat

    last = qat(
        Path(args.run),
        Path(args.data),
        Path(args.out),
        args.qat,
        steps=args.steps,
        overrides=_overrides(args),
        resume=args.resume,
        task_eval=_task_eval(args, _sft_config_for_tasks(args)),  # the quantized model's
    )
    _report(last, args.out)
    return 0


def cmd_sft(args) -> int:
    from azllm.chat.sft import sft

    last = sft(
        Path(args.run),
        args.data,
        Path(args.out),
        overrides=_overrides(args),
        resume=args.resume,
        val_fraction=args.val_fraction,
        pack=args.pack,
        epochs=args.epochs,
        task_eval=_task_eval(args, _sft_config_for_tasks(args), chat=True),
    )
    _report(last, args.out)
    return 0


def cmd_dpo(args) -> int:
    from azllm.chat.dpo import DPOSettings, dpo

    if args.eval_tasks:
        raise AzllmError("--eval-tasks: not with dpo; run azllm eval --tasks on the run after")
    settings = DPOSettings(args.loss, args.beta, args.label_smoothing, args.gamma_ratio)
    last = dpo(
        Path(args.run),
        args.data,
        Path(args.out),
        settings,
        overrides=_overrides(args),
        resume=args.resume,
        val_fraction=args.val_fraction,
        epochs=args.epochs,
    )
    if "val_reward_acc" in last:
        print(
            f"done: step {last['step']}, held-out {args.loss} loss {last['val_loss']:.4f}, "
            f"reward accuracy {last['val_reward_acc']:.3f}; run in {args.out}"
        )
    return 0


def cmd_pairs(args) -> int:
    from azllm.chat.cli import sampling_from_args
    from azllm.chat.pairs import pairs_command

    stats = pairs_command(
        Path(args.run),
        args.data,
        Path(args.out),
        samples=args.samples,
        max_similarity=args.max_similarity,
        sampling=sampling_from_args(args),
        device=args.device,
        precision=args.precision,
        weights=args.weights,
        batch_size=args.batch_size,
        force=args.force,
    )
    print(
        f"{stats.written} pairs from {stats.prompts} conversations ({stats.sampled} samples; "
        f"dropped {stats.too_similar} too similar to the reference, {stats.duplicates} "
        f"repeated, {stats.too_long} prompts too long); wrote {args.out}"
    )
    return 0


def _sft_config_for_tasks(args):
    """The interval --eval-tasks-every defaults to, for sft (the base run's, overridden)."""
    if not args.eval_tasks or args.eval_tasks_every is not None:
        return None
    from azllm.config import apply_overrides, load_run_config

    return apply_overrides(load_run_config(Path(args.run)), _overrides(args))


def _report(last: dict, out: str) -> None:
    if "val_bpb" in last:
        print(
            f"done: step {last['step']}, val loss {last['val_loss']:.4f}, "
            f"{last['val_bpb']:.3f} bits per byte; run in {out}"
        )


def cmd_generate(args) -> int:
    from azllm.chat.cli import sampling_from_args
    from azllm.checkpoint import load_run
    from azllm.device import resolve_device, resolve_precision
    from azllm.generate import StreamDecoder, generate

    sampling = sampling_from_args(args)  # bad flags fail here, before the model loads
    if args.num_samples < 1:
        raise AzllmError(f"--num-samples must be an integer >= 1, got {args.num_samples}")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    model, tok, _ = load_run(Path(args.run), device, args.weights)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    stream = len(ids) == 1 and not args.no_stream
    decoder = StreamDecoder(tok.decode)
    if stream:
        print(prompts[0], end="", flush=True)
    outs = generate(
        model,
        ids,
        sampling,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        use_cache=not args.no_cache,
        precision=precision,
        on_token=(lambda _, t: print(decoder.push(t), end="", flush=True)) if stream else None,
    )
    if stream:
        print()
    else:
        for i, (p, out) in enumerate(zip(prompts, outs, strict=True)):
            print(f"--- sample {i + 1}\n{p}{tok.decode(out)}")
    return 0


def cmd_eval(args) -> int:
    if args.compare:
        return _eval_compare(args)
    if bool(args.text) == bool(args.tasks):
        raise AzllmError("azllm eval needs --text FILE (bits per byte) or --tasks PATH|NAME")
    if args.tasks:
        return _eval_tasks(args)
    from azllm.evaluate import evaluate_text, read_text_file

    if args.hf:
        raise AzllmError("--text with --hf: bits per byte runs on --run or --gguf")
    if args.gguf:  # the same measure computed by llama.cpp (a quantized file's loss of quality)
        from azllm.export.gguf import gguf_eval

        res = gguf_eval(args.gguf, args.text)
    elif not args.run:
        raise AzllmError("azllm eval needs --run RUN (our model) or --gguf FILE (llama.cpp)")
    else:
        from azllm.checkpoint import load_run
        from azllm.device import resolve_device, resolve_precision

        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        text = read_text_file(Path(args.text))
        model, tok, _ = load_run(Path(args.run), device, args.weights)
        res = evaluate_text(model, tok, text, batch_size=args.batch_size, precision=precision)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{args.text}: loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f}, "
            f"{res['bpb']:.4f} bits per byte ({res['tokens']:,} tokens, {res['bytes']:,} bytes)"
        )
    return 0


def _eval_tasks(args) -> int:
    """azllm eval --tasks: accuracy with chance and interval; report cards in RUN/eval/."""
    from azllm.evaluate.backends import open_backend
    from azllm.evaluate.harness import evaluate_tasks
    from azllm.evaluate.report import markdown, subject_table
    from azllm.evaluate.tasks import load_tasks

    for flag, v in (("--shots", args.shots), ("--limit", args.limit)):
        if v is not None and v < 0:
            raise AzllmError(f"{flag} {v}: must be 0 or more")
    for spec in args.tasks:  # bad task files fail before a model is loaded
        load_tasks(spec)
    device, precision = "cpu", "fp32"
    if args.run or args.hf:
        from azllm.device import resolve_device, resolve_precision

        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
    backend, name, default_out = open_backend(
        run=args.run,
        hf=args.hf,
        gguf=args.gguf,
        device=device,
        weights=args.weights,
        precision=precision,
    )
    try:
        summaries = evaluate_tasks(
            backend,
            args.tasks,
            model=name,
            shots=args.shots or 0,
            chat=args.chat,
            limit=args.limit or None,
            out_dir=Path(args.out) if args.out else default_out,
            progress=not args.json and sys.stderr.isatty(),
        )
    finally:
        if hasattr(backend, "close"):
            backend.close()
    if args.json:
        for s in summaries:
            print(json.dumps(s, ensure_ascii=False))
        return 0
    print(markdown(summaries))
    for s in summaries:
        print(f"\n{s['task']} by subject:\n{subject_table(s)}")
    print(f"\nreport cards: {Path(summaries[0]['records_file']).parent}" if summaries else "")
    return 0


def _eval_compare(args) -> int:
    from azllm.evaluate.report import compare_markdown, compare_runs

    rows = compare_runs(args.compare)  # each run against the first
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(compare_markdown(args.compare, rows))
    return 0


def cmd_import_hf(args) -> int:
    from azllm.hf_import import import_hf

    out, m = import_hf(Path(args.path), Path(args.out), context=args.context, force=args.force)
    print(
        f"imported {m.n_layer} layers x {m.n_embd} wide (vocab {m.vocab_size}, context "
        f"{m.block_size}) into {out}; try: azllm chat --run {out}"
    )
    return 0


def cmd_merge(args) -> int:
    from azllm.lora import merge_run

    base = Path(args.base) if args.base else None
    out = merge_run(Path(args.run), Path(args.out), base=base, force=args.force)
    print(f"merged {args.run}'s adapters into a plain run: {out}")
    return 0


def cmd_quickstart(args) -> int:
    from azllm.quickstart import quickstart

    quickstart(Path(args.out), minutes=args.minutes, force=args.force)
    return 0


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--eval-tasks", nargs="+", help="log task accuracy (azllm eval --tasks) while training"
    )
    p.add_argument("--eval-tasks-every", type=int, default=None, help="steps (default: eval)")
    p.add_argument("--eval-tasks-limit", type=int, default=None, help="questions per task")
    for flag in (
        "max_steps",
        "micro_batch",
        "grad_accum",
        "global_batch",
        "warmup_steps",
        "eval_interval",
        "eval_batches",
        "log_interval",
        "ckpt_interval",
        "keep_last",
        "seed",
        "block_size",
        "chunked_ce",
    ):
        p.add_argument("--" + flag.replace("_", "-"), type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--arch", choices=ARCHS)
    p.add_argument("--strategy", choices=STRATEGIES, help="under torchrun")
    p.add_argument("--optimizer-state", choices=OPTIMIZER_STATES)
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="muon: Muon for the blocks' matrices")
    p.add_argument("--device")
    p.add_argument("--lora-rank", type=int, help="LoRA adapters of this rank, base frozen")
    p.add_argument("--lora-alpha", type=float, help="adapter scale alpha/rank (default 16)")
    p.add_argument("--lora-targets", help="layers to adapt: q,k,v,o,gate,up,down (default all)")
    p.add_argument("--qlora", action="store_true", default=None, help="4-bit base (CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None
    )
    p.add_argument(
        "--qat",
        metavar="TYPE",
        help="quantization-aware training for a GGUF type (q4_0, q8_0): the forward pass "
        "sees the weights as llama.cpp will read them from the export",
    )
    p.add_argument("--set", nargs="*", help="any config field: model.n_layer=4 train.beta2=0.99")


def _overrides(args) -> dict:
    overrides = {key: getattr(args, flag) for flag, key in TRAIN_OVERRIDES.items()}
    overrides.update(_parse_set(args.set))
    return {k: v for k, v in overrides.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    from azllm.chat.dpo import LOSSES as DPO_LOSSES
    from azllm.tokenizer import KINDS as TOKENIZER_KINDS

    parser = argparse.ArgumentParser(prog="azllm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tk = sub.add_parser("tokenizer", help="train or measure the BPE tokenizer")
    tks = tk.add_subparsers(dest="tokenizer_command", required=True)
    p = tks.add_parser("train", help="train a byte-level BPE on text files/folders")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument(
        "--kind",
        choices=TOKENIZER_KINDS,
        default="bpe",
        help="byte-level BPE, or SentencePiece (also writes OUT.model) BPE or unigram",
    )
    p.set_defaults(func=cmd_tokenizer_train)
    p = tks.add_parser("stats", help="fertility, bytes per token and vocabulary use on a text")
    p.add_argument("--tokenizer", nargs="+", required=True, help="one, or several to compare")
    p.add_argument("--text", nargs="+", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_tokenizer_stats)

    p = sub.add_parser("tokenize", help="text -> token shards for training")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_tokenize)

    md = sub.add_parser("model", help="inspect model configs")
    mds = md.add_subparsers(dest="model_command", required=True)
    p = mds.add_parser("summary", help="per-tensor parameter table and totals")
    p.add_argument("--config", required=True, help="preset (tiny, baby, small, az-100m) or TOML")
    p.add_argument("--set", nargs="*", help="overrides such as model.vocab_size=4096")
    p.set_defaults(func=cmd_model_summary)

    p = sub.add_parser("train", help="pretrain a model (also under torchrun for DDP)")
    p.add_argument("--config", required=True, help="preset (tiny, baby, small, az-100m) or TOML")
    p.add_argument("--data", required=True, help="folder written by azllm tokenize")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--vram", help="fit this memory budget (4GB): settings from azllm plan")
    _train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="fine-tune a pretrained run on dialogues (chat)")
    p.add_argument("--run", required=True, help="the pretrained run to start from")
    p.add_argument("--data", nargs="+", required=True, help="JSONL files or folders")
    p.add_argument("--out", required=True, help="the new chat run directory")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument(
        "--epochs",
        type=float,
        default=3.0,
        help="passes over the training rows (default 3); --max-steps overrides it",
    )
    p.add_argument(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="several conversations per row, each attending only to itself (default: on)",
    )
    _train_flags(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("dpo", help="preference-tune a chat run on chosen/rejected pairs")
    p.add_argument("--run", required=True, help="the chat (SFT) run to start from")
    p.add_argument("--data", nargs="+", required=True, help="JSONL pairs (TRL's forms)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--loss", default="sigmoid", choices=DPO_LOSSES)
    p.add_argument("--beta", type=float, default=0.1, help="strength (simpo: reward scale, ~2)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="sigmoid/robust: [0, 0.5)")
    p.add_argument("--gamma-ratio", type=float, default=0.5, help="simpo: margin / beta")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs")
    _train_flags(p)
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("pairs", help="preference pairs: reference answers vs the model's own")
    run_flags(p, threads=False)
    p.add_argument("--data", nargs="+", required=True, help="chat JSONL files or folders")
    p.add_argument("--out", required=True, help="pairs JSONL to write")
    p.add_argument("--samples", type=int, default=2, help="answers sampled per prompt")
    p.add_argument(
        "--max-similarity",
        type=float,
        default=0.9,
        help="drop a sample whose word similarity to the reference is at least this (0-1]",
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences sampled at once")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    sampling_flags(p)
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("qat", help="continue a run with quantization-aware training (GGUF)")
    p.add_argument("--run", required=True, help="the run whose weights to start from")
    p.add_argument("--data", required=True, help="token shards made with the run's tokenizer")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--steps", type=int, help="training steps (default: a tenth of the run's)")
    _train_flags(p)
    # --type is --qat under the name export uses: `azllm export gguf` of the run defaults to it
    p.add_argument("--type", dest="qat", required=True, metavar="TYPE", help="q4_0 or q8_0")
    p.set_defaults(func=cmd_qat)

    p = sub.add_parser("generate", help="sample text from a trained run")
    run_flags(p, threads=False)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    sampling_flags(p)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of a KV cache")
    p.add_argument("--no-stream", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "eval", help="bits per byte on a text, or accuracy on tasks (multiple choice, QA)"
    )
    run_flags(p, run_required=False, threads=False)
    p.add_argument("--gguf", help="evaluate a GGUF export with llama.cpp instead of --run")
    p.add_argument("--hf", help="evaluate an `azllm export hf` folder with transformers")
    p.add_argument("--text", help="bits per byte of this text file")
    p.add_argument("--tasks", nargs="+", help="task files/folders or a built-in name (az-basic)")
    p.add_argument("--shots", type=int, default=0, help="dev examples before each question")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each task")
    p.add_argument(
        "--chat", action="store_true", help="chat form: questions as user turns (SFT runs)"
    )
    p.add_argument("--out", help="report-card folder (default RUN/eval, DIR/eval, FILE.eval)")
    p.add_argument(
        "--compare", nargs="+", metavar="RUN", help="evaluated runs side by side, each vs the first"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quickstart", help="tokenizer + small model on the bundled corpus, on a CPU")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--minutes", type=float, default=4.0, help="time budget, tokenizer to samples")
    p.add_argument("--force", action="store_true", help="replace a non-quickstart --out")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("merge", help="fold a LoRA run's adapters into its base's weights")
    p.add_argument("--run", required=True, help="the LoRA run (azllm sft --lora-rank)")
    p.add_argument("--out", required=True, help="the new plain run directory")
    p.add_argument("--base", help="the base run (default: the path recorded in the LoRA run)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_merge)

    im = sub.add_parser("import", help="a Hugging Face model folder as a run")
    ims = im.add_subparsers(dest="import_command", required=True)
    p = ims.add_parser("hf", help="LlamaForCausalLM / Qwen2ForCausalLM (safetensors) -> RUN")
    p.add_argument("path", help="local folder: config.json, *.safetensors, tokenizer.json")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--context", type=int, default=0, help="block_size (0: the model's, <=4096)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_import_hf)

    # Commands that live with their room register themselves.
    from azllm.chat.cli import register as register_chat
    from azllm.corpus.cli import register as register_corpus
    from azllm.export.cli import register as register_export
    from azllm.plan import register as register_plan
    from azllm.rag.cli import register as register_rag
    from azllm.tune import register as register_tune

    register_chat(sub)
    register_corpus(sub)
    register_plan(sub)
    register_export(sub)
    register_tune(sub)
    register_rag(sub)
    return parser


def os_error_line(e: OSError) -> str:
    """One line for a filesystem refusal that no command turned into its own message: what the
    system said and the path, and what to do about the usual causes."""
    where = f"{e.filename}: " if e.filename else ""
    in_the_way = "a file is in the way of a folder of that name; move it or choose another path"
    hint = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EEXIST: in_the_way,
        errno.ENOTDIR: in_the_way,
        errno.EACCES: "no permission; choose a place you can write to",
        errno.EROFS: "read-only filesystem; choose a place you can write to",
    }.get(e.errno, "check the path")
    return f"{where}{e.strerror or e}; {hint}"


def _sigterm_raises(args) -> bool:
    """Commands that start no worker processes: SIGTERM raises there as Ctrl-C does, so a plain
    `kill` also removes their temporary files (atomic.terminate_raises). Not under torchrun: a
    rank blocked in a collective would then wait for torchrun's SIGKILL instead of ending."""
    import os

    from azllm.corpus.download import run_download
    from azllm.rag.cli import cmd_index

    single = (cmd_tokenizer_train, cmd_tokenize, cmd_train, cmd_sft, cmd_dpo, cmd_qat)
    single += (cmd_import_hf, cmd_merge, cmd_index, run_download)
    return args.func in single and os.environ.get("WORLD_SIZE", "1") == "1"


def main(argv: list[str] | None = None) -> int:
    from contextlib import nullcontext

    from azllm.atomic import terminate_raises

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with terminate_raises() if _sigterm_raises(args) else nullcontext():
            return args.func(args)
    except AzllmError as e:
        print(f"azllm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the filesystem said no (a file where a folder should be, full disk...)
        print(f"azllm: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("azllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # torchrun --nproc_per_node=K -m azllm.cli train ...
    sys.exit(main())
