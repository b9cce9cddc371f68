#!/usr/bin/env python3
"""A vault's NBD export of a snapshot against qemu-nbd serving the restored raw image, in one run.

    python3 bench/export_bench.py [--work DIR] [--data DIR] [--reps N] [--seconds S]

Setup (not timed): a vault in WORK/vault; base.img of the shared workload backed up into its
repository and restored to WORK/restored.img; a 1 TiB sparse image with 8 MiB of data at four
places backed up too. ``dingyuan vault serve`` runs with an NBD listener, ``qemu-nbd -r -t``
serves restored.img; both read from the page cache (the image and the packs were just written).

Per repetition, alternating the two servers so drift hits both alike:

- **sequential read**: ``nbdcopy URI null:`` (its defaults: 4 connections where multi-conn is
  offered, 64 requests in flight) of the whole 2 GiB disk; throughput in MB/s, and the CPU
  seconds the server process and nbdcopy used for it (on a shared machine, throughput follows
  the other load; CPU per pass much less so).
- **4 KiB random read**: a libnbd client (Python, asynchronous, 32 requests in flight, one
  connection) reads 4 KiB at random 4 KiB-aligned offsets for S seconds; IOPS. The client is
  the same for both servers, so the ratio is the servers'.
- **time to first byte** (dingyuan only, the issue's budget ≤ 2 s): from running
  ``dingyuan export start huge@latest`` (a new process: CLI start-up and the API call included)
  to the first 4 KiB read through the printed URI.

The budget: sequential read ≥ 0.8× qemu-nbd. Results in WORK/export.json, with the load average
at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from run_bench import REPO_ROOT, ensure_workload, log
from transfer_bench import free_port, wait

try:
    import nbd
except ImportError:  # run by a Python without libnbd's bindings: use the project's venv
    VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
    if not VENV_PYTHON.exists() or Path(sys.executable) == VENV_PYTHON:
        raise SystemExit("libnbd's Python bindings are missing: run scripts/test.sh first") from None
    os.execv(VENV_PYTHON, [str(VENV_PYTHON), *sys.argv])

PASSWORD = "bench"
SEQ_BUDGET = 0.8
TTFB_BUDGET = 2.0
QUEUE_DEPTH = 32
HUGE = 1 << 40


def connectable(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a running process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def sequential(uri: str, server_pid: int) -> tuple[float, float, float]:
    """Seconds for nbdcopy to read the whole export, and the CPU seconds the server and nbdcopy
    used meanwhile."""
    server0, client0 = cpu_seconds(server_pid), children_cpu()
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    elapsed = time.monotonic() - t0
    return elapsed, cpu_seconds(server_pid) - server0, children_cpu() - client0


def random_reads(uri: str, seconds: float, seed: int) -> float:
    """4 KiB random reads per second, QUEUE_DEPTH in flight on one connection."""
    h = nbd.NBD()
    h.connect_uri(uri)
    blocks = h.get_size() // 4096
    rng = random.Random(seed)
    bufs = [nbd.Buffer(4096) for _ in range(QUEUE_DEPTH)]
    done = 0
    deadline = time.monotonic() + seconds
    t0 = time.monotonic()
    free = list(range(QUEUE_DEPTH))
    cookies: dict[int, int] = {}
    while True:
        now = time.monotonic()
        while free and now < deadline:
            i = free.pop()
            cookies[h.aio_pread(bufs[i], rng.randrange(blocks) * 4096)] = i
        if not cookies:
            break
        h.poll(-1)
        for cookie in [c for c in cookies if h.aio_command_completed(c)]:
            free.append(cookies.pop(cookie))
            done += 1
    elapsed = time.monotonic() - t0
    h.shutdown()
    return done / elapsed


class Setup:
    def __init__(self, exe: str, work: Path, data: Path) -> None:
        self.exe = exe
        self.work = work
        self.data = data
        self.passfile = work / "passphrase"
        self.vdir = work / "vault"
        self.api_port = free_port()
        self.nbd_port = free_port()
        self.qemu_port = free_port()
        self.env = dict(
            os.environ,
            DINGYUAN_VAULT_DIR=str(self.vdir),
            DINGYUAN_VAULT_URL=f"https://127.0.0.1:{self.api_port}",
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> str:
        r = subprocess.run([self.exe, *args], capture_output=True, text=True, env=self.env, check=False)
        if r.returncode:
            raise SystemExit(f"dingyuan {' '.join(args)} failed: {r.stderr.strip()[-800:]}")
        return r.stdout

    def prepare(self) -> None:
        shutil.rmtree(self.work / "vault", ignore_errors=True)
        self.passfile.write_text(PASSWORD)
        self.cli("vault", "init", "--dir", str(self.vdir), "--passphrase-file", str(self.passfile))
        repo = ["--repo", str(self.vdir / "repository"), "--passphrase-file", str(self.passfile)]
        log("setup: backing up base.img and a 1 TiB sparse image, restoring base.img for qemu-nbd")
        self.cli("backup", str(self.data / "base.img"), "--volume", "base", "--host", "bench", *repo)
        huge = self.work / "huge.img"
        with open(huge, "wb") as f:
            f.truncate(HUGE)
            for i in range(4):
                f.seek(i * (HUGE // 4))
                f.write(os.urandom(2 << 20))
        self.cli("backup", str(huge), "--volume", "huge", "--host", "bench", *repo)
        huge.unlink()
        self.restored = self.work / "restored.img"
        self.cli("restore", "base@latest", str(self.restored), *repo)

    def start(self) -> None:
        with open(self.work / "vault.log", "wb") as vlog:
            self.procs.append(
                subprocess.Popen(
                    [self.exe, "vault", "serve", "--dir", str(self.vdir),
                     "--passphrase-file", str(self.passfile), "--listen", f"127.0.0.1:{self.api_port}",
                     "--nbd-listen", f"127.0.0.1:{self.nbd_port}", "--log-level", "warning"],
                    stdout=vlog, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        self.procs.append(
            subprocess.Popen(
                ["qemu-nbd", "-r", "-t", "-f", "raw", "-x", "disk", "-b", "127.0.0.1",
                 "-p", str(self.qemu_port), "--cache=writeback", str(self.restored)],
            )
        )  # fmt: skip
        wait("the vault's NBD listener", lambda: connectable(self.nbd_port))
        wait("qemu-nbd", lambda: connectable(self.qemu_port))
        wait("the vault's API", lambda: self._api_up())

    def _api_up(self) -> bool:
        r = subprocess.run(
            [self.exe, "export", "list", "--json"], capture_output=True, env=self.env, check=False
        )
        return r.returncode == 0

    def export(self, ref: str) -> tuple[str, int]:
        doc = json.loads(self.cli("export", "start", ref, "--json"))
        return str(doc["uri"]), int(doc["id"])

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def time_to_first_byte(setup: Setup) -> float:
    t0 = time.monotonic()
    uri, export_id = setup.export("huge@latest")
    h = nbd.NBD()
    h.connect_uri(uri)
    first = h.pread(4096, 0)
    elapsed = time.monotonic() - t0
    assert h.get_size() == HUGE and any(first)
    h.shutdown()
    setup.cli("export", "stop", str(export_id))
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dingyuan-bench-export"))
    ap.add_argument("--data", type=Path, help="where base.img is (default WORK/data)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each random-read run")
    args = ap.parse_args()
    work: Path = args.work
    data: Path = args.data or work / "data"
    exe = str(REPO_ROOT / ".venv" / "bin" / "dingyuan")
    if not Path(exe).exists():
        raise SystemExit("no .venv/bin/dingyuan: run scripts/test.sh or scripts/run.sh first")
    ensure_workload(data)
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup(exe, work, data)
    setup.prepare()
    size = (data / "base.img").stat().st_size
    keys = [f"{figure}_{server}" for figure in ("seq", "cpu", "nbdcopy", "iops") for server in ("dy", "qemu")]
    results: dict[str, list[float]] = {k: [] for k in [*keys, "ttfb"]}
    load_start = os.getloadavg()
    try:
        setup.start()
        uri, _ = setup.export("base@latest")
        qemu_uri = f"nbd://127.0.0.1:{setup.qemu_port}/disk"
        subprocess.run(["nbdcopy", qemu_uri, "null:"], check=True)  # warm both page caches
        for rep in range(args.reps):
            results["ttfb"].append(time_to_first_byte(setup))
            for name, u, pid in (("dy", uri, setup.procs[0].pid), ("qemu", qemu_uri, setup.procs[1].pid)):
                elapsed, server_cpu, client_cpu = sequential(u, pid)
                results[f"seq_{name}"].append(size / elapsed / 1e6)
                results[f"cpu_{name}"].append(server_cpu)
                results[f"nbdcopy_{name}"].append(client_cpu)
                results[f"iops_{name}"].append(random_reads(u, args.seconds, rep))
            last = {k: v[-1] for k, v in results.items()}
            log(
                f"[{rep + 1}/{args.reps}] sequential {last['seq_dy']:.0f} vs {last['seq_qemu']:.0f} MB/s "
                f"(server CPU {last['cpu_dy']:.2f} vs {last['cpu_qemu']:.2f} s), "
                f"random {last['iops_dy']:.0f} vs {last['iops_qemu']:.0f} IOPS, "
                f"first byte {last['ttfb']:.2f} s"
            )
    finally:
        setup.stop()
    load_end = os.getloadavg()
    med = {k: statistics.median(v) for k, v in results.items()}
    seq_ratio = med["seq_dy"] / med["seq_qemu"]
    iops_ratio = med["iops_dy"] / med["iops_qemu"]
    gib = size / (1 << 30)
    print(
        f"\n## Export against qemu-nbd ({gib:.1f} GiB image, median of {args.reps}, {os.cpu_count()} CPUs, "
        f"load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end)\n"
    )
    print("| check | dingyuan | qemu-nbd | ratio | budget | result |")
    print("|---|---|---|---|---|---|")
    print(f"| sequential read (nbdcopy) | {med['seq_dy']:.0f} MB/s | {med['seq_qemu']:.0f} MB/s "
          f"| {seq_ratio:.2f}× | ≥ {SEQ_BUDGET}× "
          f"| {'PASS' if seq_ratio >= SEQ_BUDGET else 'FAIL'} |")  # fmt: skip
    print(f"| CPU per sequential pass: server / nbdcopy | {med['cpu_dy']:.2f} / {med['nbdcopy_dy']:.2f} s "
          f"| {med['cpu_qemu']:.2f} / {med['nbdcopy_qemu']:.2f} s "
          f"| {med['cpu_dy'] / med['cpu_qemu']:.1f}× | — | — |")  # fmt: skip
    print(f"| 4 KiB random read, QD{QUEUE_DEPTH} | {med['iops_dy']:.0f} IOPS | {med['iops_qemu']:.0f} IOPS "
          f"| {iops_ratio:.2f}× | — | — |")  # fmt: skip
    print(f"| export start to first byte, 1 TiB sparse | {med['ttfb']:.2f} s | — | — | ≤ {TTFB_BUDGET} s "
          f"| {'PASS' if med['ttfb'] <= TTFB_BUDGET else 'FAIL'} |")  # fmt: skip
    doc = {"runs": results, "median": med, "load_start": load_start, "load_end": load_end}
    (work / "export.json").write_text(json.dumps(doc, indent=2))
    print(f"\nJSON: {work / 'export.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
