"""Micro-batching, and the bounds that keep a burst of uploads from exhausting memory.

Requests that arrive while the model is busy, or within ``max_wait`` of each other, are stacked
into one batch of at most ``max_batch`` images. One worker thread runs the model, so the model is
never used by two threads at once, and the event loop never blocks on it. At most ``max_queue``
items wait for it. ``DecodePool`` runs at most ``slots`` decodes at once in threads of its own, so
that a burst of large images neither takes memory without bound nor the threads other routes need.
A request that finds no room gets ``Busy``, which the app answers 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)


class Busy(Exception):
    """No room for one more request now (no decoding slot in time, or the model's queue is full): retry later."""


class DecodePool:
    """Run at most ``slots`` calls at once, in ``slots`` threads of its own; a caller waits at most ``wait_s`` for one.

    A slot is given back when its call has finished in its thread, not when its caller stops waiting for it
    (a client that disconnects), so ``slots`` bounds the decodes really running.
    """

    def __init__(self, slots: int, wait_s: float):
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots, self.wait_s = slots, max(0.0, wait_s)
        self._free = asyncio.Semaphore(slots)
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="lungdx-decode")

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a pool thread once a slot is free; ``Busy`` when none frees within ``wait_s``."""
        try:
            async with asyncio.timeout(self.wait_s):
                await self._free.acquire()
        except TimeoutError:
            raise Busy(f"all {self.slots} image decoding slots stayed busy for {self.wait_s:g} s") from None
        loop = asyncio.get_running_loop()
        try:
            job = self._executor.submit(function, *args)
        except BaseException:
            self._free.release()
            raise
        job.add_done_callback(lambda _: _call_soon(loop, self._free.release))
        return await asyncio.wrap_future(job)

    def close(self) -> None:
        """Drop the calls not started yet and wait for the running ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], Any]) -> None:
    try:
        loop.call_soon_threadsafe(callback)  # asyncio.Semaphore belongs to the loop's thread
    except RuntimeError:  # the loop has closed: nobody waits for the slot any more
        pass


class MicroBatcher:
    """Collect submitted items into batches and run ``run_batch`` on them in a worker thread.

    A batch that raises runs again item by item, so only a request whose item fails alone gets the error.

    Args:
        run_batch: maps a list of items to a sequence of results, one per item, in order.
        max_batch: the most items per call (1 turns batching off: one call per request).
        max_wait_s: how long the first item of a batch waits for others; items already queued
            join at once, so under load batches fill without any waiting.
        on_batch: called with the size of every batch run (for metrics).
        max_queue: the most items waiting (not yet taken into a batch); ``submit`` raises ``Busy`` beyond it.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 16, max_wait_s: float = 0.005,
                 on_batch: Callable[[int], None] | None = None, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, got {max_batch} and {max_queue}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max(0.0, max_wait_s)
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungdx-model")

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._worker = asyncio.create_task(self._work(), name="lungdx-micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        """Queue one item and wait for its result (exceptions from ``run_batch`` are re-raised here).

        Raises:
            Busy: ``max_queue`` items are waiting already (the item is not queued).
        """
        if not self.running:
            raise RuntimeError("the micro-batcher is not running")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise Busy(f"{self.max_queue} images are already waiting for the model") from None
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [(item, future) for item, future in batch if not future.done()]  # clients that left
            if batch:
                await self._run(loop, batch)

    async def _run(self, loop, batch: list) -> None:
        items = [item for item, _ in batch]
        try:
            results = await loop.run_in_executor(self._executor, self.run_batch, items)
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        except Exception as err:  # the worker carries on
            if len(batch) > 1:  # one request's item must not fail the others: each runs again alone
                logger.error("batch of %d failed (%s); running its items one at a time", len(items), type(err).__name__)
                for one in batch:
                    await self._run(loop, [one])
                return
            logger.exception("an item failed alone")
            if not batch[0][1].done():
                batch[0][1].set_exception(err)
            return
        if self.on_batch is not None:
            self.on_batch(len(items))
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
