#!/usr/bin/env python3
"""An incremental policy run over loopback TLS against the local backup of the same change.

    python3 bench/transfer_bench.py [--work DIR] [--data DIR] [--reps N]

Per repetition, on the shared kit's workload (base.img, then mut.img: a working day's changes):

- **local**: ``dingyuan backup`` of base.img into a fresh encrypted repository (not timed), then of
  mut.img, timed as one process (start-up and key derivation included);
- **vault**: ``dingyuan vault serve`` and ``dingyuan agent run`` as processes on 127.0.0.1 (HTTPS), the
  volume protected under a policy; the agent's first run backs base.img up (not timed); then mut.img is
  copied over the source, an operator's "run now" starts the incremental, and its time is the job's,
  from the agent claiming it to the vault committing the snapshot (``started`` to ``finished``).
  The time from "run now" to the commit, including the agent's polling, is shown too.

The figure of merit is throughput on the same change: local time / vault time (the issue's budget:
at least 0.7). Every restored image is not compared here (tests/integration/test_protect.py does
that); the snapshot's stats are checked to have found the change. Results in WORK/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from run_bench import REPO_ROOT, ensure_workload, log

try:
    import httpx
except ImportError:  # run by a Python without the project's packages: use the project's venv
    VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
    if not VENV_PYTHON.exists() or Path(sys.executable) == VENV_PYTHON:
        raise SystemExit("httpx is missing: run scripts/test.sh (it makes .venv) first") from None
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])

PASSWORD = "bench"
BUDGET = 0.7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def copy_image(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)


def wait(what: str, cond: Any, timeout: float = 600, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(step)
    return got


class Bench:
    def __init__(self, exe: str, work: Path, data: Path) -> None:
        self.exe = exe
        self.work = work
        self.data = data

    def cli(self, *args: str, env: dict[str, str] | None = None) -> str:
        r = subprocess.run([self.exe, *args], capture_output=True, text=True, env=env, check=False)
        if r.returncode:
            raise SystemExit(f"{self.exe} {' '.join(args)} failed: {r.stderr.strip()[-500:]}")
        return r.stdout

    def local(self, w: Path) -> dict[str, Any]:
        env = dict(
            os.environ,
            DINGYUAN_REPO=str(w / "repo"),
            DINGYUAN_PASSPHRASE=PASSWORD,
            DINGYUAN_CACHE_DIR=str(w / "cache"),
        )
        src = w / "disk.img"
        self.cli("repo", "init", "--encryption", "aes-256-gcm", env=env)
        copy_image(self.data / "base.img", src)
        self.cli("backup", str(src), "--volume", "bench", env=env)
        copy_image(self.data / "mut.img", src)
        t0 = time.monotonic()
        self.cli("backup", str(src), "--volume", "bench", env=env)
        return {"seconds": time.monotonic() - t0}

    def vault(self, w: Path) -> dict[str, Any]:
        passfile = w / "passphrase"
        passfile.write_text(PASSWORD)
        vdir = w / "vault"
        self.cli("vault", "init", "--dir", str(vdir), "--passphrase-file", str(passfile))
        port = free_port()
        url = f"https://127.0.0.1:{port}"
        procs: list[subprocess.Popen[bytes]] = []
        with open(w / "vault.log", "wb") as vlog:
            procs.append(
                subprocess.Popen(
                    [self.exe, "vault", "serve", "--dir", str(vdir), "--passphrase-file", str(passfile),
                     "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
                    stdout=vlog, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        token = (vdir / "admin.token").read_text().strip()
        api = httpx.Client(
            base_url=url + "/api/v1",
            verify=ssl.create_default_context(cafile=str(vdir / "tls" / "ca.pem")),
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )

        def call(method: str, path: str, **kw: Any) -> Any:
            r = api.request(method, path, **kw)
            if r.status_code >= 300:
                raise SystemExit(f"{method} {path}: {r.status_code} {r.text}")
            return r.json() if r.content else None

        def up() -> bool:
            try:
                return api.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait("the vault", up, timeout=60)
            call(
                "POST", "/policies", json={"name": "daily", "schedule": "interval", "interval_seconds": 86400}
            )
            enroll = call("POST", "/enrollments", json={"host": "bench"})["token"]
            state = w / "agent"
            self.cli("agent", "enroll", "--state-dir", str(state), url, enroll)
            src = w / "disk.img"
            copy_image(self.data / "base.img", src)
            vol = call(
                "POST", "/hosts/bench/volumes", json={"name": "bench", "source": str(src), "policy": "daily"}
            )
            with open(w / "agent.log", "wb") as alog:
                procs.append(
                    subprocess.Popen(
                        [self.exe, "agent", "run", "--state-dir", str(state), "--poll", "0.2"],
                        stdout=alog, stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip

            def finished_jobs() -> list[dict[str, Any]]:
                jobs: list[dict[str, Any]] = call("GET", "/jobs", params={"volume": vol["id"]})
                failed = [j for j in jobs if j["state"] == "failed"]
                if failed:
                    raise SystemExit(f"a backup job failed: {failed[0]['error']}")
                return [j for j in jobs if j["kind"] == "backup" and j["state"] == "succeeded"]

            wait("the full backup", lambda: len(finished_jobs()) >= 1)
            copy_image(self.data / "mut.img", src)
            t0 = time.monotonic()
            call("POST", f"/volumes/{vol['id']}/run")
            jobs = wait("the incremental backup", lambda: (j := finished_jobs()) and len(j) >= 2 and j)
            e2e = time.monotonic() - t0
            job = jobs[0]
            seconds = (
                datetime.fromisoformat(job["finished"]) - datetime.fromisoformat(job["started"])
            ).total_seconds()
            snap = call("GET", f"/snapshots/{job['snapshot_id']}")
            return {"seconds": seconds, "run_now_to_commit": e2e, "stats": snap["stats"]}
        finally:
            for p in reversed(procs):
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            api.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dingyuan-bench-transfer"))
    ap.add_argument("--data", type=Path, help="where base.img and mut.img are (default WORK/data)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work: Path = args.work
    data: Path = args.data or work / "data"
    exe = str(REPO_ROOT / ".venv" / "bin" / "dingyuan")
    if not Path(exe).exists():
        raise SystemExit("no .venv/bin/dingyuan: run scripts/test.sh or scripts/run.sh first")
    ensure_workload(data)
    bench = Bench(exe, work, data)
    runs = []
    for rep in range(args.reps):
        w = work / f"rep{rep}"
        shutil.rmtree(w, ignore_errors=True)
        (w / "local").mkdir(parents=True)
        (w / "vault").mkdir(parents=True)
        local = bench.local(w / "local")
        remote = bench.vault(w / "vault")
        log(
            f"[{rep + 1}/{args.reps}] local {local['seconds']:.2f} s, vault run {remote['seconds']:.2f} s "
            f"(run-now to commit {remote['run_now_to_commit']:.2f} s), stats {remote['stats']}"
        )
        runs.append({"local": local, "vault": remote})
    size = (data / "mut.img").stat().st_size
    t_local = statistics.median(r["local"]["seconds"] for r in runs)
    t_vault = statistics.median(r["vault"]["seconds"] for r in runs)
    t_e2e = statistics.median(r["vault"]["run_now_to_commit"] for r in runs)
    ratio = t_local / t_vault
    print(f"\n## Incremental policy run over loopback TLS (median of {args.reps}, {os.cpu_count()} CPUs)\n")
    print("| path | time | throughput |")
    print("|---|---|---|")
    for what, t in (
        ("local `dingyuan backup` (one process)", t_local),
        ("vault: agent policy run (job start to commit)", t_vault),
        ("vault: run-now to commit (with polling)", t_e2e),
    ):
        print(f"| {what} | {t:.2f} s | {size / t / 1e6:.0f} MB/s |")
    verdict = "PASS" if ratio >= BUDGET else "FAIL"
    print(f"\nvault / local throughput: {ratio:.2f}× (budget ≥ {BUDGET}×): {verdict}")
    (work / "transfer.json").write_text(
        json.dumps(
            {"runs": runs, "local": t_local, "vault": t_vault, "ratio": ratio, "budget": BUDGET}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
