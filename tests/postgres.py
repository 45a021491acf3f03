"""A throwaway PostgreSQL server for the job store's tests: Debian's server binaries, a new
cluster in a temporary directory, listening on 127.0.0.1 only (and a socket in that directory),
fsync off. Stopped and removed by ``stop``. As root it runs as the ``postgres`` user, since
PostgreSQL refuses to run as root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from builder.ports import free_port


class PostgresUnavailable(RuntimeError):
    """No server can be started here; the message says what is missing."""


def server_bin() -> Optional[Path]:
    """The directory holding initdb and pg_ctl: on PATH, else Debian's versioned one."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


class PostgresServer:
    """``start()``, then ``url(database)`` for SQLAlchemy, ``create_database(name)``, and
    ``stop()``."""

    user = "pixcrawler"

    def __init__(self) -> None:
        self.bin = server_bin()
        if self.bin is None:
            raise PostgresUnavailable("PostgreSQL's server is not installed (Debian: apt-get "
                                      "install -y postgresql; tests/run.sh does it as root)")
        self.run_as: list[str] = []
        self.owner: Optional[pwd.struct_passwd] = None
        if os.geteuid() == 0:
            try:
                self.owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root, and there is no 'postgres' user "
                                          "to run the server as") from None
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="pxpg", dir="/tmp"))
        self.data = self.root / "data"
        self.port = free_port()
        self.started = False

    def _run(self, *args: str) -> None:
        result = subprocess.run(self.run_as + list(args), capture_output=True, text=True,
                                timeout=120)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PostgresUnavailable(f"{Path(args[0]).name} failed ({result.returncode}): "
                                      f"{result.stderr.strip()[-2000:]}\n{tail}")

    def start(self) -> "PostgresServer":
        if self.owner is not None:
            os.chmod(self.root, 0o755)
            os.chown(self.root, self.owner.pw_uid, self.owner.pw_gid)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                  "-U", self.user, "-E", "UTF8", "--no-sync")
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   "-c full_page_writes=off -c synchronous_commit=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "server.log"), "-o", options, "-w", "-t", "60", "start")
        self.started = True
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} "
                             "dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.started:
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "stop")
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
