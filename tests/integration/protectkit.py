"""A vault and agents as real processes on loopback, for the end-to-end and fault tests.

Every part is the real command (``dingyuan vault serve``, ``dingyuan agent run``) in its own
process, talking HTTPS; the test drives them through the REST API with the admin token that
``vault init`` wrote, and kills them with SIGKILL when it wants to.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

PASSPHRASE = "protect-test"
API = "/api/v1"
SENT_RE = re.compile(rb"upload: sending (\d+) bytes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dingyuan.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        check=check,
        timeout=120,
    )


def wait_for(what: str, cond: Callable[[], Any], timeout: float, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class _Process:
    """A dingyuan command in a child process, to SIGKILL (a crash) or SIGTERM (a clean stop)."""

    proc: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Vault(_Process):
    """``dingyuan vault serve`` in a process; ``kill()`` is SIGKILL, ``start()`` starts it again.
    It serves its API on ``port`` and exports on ``nbd_port`` (NBD) and ``iscsi_port`` (iSCSI);
    ``cli_env`` points the CLI at it."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "vault"
        self.passfile = root / "passphrase"
        self.passfile.write_text(PASSPHRASE)
        self.port = free_port()
        self.nbd_port = free_port()
        self.iscsi_port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = root / "vault.log"
        self.proc: subprocess.Popen[bytes] | None = None
        cli("vault", "init", "--dir", str(self.dir), "--passphrase-file", str(self.passfile))
        self.ca = self.dir / "tls" / "ca.pem"
        token = (self.dir / "admin.token").read_text().strip()
        self.cli_env = dict(os.environ, DINGYUAN_VAULT_DIR=str(self.dir), DINGYUAN_VAULT_URL=self.url)
        self.api = httpx.Client(
            base_url=self.url + API,
            verify=ssl.create_default_context(cafile=str(self.ca)),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dingyuan.cli.main",
                    "vault",
                    "serve",
                    "--dir",
                    str(self.dir),
                    "--passphrase-file",
                    str(self.passfile),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--nbd-listen",
                    f"127.0.0.1:{self.nbd_port}",
                    "--iscsi-listen",
                    f"127.0.0.1:{self.iscsi_port}",
                    "--log-level",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for("the vault to answer", self._healthy, 60)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"the vault exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}"
            )
        try:
            return self.api.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.api.close()  # our keep-alive connection: the vault would wait a second for its TLS close
        super().stop()

    # the API, as an administrator -------------------------------------------------------------
    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.api.request(method, path, **kw)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None

    def dy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``dingyuan ARGS`` pointed at this vault (the CLI's export, clone, boot ... commands)."""
        done = cli(*args, env=self.cli_env, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"dingyuan {' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done

    def policy(self, name: str, **settings: Any) -> None:
        self.call("POST", "/policies", json={"name": name, **settings})

    def protect(self, host: str, volume: str, source: Path, policy: str) -> int:
        doc = self.call(
            "POST", f"/hosts/{host}/volumes", json={"name": volume, "source": str(source), "policy": policy}
        )
        return int(doc["id"])

    def enrollment(self, host: str) -> str:
        return str(self.call("POST", "/enrollments", json={"host": host})["token"])

    def snapshots(self, host: str, volume: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.call(
            "GET", "/snapshots", params={"host": host, "volume": volume, "limit": 1000}
        )
        return out


class Agent(_Process):
    """``dingyuan agent run`` of one host in a process, logging every upload request."""

    def __init__(self, root: Path, vault: Vault, host: str) -> None:
        self.host = host
        self.state = root / f"agent-{host}"
        self.log = root / f"agent-{host}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        cli("agent", "enroll", "--state-dir", str(self.state), vault.url, vault.enrollment(host))

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dingyuan.cli.main",
                    "agent",
                    "run",
                    "--state-dir",
                    str(self.state),
                    "--poll",
                    "0.3",
                    "--verbose",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def bytes_sent(self) -> int:
        """Every byte this host's agent processes put into upload requests, killed ones included."""
        return sum(int(m) for m in SENT_RE.findall(self.log.read_bytes())) if self.log.exists() else 0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def replace_atomically(path: Path, change: Callable[[Path], None]) -> str:
    """Write the image's next state to a new file and rename it over the old: a reader that opened
    the old one keeps a consistent state. Returns the new state's SHA-256."""
    tmp = path.with_name(path.name + ".next")
    subprocess.run(["cp", "--sparse=always", str(path), str(tmp)], check=True)
    change(tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest
