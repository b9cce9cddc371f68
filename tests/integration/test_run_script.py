"""The README's run command, for real: ``scripts/run.sh`` starts a vault and an agent, proves a
restore bit-exact, and leaves both running; ``scripts/run.sh stop`` stops them.

Hermetic: the demo lives in a temporary directory (DINGYUAN_DEMO_DIR) on a free loopback port
(DINGYUAN_DEMO_LISTEN), nothing is installed (DINGYUAN_SKIP_INSTALL=1), and ``dingyuan`` is this
interpreter running the code under test."""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from protectkit import free_port

import dingyuan

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run.sh"
TOOLS = ("bash", "curl", "setsid", "mkfs.ext4", "debugfs", "e2fsck", "python3")


def _alive(pid: int) -> bool:
    try:
        return b"dingyuan" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    any(shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None for t in TOOLS),
    reason=f"needs {', '.join(TOOLS)} (scripts/test.sh installs them)",
)
def test_run_script_leaves_a_working_vault_and_agent_and_stop_stops_them(tmp_path: Path) -> None:
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "dingyuan").write_text(f'#!/bin/sh\nexec {sys.executable} -m dingyuan.cli.main "$@"\n')
    (shim / "dingyuan").chmod(0o755)
    src = str(Path(dingyuan.__file__).resolve().parents[1])
    demo = tmp_path / "demo"
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{shim}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
        "DINGYUAN_SKIP_INSTALL": "1",
        "DINGYUAN_DEMO_DIR": str(demo),
        "DINGYUAN_DEMO_LISTEN": f"127.0.0.1:{port}",
    }

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
        )

    pids: list[int] = []
    try:
        run = script()
        pids = [int(p.read_text()) for p in demo.glob("*.pid")]
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        out = run.stdout
        assert "restored image is bit-exact" in out
        assert f"https://127.0.0.1:{port}/api/v1/" in out
        assert "run.sh stop" in out

        # the script has ended; the vault and the agent it started keep running
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        token = (demo / "vault" / "admin.token").read_text().strip()
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}/api/v1",
            verify=ssl.create_default_context(cafile=str(demo / "vault" / "tls" / "ca.pem")),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ) as api:
            snaps = api.get("/snapshots", params={"host": "demo-host", "volume": "disk0"}).json()
            assert len(snaps) >= 2
            policy = api.get("/policies/demo-continuous").json()
            assert policy["interval_seconds"] == 10 and policy["retention"] == {"keep_last": 20}

        stop = script("stop")
        assert stop.returncode == 0, stop.stderr
        assert not any(_alive(p) for p in pids)
        assert not list(demo.glob("*.pid"))
    finally:
        # whatever went wrong (a timeout too): leave no process behind
        pids += [int(p.read_text()) for p in demo.glob("*.pid") if p.read_text().strip().isdigit()]
        for pid in set(pids):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
