"""Hardware choices: device, mixed precision, memory format, allocator.

Measured on the project's 2-core CPUs (see ``bench/train_throughput.py`` and
``shared/perf-notes.md``): channels_last helps convolutions on CPU and GPU; bf16 autocast helps
only on CPUs with native bf16 instructions (AVX512-BF16 or AMX), and slows down CPUs without
them, so ``auto`` turns it on only there; glibc's default allocator returns memory to the system
after every large tensor and spends a third of a training step page-faulting.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{name}' requested but CUDA is not available on this machine")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX, where bf16 autocast is measured faster."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        if device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning("%s autocast on a CPU without native bf16 (AVX512-BF16/AMX) is measured 5-8x "
                           "slower than fp32 here (bench/README.md); consider precision=auto", precision)
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision '{precision}' (use auto, fp32, bf16 or fp16)")
    if device.type == "cuda":
        # Native bf16 only (Ampere and later): with emulation counted, a T4 or V100 would say yes and run bf16
        # slowly instead of fp16 with loss scaling.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
"""The user-facing name of each autocast dtype (None: plain fp32)."""


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype`` (a no-op context for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(setting: str | bool = "auto") -> bool:
    """``auto`` and true-ish values turn channels_last on; ``off``/false turn it off."""
    if isinstance(setting, bool):
        return setting
    return str(setting).lower() not in ("off", "false", "no", "0")


def tune_allocator(max_arenas: int | None = None) -> bool:
    """Keep freed memory in the process (glibc ``mallopt``); returns False where unsupported.

    Sets M_MMAP_THRESHOLD and M_TRIM_THRESHOLD to 2^31-1 and M_TOP_PAD to 1 GiB, so that large
    activation buffers are reused rather than unmapped and page-faulted back in every step.
    ``max_arenas`` caps glibc's malloc arenas (M_ARENA_MAX): a server's many request threads would
    otherwise each get an arena (up to 8 per core) that keeps its peak for good, and with the
    thresholds above none is ever trimmed (``lungdx serve`` passes 2: the first concurrent round of
    ``bench/serve_load.py`` grew resident memory by 79 MB with 2 arenas against 137 MB without).
    Call once at program start, before threads start (the CLI does); it changes process-wide behaviour.
    """
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8
    options = [(m_mmap_threshold, 2**31 - 1), (m_trim_threshold, 2**31 - 1), (m_top_pad, 2**30)]
    if max_arenas is not None:
        options.append((m_arena_max, int(max_arenas)))
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(option, value) == 1 for option, value in options)
    except (OSError, AttributeError):
        return False
    logger.debug("glibc allocator tuned: %s", ok)
    return ok


def limit_blas_threads(threads: int = 1) -> bool:
    """Run numpy's BLAS (OpenBLAS) on ``threads`` threads in this process; False where threadpoolctl finds none.

    For the servers: OpenBLAS's worker threads busy-wait after each call, and a server that calls
    BLAS between two forward passes (a dot product in the monitor's statistics, a drift check) has
    them spinning on the cores torch's threads need. ``bench/serve_load.py`` on a 2-core AMD EPYC:
    monitoring on reached 0.55x of ``--db none``'s requests per second with numpy's default two
    BLAS threads, 0.74x with one (``OPENBLAS_NUM_THREADS=1``). torch's own kernels do not use numpy's
    BLAS, so inference is unchanged. Call once at program start (the CLI does for the servers).
    """
    import numpy  # noqa: F401  (its BLAS must be loaded to be limited)
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")
    return any(pool["user_api"] == "blas" for pool in threadpool_info())


@dataclass(frozen=True)
class Hardware:
    """Where and how tensors are computed: device, autocast dtype (None for fp32), memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto", channels_last: str | bool = "auto") -> Hardware:
        """Turn the user-facing settings (``auto``, ``cpu``, ``bf16``...) into concrete choices."""
        resolved = resolve_device(device)
        return cls(resolved, autocast_dtype(resolved, precision), use_channels_last(channels_last))

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``: what :meth:`autocast` computes in (recorded in checkpoints)."""
        return PRECISION_NAMES[self.amp_dtype]

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and memory format."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def autocast(self):
        """The autocast context for this hardware (a no-op for fp32)."""
        return autocast(self.device, self.amp_dtype)
