"""A folder-backed outbox: results wait on disk until delivered, retried with exponential backoff.

Each item is a folder ``pending/<id>/`` holding ``payload<suffix>`` and ``state.json`` (kind,
attempts, next attempt time, last error, what the destination said where it did). Items appear atomically
(written under ``tmp/`` and renamed), so a crash or a restart never leaves half an item, and whatever is pending when the
listener stops is delivered after it starts again. Delivered items move to ``sent/``; an item a destination
refuses for good (``DeliveryError(permanent=True)``: a payload it will never take, whatever the retries)
moves to ``refused/`` with its last error, kept for a person to look at; every other failure is retried.

Payloads hold patient data (the DICOM objects name the patient, a FHIR Bundle carries the patient's ID), so
``sent/`` and ``refused/`` are emptied by a ``Retention``: an item older than its folder's limit, counted from
``moved_at`` in its ``state.json`` (the folder's mtime for an item moved by a lungdx that did not record it),
is deleted by ``Outbox.prune``, which ``deliver`` runs at most once per ``Retention.every_s``. The same prune
empties folders of plain files its owner names (``file_folders``: the state folder's FHIR copies and kept source
instances, ``pipeline.Processor``), aged by each file's modification time. What a crash left half-written (an
item under ``tmp/``, a ``.partial`` file of ``write_atomic``) holds patient data too: it goes once ``LEFTOVER_S``
old, a time no write takes.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from lungdx.io.files import write_atomic

logger = logging.getLogger(__name__)


class DeliveryError(RuntimeError):
    """A destination is down or refused a payload; the item stays in the outbox.

    ``permanent``: the destination refused this payload for what it is (HTTP 400, 409, 412, 422; a DICOM failure
    status ``refused_for_good`` calls permanent), so sending it again gives the same answer: it goes to ``refused/``.
    The message is lungdx's own and is logged: codes, digests and URLs, never a header value or patient data.
    ``detail``: what the destination said (a truncated response body, a status's error comment), kept in the item's
    ``state.json`` for a person to read and never logged, as an answer may quote the payload's patient data.
    """

    def __init__(self, message: str, *, permanent: bool = False, detail: str | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.detail = detail


PERMANENT_HTTP = frozenset({400, 409, 412, 422})
"""HTTP answers about the request's content, which every retry gets again: 400 Bad Request, 409 Conflict, 412 Precondition
Failed, 422 Unprocessable Content (RFC 9110 15.5.1, 15.5.10, 15.5.13, 15.5.21). A FHIR server's 409 is a conflict of this
Bundle (its conditional create, FHIR R4 http.html); a STOW-RS 409 (PS3.18 10.5.3: no instance stored, "for a mixture of
reasons") is decided by the Failure Reasons of its body where it gives them (``dicomweb``), by this set where it does not.

Every other answer is retried at the capped backoff. 405, 406, 410, 411, 413, 414 and 415 describe an endpoint or a proxy
that is misconfigured (a wrong path, a read-only gateway, a body size limit), not this payload: refused, one
misconfiguration would send every result to ``refused/``, which retention empties; one fix on the other side mends them
all. So are 401, 403 and 404 (credentials, a wrong URL), 408 and 429 (timeouts, rate limits), 5xx and a redirect (3xx)."""

DETAIL_CHARS = 2000
"""``DeliveryError.detail`` keeps at most this many characters of an answer (an OperationOutcome's issues come first)."""


def refused_for_good(status: int | None) -> bool:
    """A DICOM failure status that every retry gets again (PS3.4 B.2.3, PS3.7 C; a STOW-RS Failure Reason (0008,1197)
    uses the same codes, PS3.18 10.5.3): a data set that does not match its SOP class (A9xx), one the peer cannot
    understand (Cxxx), a SOP class it does not support (0122). Out of resources (A7xx), a processing failure (0110, as
    Orthanc answers a full disk or a database error), any other code and no status at all may pass later."""
    return status is not None and (0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status == 0x0122)


def http_failure(response, where: str, url: str, shown: Callable[[str], str] = lambda path: path) -> DeliveryError | None:
    """The failure an HTTP answer (an ``httpx.Response``) is, or None for a 2xx: anything else was not delivered.

    A redirect (3xx) is not followed, as a 301 or 302 turns a POST into a GET: it is retried, and the message names
    the ``Location`` (scheme, host and path; ``shown`` rewrites the path, no query string) to configure instead.
    Other answers are permanent where ``PERMANENT_HTTP`` says so, with the body as ``detail``.

    Args:
        where: what was asked, for the message (``POST http://pacs/dicom-web/studies``).
        url: the URL asked, which a relative ``Location`` is resolved against.
    """
    status = response.status_code
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        location = response.headers.get("location")
        target = _without_query(urljoin(url, location), shown) if location else "no Location given"
        return DeliveryError(f"{where}: HTTP {status}, redirected to {target}: configure the final URL (redirects are "
                             "not followed: a 301 or 302 turns a POST into a GET)")
    return DeliveryError(f"{where}: HTTP {status}", permanent=status in PERMANENT_HTTP, detail=truncated(response.text))


def _without_query(url: str, shown: Callable[[str], str]) -> str:
    """Scheme, host (and port) and path of a URL: no user, password, query or fragment, which may hold secrets."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{shown(parts.path)}"


def truncated(text: str | None) -> str | None:
    """At most ``DETAIL_CHARS`` characters of ``text``, saying how long it was where it was cut; None for no text."""
    if not text:
        return None
    return text if len(text) <= DETAIL_CHARS else f"{text[:DETAIL_CHARS]}... ({len(text)} characters, cut)"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s * 2**(attempts - 1)``, at most ``max_s``, between attempts."""

    base_s: float = 2.0
    max_s: float = 300.0

    def delay_s(self, attempts: int) -> float:
        return min(self.max_s, self.base_s * 2 ** max(0, attempts - 1))


DAY_S = 86400.0
LEFTOVER_S = DAY_S
"""An item under ``tmp/`` or a ``.partial`` file this old is a crash's leftover (a write takes milliseconds)."""


@dataclass(frozen=True)
class Retention:
    """How long delivered (``sent/``) and refused (``refused/``) items are kept, in days from when they moved there.

    ``0`` deletes an item as soon as it moves there (a delivered payload is gone once the destination took it);
    ``None`` keeps items for good (lungdx before retention: someone else must delete them). Refused items are
    kept longer by default, as a person has to read why they were refused before they go.

    ``pipeline.Processor`` applies the same two limits to its state folder: ``sent_days`` to ``fhir/`` (copies of
    results, as delivered ones are), ``refused_days`` to ``failed/`` and ``unreadable/`` (received instances
    waiting for a person, as refused results are).

    Attributes:
        sent_days: limit for ``sent/``; None keeps.
        refused_days: limit for ``refused/``; None keeps.
        every_s: ``deliver`` prunes at most this often (the first ``deliver`` prunes); ``prune`` itself always does.
    """

    sent_days: float | None = 7.0
    refused_days: float | None = 30.0
    every_s: float = 3600.0

    def __post_init__(self):
        for name in ("sent_days", "refused_days"):
            days = getattr(self, name)
            if days is not None and not days >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be 0 or more days, or None to keep items for good; got {days}")
        if not self.every_s >= 0:
            raise ValueError(f"every_s must not be negative, got {self.every_s}")


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
    """Pending deliveries under ``folder`` (``pending/``, ``tmp/``), delivered (``sent/``) and ``refused/`` ones."""

    def __init__(self, folder: str | Path, retry: RetryPolicy | None = None, retention: Retention | None = None, *,
                 file_folders: Mapping[str | Path, float | None] | None = None):
        """``file_folders``: folders of plain files outside the outbox that ``prune`` also empties, each with its
        limit in days (None keeps), the files aged by their modification time; a folder not there yet is skipped."""
        self.folder = Path(folder)
        self.retry = retry or RetryPolicy()
        self.retention = retention or Retention()
        self.file_folders = {Path(folder): days for folder, days in (file_folders or {}).items()}
        self._next_prune = -math.inf  # time.monotonic() of the next prune due in deliver
        self._unreadable: set[str] = set()  # pending items already warned about, so one is not logged every round
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
        """Every pending item, oldest first.

        An item that does not read (copied back with ``cp -r``: its ``state.json`` there, its payload not yet) is left
        out with a warning naming its folder, and read again at the next call.
        """
        items = []
        for folder in sorted(p for p in (self.folder / "pending").iterdir() if (p / "state.json").is_file()):
            try:
                items.append(self._item(folder))
            except (OSError, ValueError, KeyError, TypeError) as err:
                if folder.name not in self._unreadable:  # the folder's name is a time and a random number: no patient data
                    self._unreadable.add(folder.name)
                    logger.warning("outbox: pending item %s does not read (%s), left for the next round",
                                   folder, _unread_reason(err))
                continue
            self._unreadable.discard(folder.name)
        return items

    def due(self, now: float | None = None) -> list[Item]:
        """Pending items whose next attempt time has come."""
        now = time.time() if now is None else now
        return [item for item in self.pending() if item.next_attempt <= now]

    def delivered(self, item: Item) -> Path | None:
        """Move a delivered item to ``sent/``; returns where it is kept, None where ``Retention.sent_days`` 0 deleted it."""
        return self._retire(item, json.loads((item.folder / "state.json").read_text()), "sent", self.retention.sent_days)

    def refused(self, item: Item, error: str, detail: str | None = None) -> Path | None:
        """Move an item its destination refuses for good to ``refused/``, its error (and ``detail``, what the
        destination said, where known) in ``state.json``.

        Returns:
            Where it is kept, or None where ``Retention.refused_days`` 0 deleted it.
        """
        state = {"kind": item.kind, "attempts": item.attempts + 1, "next_attempt": None, "label": item.label,
                 "last_error": error, **({"detail": detail} if detail else {})}
        return self._retire(item, state, "refused", self.retention.refused_days)

    def _retire(self, item: Item, state: dict, name: str, days: float | None) -> Path | None:
        """Record when ``item`` moves to the folder ``name`` (``moved_at``), move it, and delete it there at once
        when ``days`` is 0; returns where it is kept."""
        # Always this move's time, never an earlier one: a refused item moved back to pending/ by hand (the cause
        # fixed) still holds its refusal's moved_at, and would otherwise be aged from the refusal once delivered.
        state["moved_at"] = time.time()
        write_atomic(item.folder / "state.json", json.dumps(state).encode())
        kept = self.folder / name / item.folder.name
        shutil.move(str(item.folder), str(kept))
        if days == 0 and _delete(kept, name):  # moved first: a deletion cut short is finished by the next prune
            return None
        return kept

    def failed(self, item: Item, error: str, detail: str | None = None) -> float:
        """Record a failed attempt (``detail``: what the destination said) and schedule the next; returns the delay in
        seconds."""
        attempts = item.attempts + 1
        delay_s = self.retry.delay_s(attempts)
        state = {"kind": item.kind, "attempts": attempts, "next_attempt": time.time() + delay_s,
                 "label": item.label, "last_error": error, **({"detail": detail} if detail else {})}
        write_atomic(item.folder / "state.json", json.dumps(state).encode())
        return delay_s

    def prune(self, now: float | None = None) -> int:
        """Delete the items of ``sent/`` and ``refused/`` older than the ``Retention``, and the files of
        ``file_folders`` older than theirs; returns how many went.

        Never touches ``pending/``; in ``tmp/`` and in ``file_folders``, what a write left behind goes once
        ``LEFTOVER_S`` old, whatever the limits. An item or a file that cannot be deleted (permissions, say) is
        logged and tried again at the next prune; the others still go.
        """
        now = time.time() if now is None else now
        count = self._prune_folder("tmp", now - LEFTOVER_S)  # a staged item has no moved_at: aged by its mtime
        for name, days in (("sent", self.retention.sent_days), ("refused", self.retention.refused_days)):
            if days is not None:
                count += self._prune_folder(name, now - days * DAY_S)
        for folder, days in self.file_folders.items():  # a folder kept for good (None) still loses a crash's leftovers
            count += _prune_files(folder, -math.inf if days is None else now - days * DAY_S, now - LEFTOVER_S)
        return count

    def prune_when_due(self) -> int:
        """``prune`` if ``Retention.every_s`` has passed since the last time this did; returns how many went."""
        now = time.monotonic()
        if now < self._next_prune:
            return 0
        self._next_prune = now + self.retention.every_s
        return self.prune()

    def _prune_folder(self, name: str, cutoff: float) -> int:
        folder = self.folder / name
        try:
            items = [item for item in folder.iterdir() if item.is_dir()]
        except OSError as err:  # the folder itself gone or unreadable: nothing to do until it is back
            logger.error("outbox retention: cannot list %s: %s", folder, err.strerror or type(err).__name__)
            return 0
        count = sum(_delete(item, name) for item in items if _moved_at(item) <= cutoff)
        if count:  # the count and the folder only: an item's label or payload may lead back to the patient
            logger.info("outbox retention: deleted %d item(s) from %s", count, folder)
        return count

    def deliver(self, senders: Mapping[str, Callable[[Path], None]], now: float | None = None) -> int:
        """Try every due item with the sender of its kind; returns how many were delivered.

        Any error of a sender (a PACS down, a payload that does not read) is a failed attempt of
        that item, retried after its backoff, unless it is a permanent refusal (``refused/``); the items behind it
        are still tried, as are those behind a pending item that does not read (``pending`` leaves it out). Then
        ``prune_when_due``, also when an error (the outbox folder unreadable) ended the round.
        """
        try:
            return self._deliver_due(senders, now)
        finally:
            self.prune_when_due()

    def _deliver_due(self, senders: Mapping[str, Callable[[Path], None]], now: float | None) -> int:
        count = 0
        for item in self.due(now):
            sender = senders.get(item.kind)
            if sender is None:
                continue  # no destination of this kind configured (yet): the item waits
            try:
                sender(item.payload)
            except Exception as err:  # one bad item must not hold back the items behind it
                # A DeliveryError's text is lungdx's own (no patient data); any other error's text may quote the
                # payload's header values, so only its type is kept. Its detail goes to state.json only, never logged.
                failure = err if isinstance(err, DeliveryError) else DeliveryError(
                    f"{type(err).__name__} (payload not deliverable)")
                error = str(failure)
                if failure.permanent:
                    kept = self.refused(item, error, failure.detail)
                    logger.error("delivery of %s refused for good, %s: %s", item.label,
                                 f"kept in {kept}" if kept else "deleted (refused items kept 0 days)", error)
                    continue
                delay_s = self.failed(item, error, failure.detail)
                logger.warning("delivery of %s failed (attempt %d), retrying in %.0f s: %s",
                               item.label, item.attempts + 1, delay_s, error)
            else:
                self.delivered(item)
                logger.info("delivered %s", item.label)
                count += 1
        return count

    def _item(self, folder: Path) -> Item:
        state = json.loads((folder / "state.json").read_text())
        payload = next((p for p in folder.iterdir() if p.name.startswith("payload")), None)
        if payload is None:  # an OSError, so that pending()'s warning says what is missing
            raise FileNotFoundError(errno.ENOENT, "no payload file", str(folder))
        # next_attempt is null in a refused item that a person moved back to pending/: it is due now
        return Item(folder=folder, kind=state["kind"], payload=payload, attempts=int(state["attempts"]),
                    next_attempt=float(state["next_attempt"] or 0.0), label=state["label"])


def _unread_reason(err: Exception) -> str:
    """Why a pending item does not read: the system's words for a file, else what is wrong in its ``state.json``
    (lungdx's own fields: a key, a number, the JSON's position; never the payload's content)."""
    return getattr(err, "strerror", None) or f"its state.json: {type(err).__name__}: {err}"


def _moved_at(item: Path) -> float:
    """When an item moved to ``sent/`` or ``refused/``: its ``moved_at``, else (moved by an older lungdx, or a
    ``state.json`` that does not read) the folder's mtime, the time its last file was written."""
    try:
        return float(json.loads((item / "state.json").read_text())["moved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return item.stat().st_mtime
    except OSError:  # gone since it was listed: nothing to delete
        return math.inf


def _prune_files(folder: Path, cutoff: float, leftover_cutoff: float) -> int:
    """Delete the plain files of ``folder`` last modified at ``cutoff`` or before; returns how many went.

    Names starting with a dot are left alone, but for ``write_atomic``'s ``.partial`` files last modified at
    ``leftover_cutoff`` or before (a crash's; a younger one may be being written now, even where ``cutoff`` is
    now). The log gives counts and the folder only: a file's name is the digest of a UID.
    """
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:  # nothing was ever kept there
        return 0
    except OSError as err:
        logger.error("retention: cannot list %s: %s", folder, err.strerror or type(err).__name__)
        return 0
    count, failures, error = 0, 0, ""
    for entry in entries:
        try:
            limit = cutoff if not entry.name.startswith(".") else leftover_cutoff if entry.name.endswith(".partial") else -math.inf
            if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime > limit:
                continue
            os.unlink(entry.path)
            count += 1
        except FileNotFoundError:  # deleted meanwhile, or moved back to the inbox by a person
            continue
        except OSError as err:
            failures, error = failures + 1, err.strerror or type(err).__name__
    if count:
        logger.info("retention: deleted %d file(s) from %s", count, folder)
    if failures:
        logger.warning("retention: cannot delete %d file(s) of %s, tried again at the next prune: %s", failures, folder, error)
    return count


def _delete(item: Path, name: str) -> bool:
    """Delete an item folder, its ``state.json`` last, so that a deletion cut short keeps the recorded time and is
    tried again on time; False (logged) where it cannot be deleted."""
    try:
        for path in sorted(item.iterdir(), key=lambda path: path.name == "state.json"):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        item.rmdir()
    except FileNotFoundError:  # deleted meanwhile by someone else
        return not item.exists()
    except OSError as err:
        logger.warning("outbox retention: cannot delete an item of %s, tried again at the next prune: %s (%s)",
                       name, err.strerror or type(err).__name__, item.name)
        return False
    return True
