"""``WriteBehind``: a bounded queue of log records, written in batches by one background thread.

The monitor puts a finished row on the queue and returns at once; the thread takes everything
waiting (up to a batch) and hands it to one ``write`` call, which inserts it in one transaction.
Two bounds limit what a crash can lose, and both push back on the producer instead of dropping:

- at most ``max_pending`` records are uncommitted (queued or being written) at any moment;
- no record is accepted while the oldest uncommitted one is ``max_delay_s`` old, so the records a
  crash loses were all accepted within one span of at most ``max_delay_s`` seconds.

A producer that meets a bound waits up to ``block_s``; then ``put`` raises ``LogQueueFull``, so an
answer is never given for a record that will not be written (the caller fails as it did when the
database refused a synchronous insert). Queued payloads may also carry bytes (archived pixels),
bounded by ``max_bytes``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

RETRY_FIRST_S, RETRY_MAX_S = 0.1, 5.0


BACKGROUND_NICE = 5
"""Niceness of the monitor's background threads (the log writer, the periodic check) on Linux: under load
they yield to the threads that answer requests, whose torch parallel regions wait for their slowest
thread, and still get about a quarter of a core each when every core is busy."""


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> bool:
    """Raise the calling thread's niceness by ``nice`` (Linux: threads are tasks); False where not possible."""
    if not sys.platform.startswith("linux") or nice <= 0:
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (OSError, AttributeError):
        return False
    return True


def _log_drop(payload: object, err: Exception) -> None:
    """``WriteBehind``'s default ``on_drop``: the error with its traceback, never the payload."""
    logger.error("monitoring log: a record cannot be written and is dropped", exc_info=err)


class LogQueueFull(RuntimeError):
    """The monitoring log is behind (its database does not take writes fast enough, or at all)."""


@dataclass
class Entry:
    """One queued record: the payload, its size in bytes beyond the row, and when it was accepted."""

    payload: object
    nbytes: int = 0
    accepted: float = field(default_factory=time.monotonic)


class WriteBehind:
    """Bounded write-behind queue; ``write(payloads)`` runs on one thread, in batches of up to ``batch_size``.

    Args:
        write: stores a batch; raising one of ``transient`` retries the same batch with backoff,
            raising anything else writes the batch's entries one by one and drops (logs, counts)
            those that still fail.
        on_done: called with the payloads of a batch after it is written (or dropped).
        on_drop: called with a payload and the error when it cannot be written and is dropped, to log
            it in the caller's words; the default logs the error with its traceback.
        nice: the writer thread's niceness above the process's (``lower_thread_priority``; 0 = as the process).
    """

    def __init__(self, write: Callable[[list], None], *, max_pending: int, max_delay_s: float, block_s: float,
                 batch_size: int, max_bytes: int, transient: tuple[type[BaseException], ...] = (),
                 on_done: Callable[[list], None] | None = None, on_drop: Callable[[object, Exception], None] | None = None,
                 name: str = "lungdx-log-writer", nice: int = 0):
        self._write, self._on_done, self._on_drop, self._transient = write, on_done, on_drop or _log_drop, transient
        self.max_pending, self.max_delay_s, self.block_s = max_pending, max_delay_s, block_s
        self.batch_size, self.max_bytes = batch_size, max_bytes
        self._condition = threading.Condition()
        self._queue: deque[Entry] = deque()
        self._in_flight: list[Entry] = []
        self._pending = self._pending_bytes = 0
        self.accepted = self.written = self.dropped = self.refused = self.batches = 0
        self._closing = False
        self._give_up_at: float | None = None
        self._nice = nice
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Records accepted and not yet committed (queued or being written)."""
        return self._pending

    def put(self, payload, nbytes: int = 0) -> None:
        """Queue one record; waits (back-pressure) while a bound is met, raises ``LogQueueFull`` after ``block_s``."""
        deadline = time.monotonic() + self.block_s
        with self._condition:
            while True:
                if self._closing:
                    raise RuntimeError("the monitoring log is closed")
                reason = self._full(nbytes)
                if reason is None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.refused += 1
                    logger.warning("monitoring log behind (%s) for %.1f s: prediction refused (%d refused so far)",
                                   reason, self.block_s, self.refused)
                    raise LogQueueFull(f"the monitoring log is behind ({reason}): its database takes no writes")
                self._condition.wait(min(remaining, 0.5))  # also wakes to re-read the oldest record's age
            self._queue.append(Entry(payload, nbytes))
            self._pending += 1
            self._pending_bytes += nbytes
            self.accepted += 1
            if len(self._queue) == 1:  # only an empty queue has a writer waiting for it: no wake-up per record
                self._condition.notify_all()

    def _full(self, nbytes: int) -> str | None:
        if self._pending >= self.max_pending:
            return f"{self._pending} records waiting"
        if self._pending_bytes and self._pending_bytes + nbytes > self.max_bytes:
            return f"{self._pending_bytes / 2**20:.0f} MiB of images waiting"
        oldest = self._in_flight[0] if self._in_flight else self._queue[0] if self._queue else None
        if oldest is not None and time.monotonic() - oldest.accepted >= self.max_delay_s:
            return f"the oldest record has waited {time.monotonic() - oldest.accepted:.1f} s"
        return None

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every record accepted before this call is written (or dropped); False on timeout."""
        if threading.current_thread() is self._thread:
            return self._pending == 0  # the writer never waits for itself
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._condition:
            target = self.accepted
            while self.written + self.dropped < target and self._thread.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
            return self.written + self.dropped >= target

    def close(self, timeout_s: float) -> bool:
        """Refuse new records, write every queued one, stop the thread; False when some could not be written in time."""
        with self._condition:
            self._closing = True
            self._give_up_at = time.monotonic() + timeout_s  # a database that stays down is not waited for longer
            self._condition.notify_all()
        self._thread.join(timeout_s + 1.0)
        if self._thread.is_alive() or self._pending:
            logger.error("monitoring log: %d records not written within %.0f s of closing; they are lost",
                         self._pending, timeout_s)
            return False
        return True

    # ------------------------------------------------------------------------------ the writer

    def _run(self) -> None:
        lower_thread_priority(self._nice)
        while True:
            with self._condition:
                while not self._queue and not self._closing:
                    self._condition.wait()
                if not self._queue:
                    return
                count = min(len(self._queue), self.batch_size)
                self._in_flight = [self._queue.popleft() for _ in range(count)]
            batch = self._in_flight
            written = self._store(batch)
            if self._on_done is not None:
                try:
                    self._on_done([entry.payload for entry in batch])
                except Exception:  # a failing follow-up (the periodic check) must not stop the writer
                    logger.exception("monitoring log: after-write step failed")
            with self._condition:
                self._in_flight = []
                self._pending -= len(batch)
                self._pending_bytes -= sum(entry.nbytes for entry in batch)
                self.written += written
                self.dropped += len(batch) - written
                self.batches += 1
                self._condition.notify_all()

    def _store(self, batch: list[Entry]) -> int:
        """Write a batch, retrying transient failures; returns how many entries were stored."""
        delay = RETRY_FIRST_S
        while True:
            try:
                self._write([entry.payload for entry in batch])
                return len(batch)
            except self._transient as err:
                if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                    logger.error("monitoring log: %d records not written at close: %s", len(batch), err)
                    return 0
                logger.warning("monitoring log: write of %d records failed (%s); retrying in %.1f s", len(batch), err, delay)
                time.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
            except Exception as err:
                if len(batch) > 1:
                    return sum(self._store([entry]) for entry in batch)
                try:
                    self._on_drop(batch[0].payload, err)
                except Exception:  # a failing hook must not stop the writer: its error, with the record's as context
                    logger.exception("monitoring log: a record cannot be written and is dropped")
                return 0
