"""A real, throwaway PostgreSQL server for the tests: ``initdb`` into a temporary folder, ``pg_ctl`` on a
free port of 127.0.0.1 (no Unix socket outside that folder), stopped and removed at the end.

``initdb`` refuses to run as root, so under root every server command runs as the ``postgres`` user
(created by Debian's server package) through ``runuser``.  A server that cannot start raises with the
reason and the server's log: CI must see why, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import free_port

SERVER_USER = "postgres"


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
            if (folder / name).exists():
                return str(folder / name)
        raise RuntimeError(f"PostgreSQL's {name} is not installed: apt-get install postgresql (15 or newer)")
    return found


class PostgresServer:
    """One cluster in a temporary folder; ``dsn`` connects as the superuser ``hcmemory`` without a password."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hcmemory-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:
            shutil.chown(self.root, SERVER_USER)
        self.dsn = f"postgresql://hcmemory@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(args)
        if self.as_root:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr[-2000:]}\n{log}")
        return done

    def start(self) -> "PostgresServer":
        """Start the server; the first start picks another free port when the chosen one was taken in between
        (``free_port`` only finds a port free at the time it asks). A restart keeps its port: clients hold it."""
        first = not self.data.exists()
        if first:
            self._run(_binary("initdb"), "-D", str(self.data), "-U", "hcmemory", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
        tries = 3 if first else 1
        while True:
            options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
            try:
                self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t",
                          "60", "start")
                return self
            except RuntimeError as exc:
                tries -= 1
                if tries == 0 or not ("could not bind" in str(exc) or "already in use" in str(exc)):
                    raise
                self.port = free_port()
                self.dsn = f"postgresql://hcmemory@127.0.0.1:{self.port}/postgres"

    def database(self, name: str) -> str:
        """The URL of database ``name`` on this server, created empty on first use: a test module that needs
        to see every row (or the tables' absence) has a database of its own."""
        import psycopg  # here: the module is imported where psycopg is absent too

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn.rsplit("/", 1)[0] + f"/{name}"

    def stop(self, mode: str = "fast") -> None:
        """``fast`` shuts down cleanly; ``immediate`` is a crash (no checkpoint, recovery on the next start)."""
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL to the postmaster, as a machine's loss would: connections drop mid-transaction."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 9)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
