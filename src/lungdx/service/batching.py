"""Micro-batching: concurrent requests share one forward pass.

Requests that arrive while the model is busy, or within ``max_wait`` of each other, are stacked
into one batch of at most ``max_batch`` images. One worker thread runs the model, so the model is
never used by two threads at once, and the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)


class MicroBatcher:
    """Collect submitted items into batches and run ``run_batch`` on them in a worker thread.

    A batch that raises runs again item by item, so only a request whose item fails alone gets the error.

    Args:
        run_batch: maps a list of items to a sequence of results, one per item, in order.
        max_batch: the most items per call (1 turns batching off: one call per request).
        max_wait_s: how long the first item of a batch waits for others; items already queued
            join at once, so under load batches fill without any waiting.
        on_batch: called with the size of every batch run (for metrics).
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 16, max_wait_s: float = 0.005,
                 on_batch: Callable[[int], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max(0.0, max_wait_s)
        self.on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lungdx-model")

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
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
        """Queue one item and wait for its result (exceptions from ``run_batch`` are re-raised here)."""
        if not self.running:
            raise RuntimeError("the micro-batcher is not running")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
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
