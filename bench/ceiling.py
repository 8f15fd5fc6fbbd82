"""The machine's ceiling for the throughput benchmarks: matmul FLOP/s per precision, and FLOP counts.

Shared by ``train_throughput.py`` and ``nodule_throughput.py`` (both import it from the folder they
run from). The ceiling is the rate of a 2048 x 2048 matmul, the best case for a CPU's vector units;
a model's share of it is its achieved FLOP/s (FLOPs counted by torch's FlopCounterMode: convolutions
and matmuls, forward and backward) over the ceiling of the precision it runs in. Measure the ceiling
in the same process, on the same threads, as the model it is compared with.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from lungdx.runtime import cpu_has_native_bf16

PRECISION_NAMES = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for an autocast dtype as ``lungdx.runtime`` gives it (None = fp32)."""
    return PRECISION_NAMES[amp_dtype]


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square matmul in ``dtype`` (median of ``repeats``, after one warm-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / sorted(times)[len(times) // 2]


def measure_ceilings(amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Matmul FLOP/s by precision name: fp32 always, bf16 where the CPU has it natively, and the
    precision of ``amp_dtype`` (the autocast ``lungdx.runtime`` chose), so that its share has a ceiling."""
    dtypes = [torch.float32]
    if cpu_has_native_bf16():
        dtypes.append(torch.bfloat16)
    if amp_dtype is not None and amp_dtype not in dtypes:
        dtypes.append(amp_dtype)
    return {precision_name(dtype): matmul_rate(dtype) for dtype in dtypes}


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs of one call of ``run`` (convolutions and matmuls, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()
