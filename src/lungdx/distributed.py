"""Data-parallel training across processes: torchrun's environment in, one process group out.

``torchrun`` starts one process per GPU (or per share of a CPU machine) and gives each its ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR``/``MASTER_PORT``, which ``env://`` reads).
Without those variables nothing here starts anything: every helper answers as for a world of one
process and calls straight through, so single-process training is exactly what it was.

Backends: gloo on CPU, NCCL for CUDA tensors (with gloo beside it, which carries the Python objects).
``torch.nn.SyncBatchNorm`` runs on GPUs only in torch (both DDP's constructor and the layer refuse CPU
tensors), so on CPU each rank normalises with its own share of the batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int


_launch: Launch | None = None  # set by ``init``; LOCAL_RANK is not kept by torch.distributed itself
_alone = 0  # > 0 while rank 0 runs something for everyone (``run_on_main``): it then acts as a single process


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """torchrun's RANK, WORLD_SIZE and LOCAL_RANK; None when the process was not launched by torchrun."""
    environ = os.environ if environ is None else environ
    if not all(name in environ for name in ENV_VARS):
        return None
    try:
        return Launch(*(int(environ[name]) for name in ENV_VARS))
    except ValueError as err:
        raise ValueError(f"torchrun's {', '.join(ENV_VARS)} must be integers: {err}") from err


def _dist():
    """``torch.distributed`` while a process group is up, else None (never imports torch)."""
    if _alone:
        return None
    module = sys.modules.get("torch.distributed")
    if module is None or not module.is_available() or not module.is_initialized():
        return None
    return module


def active() -> bool:
    """True while this process belongs to an initialised process group."""
    return _dist() is not None


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def local_rank() -> int:
    """The rank on this machine (torchrun's LOCAL_RANK); the global rank when started otherwise."""
    if not active():
        return 0
    return _launch.local_rank if _launch is not None else rank()


def is_main() -> bool:
    """True on rank 0, the one process that writes the run folder (and in a single process)."""
    return rank() == 0


def is_local_main() -> bool:
    """True on each machine's first process."""
    return local_rank() == 0


def init(launch: Launch, timeout_s: float | None = None) -> None:
    """Join the process group of ``launch`` (``env://``): gloo, plus NCCL for CUDA tensors where CUDA is present."""
    global _launch
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        if launch.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {launch.local_rank} but only {torch.cuda.device_count()} GPU(s) here: "
                               "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(launch.local_rank)  # "cuda" now means this rank's GPU
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s is not None else {}
    dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, **timeout)
    _launch = launch
    logger.info("rank %d of %d (local rank %d), backend %s", launch.rank, launch.world_size, launch.local_rank, backend)


def teardown() -> None:
    """Leave the process group (a no-op without one)."""
    global _launch
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()
    _launch = None


@contextlib.contextmanager
def session(environ: Mapping[str, str] | None = None) -> Iterator[Launch | None]:
    """Join torchrun's process group for the block when launched by torchrun; otherwise do nothing.

    A process group that is already up (a caller made it) is used as it is and left up. After an
    exception the group is left at once (torchrun then stops the other ranks).
    """
    launch = launch_from_env(environ)
    if launch is None or active():
        yield launch
        return
    init(launch)
    try:
        yield launch
        barrier()  # no rank closes its connections while another still talks over them
    finally:
        teardown()


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself in a single process."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order; ``[obj]`` in a single process."""
    dist = _dist()
    if dist is None:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def run_on_main(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on rank 0 only, while the others wait; every rank returns its result.

    ``fn`` runs as in a single process (``active()`` is False inside it), so library code it calls,
    which would otherwise wait for the other ranks, does not.

    An exception on rank 0 is raised on every rank (the same type where it can be rebuilt from its
    message), so no rank waits for one that failed and every rank reports the same error.
    """
    if not active():
        return fn(*args, **kwargs)
    outcome = None
    if is_main():
        try:
            with _as_single_process():
                outcome = ("ok", fn(*args, **kwargs))
        except Exception as err:
            broadcast_object(("error", _failure(err)))
            raise
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise _rebuild(value, 0)
    return value


@contextlib.contextmanager
def _as_single_process() -> Iterator[None]:
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def run_where(runs: bool, fn: Callable[..., T], *args, **kwargs) -> T | None:
    """``fn`` on the ranks where ``runs`` is true (each as a single process) while the others wait.

    A failure is raised on every rank.

    Returns ``fn``'s result where it ran, None elsewhere.
    """
    if not active():
        return fn(*args, **kwargs) if runs else None
    result, failure = None, None
    if runs:
        try:
            with _as_single_process():
                result = fn(*args, **kwargs)
        except Exception as err:
            all_gather_object(_failure(err))
            raise
    for source, other in enumerate(all_gather_object(failure)):
        if other is not None:
            raise _rebuild(other, source)
    return result


def _failure(err: Exception) -> tuple[type, str]:
    """What travels to the other ranks: the exception's type (when it pickles) and its message."""
    try:
        pickle.dumps(type(err))
        return type(err), str(err)
    except (pickle.PicklingError, AttributeError, TypeError):
        return RuntimeError, f"{type(err).__name__}: {err}"


def _rebuild(failure: tuple[type, str], source: int) -> Exception:
    kind, message = failure
    text = f"(on rank {source}) {message}"
    try:
        return kind(text) if issubclass(kind, Exception) else RuntimeError(text)
    except Exception:  # an exception type whose constructor wants other arguments
        return RuntimeError(f"{kind.__name__} {text}")


def sync_batch_norm(model, device):
    """On CUDA, batch norm over the whole global batch (SyncBatchNorm); on CPU ``model`` unchanged.

    The converted layers keep the same parameters and buffers (and state_dict keys).
    """
    import torch

    if device.type != "cuda" or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def data_parallel(model, device, *, find_unused_parameters: bool = False):
    """``model`` wrapped in DistributedDataParallel (gradients averaged over the ranks at each step)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index if device.index is not None else _current_cuda()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def _current_cuda() -> int:
    import torch

    return torch.cuda.current_device()
