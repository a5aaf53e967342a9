"""Where and in which precision the model runs: device choice, autocast, matmul peak.

CUDA-only paths (fp16 + GradScaler, bf16, fused AdamW, flash attention) are selected here by
what the device supports, so the same training script runs unchanged on a CPU, a Turing card
such as the RTX 20xx desktop series (fp16 + GradScaler: no bf16), an RTX 2050 (Ampere GA107
despite its name: bf16) and an H100 (bf16).
"""

from __future__ import annotations

import contextlib
import re
import time
from functools import lru_cache
from pathlib import Path

import torch

from azllm.errors import AzllmError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AzllmError(
            f"--device {name}: CUDA is not available here (a CPU-only torch build, "
            "or no GPU); use --device cpu or install a CUDA build of torch"
        )
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AzllmError(f"--device {name}: not a device name (cpu, cuda, cuda:N)") from None


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: there bf16 autocast beats fp32 (matmuls ~2.7x, whole training steps
    1.7-2.2x for baby/small on this project's 2-core CPU; see bench/train_throughput.py)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")  # closed at once, not by GC
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    if device.type == "cuda":
        if precision == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise AzllmError("--precision bf16: this GPU has no bf16 (pre-Ampere); use fp16")
        return precision
    if precision == "fp16":
        raise AzllmError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
    if precision == "auto":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return precision


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """Mixed precision: weights stay fp32, matmuls run in bf16/fp16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, precision: str, seconds: float = 0.3) -> float:
    """FLOP/s of a large square matmul in the training precision: the MFU denominator.

    Measured rather than looked up, so MFU means the same on a laptop CPU and on an H100.
    """
    # 2048 on a CPU: at 1024 two threads spend much of the time in overhead and the peak comes
    # out ~40% low (MFU over 90% was seen); a 2048 matmul takes ~0.3 s on 2 cores.
    n = 4096 if device.type == "cuda" else 2048
    dtype = DTYPES[precision]
    g = torch.Generator(device=device).manual_seed(0)  # leaves the global RNG untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up: kernels picked, caches filled
    sync(device)
    iters, start = 0, time.perf_counter()
    while True:
        a @ b
        iters += 1
        if device.type == "cpu" or iters % 4 == 0:
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * n**3 * iters / elapsed


# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity): the
# denominator peers (nanoGPT, nanochat, PaLM's MFU) use. Cards not listed get no datasheet MFU.
# A key matches the device name where no letter or digit follows it, the longest key first:
# "NVIDIA L40" is not an L4, "NVIDIA H100 PCIe" not the SXM card.
DATASHEET_PEAKS = {
    "H200": 989.4e12,
    "H100": 989.4e12,  # SXM (and "H100 80GB HBM3")
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "V100": 125e12,  # fp16 only
    "T4": 65e12,  # fp16 only
}


def datasheet_peak(device: torch.device, precision: str) -> float | None:
    """The vendor's dense half-precision peak for this GPU, or None (CPU, fp32, unknown card)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(DATASHEET_PEAKS, key=len, reverse=True):
        if re.search(re.escape(key) + r"(?![0-9A-Za-z])", name):
            return DATASHEET_PEAKS[key]
    return None
