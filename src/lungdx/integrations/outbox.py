"""A folder-backed outbox: results wait on disk until delivered, retried with exponential backoff.

Each item is a folder ``pending/<id>/`` holding ``payload<suffix>`` and ``state.json`` (kind,
attempts, next attempt time, last error). Items appear atomically (written under ``tmp/`` and
renamed), so a crash or a restart never leaves half an item, and whatever is pending when the
listener stops is delivered after it starts again. Delivered items move to ``sent/``; an item a destination
refuses for good (``DeliveryError(permanent=True)``: a payload it will never take, whatever the retries)
moves to ``refused/`` with its last error, kept for a person to look at; every other failure is retried.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lungdx.io.files import write_atomic

logger = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """A destination is down or refused a payload; the item stays in the outbox.

    ``permanent``: the destination refused this payload for what it is (HTTP 400, 409, 422..., a C-STORE
    failure that is not "out of resources"), so sending it again gives the same answer: it goes to ``refused/``.
    """

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


PERMANENT_HTTP = frozenset({400, 405, 406, 409, 410, 411, 412, 413, 414, 415, 422})
"""HTTP answers about the payload itself, which a retry repeats. 401, 403 and 404 (credentials, a wrong URL),
408 and 429 (timeouts, rate limits) and 5xx are fixed on the other side, so those are retried."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s * 2**(attempts - 1)``, at most ``max_s``, between attempts."""

    base_s: float = 2.0
    max_s: float = 300.0

    def delay_s(self, attempts: int) -> float:
        return min(self.max_s, self.base_s * 2 ** max(0, attempts - 1))


@dataclass(frozen=True)
class Item:
    """One pending payload."""

    folder: Path
    kind: str
    payload: Path
    attempts: int
    next_attempt: float
    label: str


class Outbox:
    """Pending deliveries under ``folder`` (``pending/``, ``sent/``, ``tmp/``)."""

    def __init__(self, folder: str | Path, retry: RetryPolicy | None = None):
        self.folder = Path(folder)
        self.retry = retry or RetryPolicy()
        for name in ("pending", "sent", "refused", "tmp"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)

    def put(self, kind: str, payload: bytes, suffix: str, label: str) -> Item:
        """Queue ``payload`` for the destination ``kind`` (``dicom`` or ``fhir``); ``label`` names it in logs."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        staging = self.folder / "tmp" / name
        write_atomic(staging / f"payload{suffix}", payload)
        state = {"kind": kind, "attempts": 0, "next_attempt": 0.0, "label": label, "last_error": None}
        write_atomic(staging / "state.json", json.dumps(state).encode())
        staging.replace(self.folder / "pending" / name)
        return self._item(self.folder / "pending" / name)

    def pending(self) -> list[Item]:
        """Every pending item, oldest first."""
        folders = sorted(p for p in (self.folder / "pending").iterdir() if (p / "state.json").is_file())
        return [self._item(folder) for folder in folders]

    def due(self, now: float | None = None) -> list[Item]:
        """Pending items whose next attempt time has come."""
        now = time.time() if now is None else now
        return [item for item in self.pending() if item.next_attempt <= now]

    def delivered(self, item: Item) -> None:
        shutil.move(str(item.folder), str(self.folder / "sent" / item.folder.name))

    def refused(self, item: Item, error: str) -> None:
        """Move an item its destination refuses for good to ``refused/``, its error in ``state.json``."""
        state = {"kind": item.kind, "attempts": item.attempts + 1, "next_attempt": None, "label": item.label,
                 "last_error": error}
        write_atomic(item.folder / "state.json", json.dumps(state).encode())
        shutil.move(str(item.folder), str(self.folder / "refused" / item.folder.name))

    def failed(self, item: Item, error: str) -> float:
        """Record a failed attempt and schedule the next; returns the delay in seconds."""
        attempts = item.attempts + 1
        delay_s = self.retry.delay_s(attempts)
        state = {"kind": item.kind, "attempts": attempts, "next_attempt": time.time() + delay_s,
                 "label": item.label, "last_error": error}
        write_atomic(item.folder / "state.json", json.dumps(state).encode())
        return delay_s

    def deliver(self, senders: Mapping[str, Callable[[Path], None]], now: float | None = None) -> int:
        """Try every due item with the sender of its kind; returns how many were delivered.

        Any error of a sender (a PACS down, a refused SOP class, an unreadable payload) is a failed attempt of
        that item, retried after its backoff, unless it is a permanent refusal (``refused/``); the items behind it
        are still tried.
        """
        count = 0
        for item in self.due(now):
            sender = senders.get(item.kind)
            if sender is None:
                continue  # no destination of this kind configured (yet): the item waits
            try:
                sender(item.payload)
            except Exception as err:  # one bad item must not hold back the items behind it
                # A DeliveryError's text is lungdx's own (no patient data); any other error's text may quote the
                # payload's header values, so only its type is kept.
                error = str(err) if isinstance(err, DeliveryError) else f"{type(err).__name__} (payload not deliverable)"
                if getattr(err, "permanent", False):
                    self.refused(item, error)
                    logger.error("delivery of %s refused for good, kept in %s: %s", item.label,
                                 self.folder / "refused" / item.folder.name, error)
                    continue
                delay_s = self.failed(item, error)
                logger.warning("delivery of %s failed (attempt %d), retrying in %.0f s: %s",
                               item.label, item.attempts + 1, delay_s, error)
            else:
                self.delivered(item)
                logger.info("delivered %s", item.label)
                count += 1
        return count

    def _item(self, folder: Path) -> Item:
        state = json.loads((folder / "state.json").read_text())
        payload = next(p for p in folder.iterdir() if p.name.startswith("payload"))
        return Item(folder=folder, kind=state["kind"], payload=payload, attempts=int(state["attempts"]),
                    next_attempt=float(state["next_attempt"]), label=state["label"])
