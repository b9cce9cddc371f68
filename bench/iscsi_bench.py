#!/usr/bin/env python3
"""dingyuan's iSCSI target serving a snapshot against tgt serving the restored raw image, in one run.

    python3 bench/iscsi_bench.py [--work DIR] [--data DIR] [--reps N] [--seconds S] [--dingyuan EXE]

Setup (not timed): an encrypted repository in WORK/repo with base.img of the shared workload
backed up into it and restored to WORK/restored.img. dingyuan's target runs in a child process
(this script with ``--serve``): the snapshot opened as a SnapshotImage, exported as LUN 0 by a
ThreadedIscsiServer, from this checkout's source; the same server also exports restored.img as a
plain file (FileDevice), which tells the transport's cost from the snapshot's decoding. tgt's
``tgtd`` serves restored.img as LUN 1 on its own control port. All on 127.0.0.1, all reading from
the page cache (the packs and the image were just written, and a warm-up pass reads each once).

Per repetition, alternating the targets so drift hits them alike, libiscsi's ``iscsi-perf`` (one
connection, the same client for every target) for S seconds each:

- **sequential read**: 1 MiB READs from LBA 0 on, 16 in flight; MB/s (10^6 bytes).
- **4 KiB random read**: 4 KiB READs at random 4 KiB-aligned offsets, 32 in flight; IOPS.

The budget: sequential read ≥ 0.8× tgt. Results in WORK/iscsi.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

from run_bench import REPO_ROOT, ensure_workload, log
from transfer_bench import free_port, wait

PASSWORD = "bench"
SEQ_BUDGET = 0.8
IQN_DY = "iqn.2026-11.org.dingyuan.bench:snapshot"
IQN_FILE = "iqn.2026-11.org.dingyuan.bench:file"
IQN_TGT = "iqn.2026-11.org.dingyuan.bench:tgt"
SEQ_BLOCKS, SEQ_DEPTH = 2048, 16  # 1 MiB requests
RANDOM_BLOCKS, RANDOM_DEPTH = 8, 32  # 4 KiB requests
SECTOR = 512
TGT_SOCKETS = Path("/var/run/tgtd")


def serve(port: int, restored: Path) -> None:
    """The child process: dingyuan's target exporting base@latest and ``restored`` until SIGTERM."""
    from dingyuan.cli.common import open_repo
    from dingyuan.exports.blockdev import FileDevice
    from dingyuan.exports.iscsi.server import ThreadedIscsiServer
    from dingyuan.repository.image import SnapshotImage

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    repo = open_repo(os.environ["DINGYUAN_REPO"], None, Path(os.environ["DINGYUAN_CACHE_DIR"]))
    with (
        SnapshotImage(repo, repo.resolve("base@latest")) as image,
        ThreadedIscsiServer(host="127.0.0.1", port=port) as server,
    ):
        plain = FileDevice(restored, read_only=True)
        server.add(IQN_DY, image)
        server.add(IQN_FILE, plain)
        print("ready", flush=True)
        signal.sigwait({signal.SIGTERM})
    plain.close()
    repo.close()


def perf(url: str, seconds: float, *, blocks: int, depth: int, random_io: bool) -> float:
    """Requests per second ``iscsi-perf`` reports on average over ``seconds``."""
    cmd = ["iscsi-perf", "-m", str(depth), "-b", str(blocks), "-t", str(int(seconds))]
    cmd += ["-r"] if random_io else []
    r = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60, check=False)
    found = re.findall(r"iops average (\d+)", r.stdout)
    if r.returncode or not found:
        raise SystemExit(f"{' '.join(cmd)} {url} failed: {(r.stdout + r.stderr).strip()[-600:]}")
    return float(found[-1])


def load() -> str:
    """The load averages (1, 5, 15 minutes): other work on the machine skews the figures."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class Setup:
    def __init__(self, exe: str, work: Path, data: Path) -> None:
        self.exe = exe
        self.work = work
        self.data = data
        self.env = dict(
            os.environ,
            DINGYUAN_REPO=str(work / "repo"),
            DINGYUAN_PASSPHRASE=PASSWORD,
            DINGYUAN_CACHE_DIR=str(work / "cache"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH")])),
        )
        self.restored = work / "restored.img"
        self.dy_port = free_port()
        self.tgt_port = free_port()
        self.control = next(n for n in range(1000, 65536) if not (TGT_SOCKETS / f"socket.{n}").exists())
        self.dy: subprocess.Popen[str] | None = None
        self.tgtd: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> None:
        r = subprocess.run([self.exe, *args], capture_output=True, text=True, env=self.env, check=False)
        if r.returncode:
            raise SystemExit(f"dingyuan {' '.join(args)} failed: {r.stderr.strip()[-800:]}")

    def prepare(self) -> None:
        subprocess.run(["rm", "-rf", str(self.work / "repo"), str(self.work / "cache")], check=True)
        log("setup: backing up base.img, restoring it for tgt")
        self.cli("repo", "init", "--encryption", "aes-256-gcm")
        self.cli("backup", str(self.data / "base.img"), "--volume", "base", "--host", "bench")
        self.cli("restore", "--no-fsync", "base@latest", str(self.restored))

    def tgtadm(self, *args: str) -> None:
        subprocess.run(["tgtadm", "-C", str(self.control), *args], check=True, capture_output=True)

    def start(self) -> None:
        self.dy = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.dy_port), "--work", str(self.work)],
            env=self.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.dy.stdout is not None
        if self.dy.stdout.readline().strip() != "ready":
            raise SystemExit("dingyuan's iSCSI target did not start")
        with open(self.work / "tgtd.log", "wb") as tlog:
            self.tgtd = subprocess.Popen(
                ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.tgt_port}"],
                stdout=tlog,
                stderr=subprocess.STDOUT,
            )
        wait("tgtd", lambda: (TGT_SOCKETS / f"socket.{self.control}").exists())
        wait("tgtd's control socket", self._tgt_answers, timeout=30, step=0.2)
        self.tgtadm("--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", IQN_TGT)
        self.tgtadm("--lld", "iscsi", "--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                    "-b", str(self.restored))  # fmt: skip
        self.tgtadm("--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")

    def _tgt_answers(self) -> bool:
        r = subprocess.run(["tgtadm", "-C", str(self.control), "--op", "show", "--mode", "system"],
                           capture_output=True, check=False)  # fmt: skip
        return r.returncode == 0

    def stop(self) -> None:
        if self.tgtd is not None:
            # tgtd ignores SIGTERM: it stops when told so on its control socket, once it has no target
            for args in (
                ["--lld", "iscsi", "--op", "delete", "--mode", "target", "--tid", "1", "--force"],
                ["--op", "delete", "--mode", "system"],
            ):
                subprocess.run(["tgtadm", "-C", str(self.control), *args], check=False, capture_output=True)
            try:
                self.tgtd.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.tgtd.kill()
        if self.dy is not None:
            self.dy.send_signal(signal.SIGTERM)
            try:
                self.dy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.dy.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dingyuan-bench-iscsi"))
    ap.add_argument("--data", type=Path, help="where base.img is (default WORK/data)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each iscsi-perf run")
    ap.add_argument("--dingyuan", help="the CLI that backs up and restores (default .venv/bin/dingyuan)")
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        serve(args.serve, args.work / "restored.img")
        return 0
    work: Path = args.work
    data: Path = args.data or work / "data"
    exe = args.dingyuan or str(REPO_ROOT / ".venv" / "bin" / "dingyuan")
    if not Path(exe).exists():
        raise SystemExit(f"no {exe}: run scripts/test.sh or scripts/run.sh first, or pass --dingyuan")
    ensure_workload(data)
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup(exe, work, data)
    setup.prepare()
    urls = {
        "dy": f"iscsi://127.0.0.1:{setup.dy_port}/{IQN_DY}/0",
        "file": f"iscsi://127.0.0.1:{setup.dy_port}/{IQN_FILE}/0",
        "tgt": f"iscsi://127.0.0.1:{setup.tgt_port}/{IQN_TGT}/1",
    }
    results: dict[str, list[float]] = {f"{m}_{n}": [] for m in ("seq", "iops") for n in urls}
    loads = [load()]
    try:
        setup.start()
        for url in urls.values():  # warm-up: a sequential pass over each
            perf(url, args.seconds, blocks=SEQ_BLOCKS, depth=SEQ_DEPTH, random_io=False)
        for rep in range(args.reps):
            order = list(urls.items())
            for name, url in order if rep % 2 == 0 else reversed(order):
                rate = perf(url, args.seconds, blocks=SEQ_BLOCKS, depth=SEQ_DEPTH, random_io=False)
                results[f"seq_{name}"].append(rate * SEQ_BLOCKS * SECTOR / 1e6)
                results[f"iops_{name}"].append(
                    perf(url, args.seconds, blocks=RANDOM_BLOCKS, depth=RANDOM_DEPTH, random_io=True)
                )
            last = {k: v[-1] for k, v in results.items()}
            log(
                f"[{rep + 1}/{args.reps}] sequential {last['seq_dy']:.0f} (file {last['seq_file']:.0f}) "
                f"vs {last['seq_tgt']:.0f} MB/s, random {last['iops_dy']:.0f} (file {last['iops_file']:.0f}) "
                f"vs {last['iops_tgt']:.0f} IOPS (load {load()})"
            )
            loads.append(load())
    finally:
        setup.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    seq_ratio = med["seq_dy"] / med["seq_tgt"]
    iops_ratio = med["iops_dy"] / med["iops_tgt"]
    print(
        f"\n## iSCSI target against tgt (snapshot of base.img as a SnapshotImage, median of {args.reps}, "
        f"{os.cpu_count()} CPUs, load {loads[0]} before, {loads[-1]} after)\n"
    )
    print("| check | dingyuan (snapshot) | dingyuan (raw file) | tgt (raw file) | ratio | budget | result |")
    print("|---|---|---|---|---|---|---|")
    verdict = "PASS" if seq_ratio >= SEQ_BUDGET else "FAIL"
    print(f"| sequential read (1 MiB, QD{SEQ_DEPTH}) | {med['seq_dy']:.0f} MB/s | {med['seq_file']:.0f} MB/s "
          f"| {med['seq_tgt']:.0f} MB/s | {seq_ratio:.2f}× | ≥ {SEQ_BUDGET}× | {verdict} |")  # fmt: skip
    print(f"| 4 KiB random read, QD{RANDOM_DEPTH} | {med['iops_dy']:.0f} IOPS | {med['iops_file']:.0f} IOPS "
          f"| {med['iops_tgt']:.0f} IOPS | {iops_ratio:.2f}× | — | — |")  # fmt: skip
    print("\nratio: snapshot / tgt")
    doc = {"runs": results, "median": med, "seq_ratio": seq_ratio, "iops_ratio": iops_ratio, "load": loads}
    (work / "iscsi.json").write_text(json.dumps(doc, indent=2))
    print(f"\nJSON: {work / 'iscsi.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
