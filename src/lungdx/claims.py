"""Exclusive claims on named pieces of work in a folder that several workers share (processes or machines).

``lungdx cv`` claims each fold before training it, so that workers started on one CV folder train
every fold once and a crashed worker's fold is taken over. Plain files only: works on a local disk
and on NFS, with no server.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lungdx.io.files import write_atomic

logger = logging.getLogger(__name__)

STALE_AFTER_S = 600.0
"""A claim whose heartbeat is older than this belongs to a crashed (or frozen) worker and is taken over."""


class ClaimLost(RuntimeError):
    """Another worker took this worker's claim over (its heartbeat was judged stale)."""


@dataclass
class Claim:
    """One held claim: the file ``<name>.<generation>`` and its heartbeat thread."""

    path: Path
    previous: dict  # the claim it replaced (the previous generation's record), {} for the first
    stop: threading.Event
    thread: threading.Thread


class Claims:
    """Exclusive claims on named pieces of work (folds, the summary) in a folder that workers share.

    A claim on NAME is the file ``NAME.<generation>``; the highest generation is the current one. A
    worker claims NAME by creating the next generation, whole and only if absent (``publish``), so of
    workers racing for it exactly one wins, on a local disk or NFS alike. The current claim is free
    when it was released, when its heartbeat (rewritten every ``stale_after_s / 4``, at most 30 s) is
    older than ``stale_after_s``, or at once when its process is gone from this machine. Claim files
    are never deleted (no generation can be made twice), so they also record who trained what.

    The worker's clock stamps the heartbeat, so the machines' clocks must agree to well within
    ``stale_after_s``.
    """

    def __init__(self, folder: str | Path, stale_after_s: float = STALE_AFTER_S):
        self.folder = Path(folder)
        self.stale_after_s = stale_after_s
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._held: dict[str, Claim] = {}

    def acquire(self, name: str) -> Claim | None:
        """Claim ``name`` when it is unclaimed or its claim is free; None when a live worker holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        generation, current = self._current(name)
        if current is not None and not self._free(current):
            return None
        path = self.folder / f"{name}.{generation + 1}"
        if not publish(path, json.dumps(self._content("held"))):
            return None  # another worker claimed it first
        if current is not None and current.get("state") != "released":
            logger.warning("%s: taking over from worker %s (heartbeat %.0f s old)", name, current.get("worker"),
                           time.time() - current.get("heartbeat", 0))
        stop = threading.Event()
        thread = threading.Thread(target=self._beat, args=(path, stop), daemon=True, name=f"claim-{name}")
        claim = self._held[name] = Claim(path, current or {}, stop, thread)
        thread.start()
        return claim

    def release(self, name: str, **record) -> None:
        """Give up ``name`` (held or not), keeping ``record`` in the claim file for the next holder."""
        claim = self._held.pop(name, None)
        if claim is None:
            return
        claim.stop.set()
        claim.thread.join()
        if not self._lost(claim):
            write_atomic(claim.path, json.dumps({**self._content("released"), **record}))

    def check(self, name: str) -> None:
        """Raise ``ClaimLost`` when another worker has taken ``name`` over."""
        claim = self._held.get(name)
        if claim is not None and self._lost(claim):
            raise ClaimLost(f"{name}: another worker took this fold over (this worker's heartbeat was judged "
                            "stale); stopping it here")

    def holder(self, name: str) -> str | None:
        """The live worker (``host:pid``) holding ``name``, or None."""
        _, current = self._current(name)
        return None if current is None or self._free(current) else current.get("worker", "?")

    def _current(self, name: str) -> tuple[int, dict | None]:
        """The highest generation and its content; (-1, None) when never claimed."""
        generation = -1
        while (self.folder / f"{name}.{generation + 1}").exists():  # by name, not a listing NFS may cache
            generation += 1
        if generation < 0:
            return -1, None
        path = self.folder / f"{name}.{generation}"
        try:
            return generation, json.loads(path.read_text())
        except (OSError, ValueError):  # unreadable: judged by the file's age
            return generation, {"worker": "?", "heartbeat": path.stat().st_mtime}

    def _free(self, claim: dict) -> bool:
        if claim.get("state") == "released" or time.time() - claim.get("heartbeat", 0) > self.stale_after_s:
            return True
        host, _, pid = claim.get("worker", "").rpartition(":")
        same_machine = host == socket.gethostname() and claim.get("pid_ns") == _pid_namespace()
        return same_machine and pid.isdigit() and not _alive(int(pid))

    def _lost(self, claim: Claim) -> bool:
        name, _, generation = claim.path.name.rpartition(".")
        return not claim.path.exists() or (self.folder / f"{name}.{int(generation) + 1}").exists()

    def _content(self, state: str) -> dict:
        return {"worker": self.worker, "pid_ns": _pid_namespace(), "state": state, "heartbeat": time.time()}

    def _beat(self, path: Path, stop: threading.Event) -> None:
        while not stop.wait(min(30.0, self.stale_after_s / 4)):
            try:
                write_atomic(path, json.dumps(self._content("held")))
            except OSError as err:  # a passing file-server hiccup must not end the training
                logger.warning("%s: heartbeat not written: %s", path, err)


def _pid_namespace() -> str:
    """This process's pid namespace: a pid means the same process only within one (containers)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no harmless probe elsewhere: the heartbeat decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(path: Path, text: str) -> bool:
    """Write ``path`` whole, only if it does not exist yet; True when this call made it.

    A hard link to a finished temporary file is atomic and fails on an existing name, on local disks
    and NFS; a retried NFS link whose first reply was lost is recognised by the link count (open(2)).
    Where the file system has no hard links, an exclusive create (``O_EXCL``) stands in: as exclusive,
    but a reader may then see the file before it is whole.
    """
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temp.write_text(text)
    try:
        os.link(temp, path)
        return True
    except OSError as err:
        if temp.stat().st_nlink == 2:
            return True
        if isinstance(err, FileExistsError):
            return False
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        temp.unlink()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        file.write(text)
    return True
