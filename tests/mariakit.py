"""A private, throwaway MariaDB server for tests that need a real one.

:class:`MariaServer` runs ``mariadb-install-db`` into a data directory of the test's choosing (a
temporary directory, a mounted image) and starts ``mariadbd`` on it with ``--no-defaults`` (no
system configuration read), ``--skip-networking`` (no TCP port: a Unix socket in ``sockdir``
only) and its own pid file and error log: no system service is used or changed. ``root`` has an
empty password over that socket. Run as root, the server runs as root too (``--user=root``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def have_mariadb() -> bool:
    return shutil.which("mariadbd", path="/usr/sbin:/usr/bin") is not None and (
        shutil.which("mariadb-install-db") is not None
    )


class MariaServer:
    """``mariadbd`` on ``data``, listening on ``sockdir/mysqld.sock`` only, logging to ``log``."""

    def __init__(self, data: Path, sockdir: Path, log: Path) -> None:
        self.data, self.sockdir, self.log = data, sockdir, log
        self.socket = sockdir / "mysqld.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        sockdir.mkdir(parents=True, exist_ok=True)

    def install(self) -> None:
        """A new data directory (system tables; root with an empty password)."""
        self.data.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={self.data}", f"--user={self.user}",
             "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {done.stdout}{done.stderr}")

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, *options: str, timeout: float = 60) -> None:
        """Start the server (``options``: more ``--name=value`` settings) and wait until it
        accepts connections."""
        self.proc = subprocess.Popen(
            [shutil.which("mariadbd", path="/usr/sbin:/usr/bin") or "mariadbd", "--no-defaults",
             f"--datadir={self.data}", f"--socket={self.socket}", f"--pid-file={self.sockdir / 'mysqld.pid'}",
             f"--log-error={self.log}", "--skip-networking", f"--user={self.user}",
             "--innodb-buffer-pool-size=32M", *options],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}:\n{self.logtext()}")
            if self._accepts():
                self.connect().close()
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mariadbd did not answer within {timeout} s:\n{self.logtext()}")
            time.sleep(0.1)

    def _accepts(self) -> bool:
        """Whether the socket accepts connections (a plain probe: a failed client connect would
        leave its socket to the garbage collector)."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def connect(self, database: str | None = None, **kw: Any) -> Any:
        import pymysql

        return pymysql.connect(
            unix_socket=str(self.socket), user="root", database=database, autocommit=True, **kw
        )

    def stop(self, timeout: float = 60) -> None:
        """A clean shutdown (SIGTERM), SIGKILL when it takes longer than ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
