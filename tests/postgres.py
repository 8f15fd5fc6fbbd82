"""A throw-away PostgreSQL cluster on a free loopback port, for the tests that need a real server.

Made with the Debian server binaries (``initdb``, ``pg_ctl``) in a temporary folder, never the
system service. Tests skip with the reason when the binaries are absent. As root, the server's
programs run as the ``postgres`` user (``initdb`` refuses root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def require_postgres() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``; skips the test when there is none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found and shutil.which("initdb") is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql (.ci/run installs it)")
    return found[-1].parent if found else Path(shutil.which("initdb")).parent


class Postgres:
    """One cluster: ``superuser`` owns it; TCP logins on 127.0.0.1 use ``host_auth`` (``trust`` or ``scram-sha-256``).

    The client programs (``createdb``, ``createuser``, ``psql``) reach it as the superuser through
    its Unix socket, which always trusts: the way an administrator on the database host works.
    """

    def __init__(self, superuser: str = "lungdx", host_auth: str = "trust"):
        self.bin, self.superuser, self.host_auth = require_postgres(), superuser, host_auth
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.folder = Path(tempfile.mkdtemp(prefix="lungdx-pg-"))
        if self.as_postgres:
            shutil.chown(self.folder, "postgres")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]

    def start(self) -> None:
        data = self.folder / "data"
        self._run("initdb", "-D", str(data), "-U", self.superuser, "--auth-local=trust", f"--auth-host={self.host_auth}")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self) -> None:
        # Immediate: the cluster is thrown away, so it needs no shutdown checkpoint (a second or more saved).
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def client(self, program: str, *args: str) -> str:
        """Run ``createdb``, ``createuser`` or ``psql`` as the superuser; returns its stdout."""
        return self._run(program, "-h", str(self.folder), "-p", str(self.port), "-U", self.superuser, *args)

    def url(self, database: str, user: str | None = None) -> str:
        """The SQLAlchemy URL (psycopg 3 driver) of ``database`` over TCP, without a password."""
        return f"postgresql+psycopg://{user or self.superuser}@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str) -> str:
        command = [*self.as_postgres, str(self.bin / program), *args]
        return subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout


@contextlib.contextmanager
def postgres_cluster(superuser: str = "lungdx", host_auth: str = "trust") -> Iterator[Postgres]:
    """A started cluster, stopped and removed afterwards (skips the test when the binaries are absent)."""
    server = Postgres(superuser, host_auth)
    try:
        server.start()
        yield server
    finally:
        server.stop()
