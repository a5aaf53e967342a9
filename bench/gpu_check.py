"""Every CUDA-only path of azllm, exercised once on a lent GPU, with figures (run by gpu_check.sh).

    python bench/gpu_check.py --out DIR        # writes DIR/gpu_check.json; prints a line per check

Checks (each independent: one failing does not stop the others):
- step_fp32/bf16/fp16: the real training step (step.TrainStep) on `baby`: finite loss, tokens/s;
  fp16 must run its GradScaler (scale reported), bf16 must not need one;
- fused_adamw: make_optimizer on CUDA picks torch's fused AdamW;
- flash_sdpa: forward + backward of `baby` in bf16 with SDPA restricted to the flash kernel;
- compile: torch.compile of the step's model: compile seconds and speed-up over eager (bf16);
- plan_4gb: az-100m at context 1024 in fp16 planned for a 4 GB card, then measured with
  torch.cuda.max_memory_allocated (plan.measure_peak): estimate / measured;
- decode: generate() tokens/s with the KV cache at batch 1 and 16 (bf16);
- train_cli: a real `train()` run on random shards, precision auto, then resumed.
Nothing here is a test: CI has no GPU. The figures go into bench/README.md by hand.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from azllm.batch import Batch
from azllm.config import apply_overrides, load_config
from azllm.generate import generate
from azllm.model import GPT
from azllm.optim import make_optimizer
from azllm.sampling import SamplingSettings
from azllm.step import TrainStep

DEV = torch.device("cuda")


def _step(precision: str, steps: int = 20, compile_on: bool = False) -> dict:
    cfg = load_config("baby")
    tc, mc = cfg.train, cfg.model
    torch.manual_seed(0)
    model = GPT(mc).to(DEV).train()
    opt = make_optimizer(model, tc, DEV)
    t0 = time.perf_counter()
    run = torch.compile(model) if compile_on else model
    step = TrainStep(
        run,
        opt,
        micro_batch=tc.micro_batch,
        grad_accum=1,
        grad_clip=tc.grad_clip,
        device=DEV,
        precision=precision,
    )
    g = torch.Generator().manual_seed(0)
    data = torch.randint(
        0, mc.vocab_size, (steps + 3, tc.micro_batch, mc.block_size + 1), generator=g
    )
    out: dict = {}
    for i in range(steps + 3):
        b = data[i].to(DEV)
        if i == 3:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        loss, _ = step(Batch(b[:, :-1], b[:, 1:]), tc.lr)
        if i == 0:
            torch.cuda.synchronize()
            out["first_step_s"] = time.perf_counter() - t0
    torch.cuda.synchronize()
    dt = time.perf_counter() - t_start
    out.update(
        loss=loss.item(),
        finite=bool(torch.isfinite(loss)),
        tok_per_s=steps * tc.micro_batch * mc.block_size / dt,
        scaler_enabled=step.scaler.is_enabled(),
        scale=step.scaler.get_scale() if step.scaler.is_enabled() else None,
        fused_adamw=bool(opt.defaults.get("fused")),
    )
    if not out["finite"]:
        raise RuntimeError(f"{precision}: loss {out['loss']}")
    if (precision == "fp16") != out["scaler_enabled"]:
        raise RuntimeError(f"{precision}: GradScaler enabled={out['scaler_enabled']}")
    return out


def check_flash() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = load_config("baby")
    model = GPT(cfg.model).to(DEV).train()
    x = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.block_size), device=DEV)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(x, x)  # raises if the flash kernel cannot run these inputs
    loss.backward()
    return {"loss": loss.item(), "flash_enabled": torch.backends.cuda.flash_sdp_enabled()}


def check_compile() -> dict:
    eager = _step("bf16", steps=30)
    compiled = _step("bf16", steps=30, compile_on=True)
    return {
        "compile_first_step_s": compiled["first_step_s"],
        "eager_tok_s": eager["tok_per_s"],
        "compiled_tok_s": compiled["tok_per_s"],
        "speedup": compiled["tok_per_s"] / eager["tok_per_s"],
    }


def check_plan() -> dict:
    from azllm.plan import make_plan, measure_peak, parse_vram

    cfg = apply_overrides(load_config("az-100m"), {"model.block_size": 1024})
    plan = make_plan(cfg, parse_vram("4GB"), precision="fp16", device_type="cuda")
    got = measure_peak(
        cfg,
        plan.micro_batch,
        precision=plan.precision,
        activation_checkpointing=plan.activation_checkpointing,
        device="cuda",
        optimizer_state=plan.optimizer_state,
        chunked_ce=plan.chunked_ce,
        grad_accum=min(plan.grad_accum, 2),
    )
    est = plan.breakdown["allocated"]
    return {
        "fits": plan.fits,
        "micro_batch": plan.micro_batch,
        "activation_checkpointing": plan.activation_checkpointing,
        "estimate_bytes": est,
        "max_memory_allocated": got["allocated"],
        "estimate_over_measured": est / got["allocated"],
        "device_used": got.get("device_used"),
    }


def check_decode() -> dict:
    cfg = load_config("baby")
    model = GPT(cfg.model).to(DEV).eval()
    out = {}
    for batch in (1, 16):
        prompts = [[1, 2, 3, 4]] * batch
        settings = SamplingSettings(temperature=0.0, max_new_tokens=180)
        generate(model, prompts, settings, precision="bf16")  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = generate(model, prompts, settings, precision="bf16")
        torch.cuda.synchronize()
        out[f"batch{batch}_tok_s"] = sum(map(len, got)) / (time.perf_counter() - t0)
    return out


def check_train_cli() -> dict:
    import numpy as np

    from azllm.shards import SHARD_FORMAT
    from azllm.tokenizer import AzTokenizer, train_tokenizer
    from azllm.train import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = [f"Bakı {i} Gəncə {i * 7} Şəki {i % 13} Lənkəran" for i in range(2000)]
        tok = AzTokenizer(train_tokenizer(text, 300))
        data = tmp / "data"
        data.mkdir()
        ids = np.random.default_rng(0).integers(16, tok.vocab_size, 200_000, dtype=np.uint16)
        ids[:100_000].tofile(data / "train_000.bin")
        ids[100_000:].tofile(data / "val_000.bin")
        split = {"tokens": 100_000, "bytes": 400_000, "documents": 1}
        meta = {
            "format": SHARD_FORMAT,
            "tokenizer_sha256": tok.sha256(),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": "uint16",
            "splits": {
                s: {**split, "shards": [{"file": f"{s}_000.bin", "tokens": 100_000}]}
                for s in ("train", "val")
            },
        }
        (data / "meta.json").write_text(json.dumps(meta))
        tok.save(data / "tokenizer.json")
        over = {"train.max_steps": 40, "train.ckpt_interval": 20, "train.eval_interval": 20}
        first = train(apply_overrides(load_config("tiny"), over), data, tmp / "run", progress=False)
        over["train.max_steps"] = 60
        cfg = apply_overrides(load_config("tiny"), over)
        resumed = train(cfg, data, tmp / "run", resume=True, progress=False)
        return {"first": first, "resumed": resumed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check_out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here")
    results = {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
    }
    checks = {
        "step_fp32": lambda: _step("fp32"),
        "step_bf16": lambda: _step("bf16"),
        "step_fp16": lambda: _step("fp16"),
        "fused_adamw": lambda: {"fused": _step("bf16", steps=2)["fused_adamw"]},
        "flash_sdpa": check_flash,
        "compile": check_compile,
        "plan_4gb": check_plan,
        "decode": check_decode,
        "train_cli": check_train_cli,
    }
    for name, fn in checks.items():
        t0 = time.perf_counter()
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as e:  # each check stands alone; the reason goes to the report
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        results[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps(results[name], default=str)}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    failed = [n for n in checks if not results[n]["ok"]]
    print(
        f"gpu_check: {len(checks) - len(failed)}/{len(checks)} ok"
        + (f"; failed {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
