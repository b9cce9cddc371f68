"""A private, throwaway PostgreSQL cluster for tests that need a real server.

:class:`PgCluster` runs ``initdb`` into a temporary directory and starts the server with
``pg_ctl``, listening only on a Unix socket in that directory (no TCP port, no system service, no
change outside the directory). Run as root, the server runs as the ``postgres`` user (PostgreSQL
refuses root). ``stop`` shuts it down and removes the directory. Each test gets a database of its
own (:meth:`PgCluster.create_database`), so tests need not clean up after themselves.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

#: the cluster's superuser (trust authentication over the private socket only)
SUPERUSER = "dingyuan"
PORT = 5432  # only names the socket file in the private directory


def server_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with ``initdb`` and ``pg_ctl`` (Debian's
    layout), or None when the PostgreSQL server is not installed."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        bindir = Path(initdb).parent
        version = bindir.parent.name
        if (bindir / "pg_ctl").exists() and version.isdigit():
            found.append((int(version), bindir))
    return max(found)[1] if found else None


class PgCluster:
    """One PostgreSQL server in a temporary directory: ``dir/data`` (the cluster), ``dir/log``
    and the socket ``dir/.s.PGSQL.5432``."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.user: pwd.struct_passwd | None = None  # whom the server runs as (None: ourselves)
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root but there is no 'postgres' user to run the server as "
                    "(the Debian package postgresql creates it)"
                ) from None
        self.dir = Path(tempfile.mkdtemp(prefix="dingyuan-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self._databases = 0
        self.started = False
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)

    def _run(self, *args: str) -> None:
        """Run a server program as the cluster's user, with an environment of our own (no PG*
        variable of the caller leaks in); its output goes into the error when it fails."""
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "TZ": "UTC"}
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
            env["HOME"] = str(self.dir)
        proc = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            env=env,
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **kwargs,
        )
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(
                f"{args[0]} failed with status {proc.returncode}:\n{proc.stdout}{proc.stderr}{log}"
            )

    def start(self) -> None:
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C.UTF-8",
            "--no-sync",
        )
        # no TCP at all; durability off, since the cluster is thrown away after the session
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -p {PORT} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c timezone=UTC"
        )
        self._run(
            "pg_ctl", "start", "--pgdata", str(self.data), "--log", str(self.log), "--wait", "-o", options
        )
        self.started = True

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are closed) and remove the directory."""
        try:
            if self.started:
                self._run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "fast", "--wait")
                self.started = False
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg") -> str:
        """The SQLAlchemy URL of ``database``, over the cluster's Unix socket."""
        return f"{driver}://{SUPERUSER}@/{database}?host={self.dir}&port={PORT}"

    def execute(self, sql: str) -> None:
        """Run one statement in the ``postgres`` database, outside a transaction (for CREATE
        DATABASE and the like)."""
        import psycopg

        with psycopg.connect(
            host=str(self.dir), port=PORT, user=SUPERUSER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(sql)  # type: ignore[arg-type]  # a str built from our own names

    def create_database(self) -> str:
        """A new, empty database; returns its SQLAlchemy URL."""
        self._databases += 1
        name = f"test_{self._databases}"
        self.execute(f"CREATE DATABASE {name}")
        return self.url(name)


class PgServer:
    """A PostgreSQL server on a data directory of the test's choosing (a mounted image, a restored
    copy), listening only on a Unix socket in ``sockdir``, run as the ``postgres`` user when we are
    root. Unlike :class:`PgCluster` it keeps PostgreSQL's durability defaults (fsync, synchronous
    commit, full-page writes): the tests that use it check what survives a point in time."""

    SUPERUSER = "postgres"

    def __init__(self, bindir: Path, data: Path, sockdir: Path, log: Path) -> None:
        self.bindir, self.data, self.sockdir, self.log = bindir, data, sockdir, log
        self.user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.started = False
        for d in (sockdir, data):
            d.mkdir(parents=True, exist_ok=True)
            if self.user is not None:
                os.chown(d, self.user.pw_uid, self.user.pw_gid)
        data.chmod(0o700)
        if self.user is not None:
            log.touch()
            os.chown(log, self.user.pw_uid, self.user.pw_gid)

    def run(self, *args: str, timeout: float = 120) -> str:
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8", "TZ": "UTC"}
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
            env["HOME"] = str(self.sockdir)
        proc = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            env=env,
            cwd=self.sockdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed with status {proc.returncode}:\n{proc.stdout}{proc.stderr}{self.logtext()}"
            )
        return proc.stdout

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def initdb(self, *options: str) -> None:
        self.run(
            "initdb", "--pgdata", str(self.data), "--username", self.SUPERUSER, "--auth", "trust",
            "--encoding", "UTF8", "--locale", "C.UTF-8", *options,
        )  # fmt: skip

    def start(self, *settings: str) -> None:
        options = " ".join(
            [f"-c listen_addresses='' -c unix_socket_directories='{self.sockdir}' -p {PORT}"]
            + [f"-c {s}" for s in settings]
        )
        data, log = str(self.data), str(self.log)
        self.run("pg_ctl", "start", "--pgdata", data, "--log", log, "--wait", "-o", options)
        self.started = True

    def stop(self) -> None:
        if self.started:
            self.run("pg_ctl", "stop", "--pgdata", str(self.data), "--mode", "fast", "--wait")
            self.started = False

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.sockdir} port={PORT} user={self.SUPERUSER} dbname={dbname}"
