#!/usr/bin/env python3
"""Delta restore against a full restore, on the shared workload's base.img (a 2 GiB disk image).

    python3 bench/restore_bench.py [--work DIR] [--data DIR] [--reps N] [--fsync]

Per repetition: a fresh encrypted repository and a backup of base.img (not timed); then, each as
one timed CLI process (start-up and key derivation included):

- **full**: ``dingyuan restore bench@latest full.img``;
- **delta**: a copy of full.img (``cp --sparse=always``, not timed) has 1 % of its 4 KiB blocks,
  chosen at random, overwritten with random bytes; ``dingyuan restore bench@latest damaged.img
  --delta`` makes it the snapshot again.

Both run with ``--no-fsync`` unless ``--fsync`` (then each flushes what it wrote). The budgets: delta
time at most 0.1x the full restore's; bytes the delta fetched from packs at most 2x the bytes of
the damaged chunks (64 KiB each). Both images are compared with base.img. Medians are printed as a
table, with the CPU time of each restore and the machine's load average before each one (on a
shared machine the wall times follow the load; the CPU times much less); WORK/restore.json holds
every repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from run_bench import REPO_ROOT, ensure_workload, log, same_bytes

PASSWORD = "bench"
CHUNK = 64 << 10
BLOCK = 4 << 10
DAMAGE = 0.01
TIME_BUDGET = 0.1
FETCH_BUDGET = 2.0
CLI = [sys.executable, "-m", "dingyuan.cli.main"]


def timed_json(args: list[str], env: dict[str, str]) -> tuple[float, float, float, dict[str, Any]]:
    """Run the CLI with ``--json`` as one child after a sync; (1-minute load average before it,
    wall s, CPU s, its JSON)."""
    os.sync()
    load = os.getloadavg()[0]
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.Popen([*CLI, *args, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"dingyuan {' '.join(args)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    after = os.times()
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return load, wall, cpu, json.loads(out)


def damage(path: Path, seed: int) -> tuple[int, int]:
    """Overwrite DAMAGE of the 4 KiB blocks of ``path`` at random; (blocks, distinct chunks)."""
    rng = random.Random(seed)
    nblocks = path.stat().st_size // BLOCK
    blocks = rng.sample(range(nblocks), int(nblocks * DAMAGE))
    fd = os.open(path, os.O_WRONLY)
    try:
        for b in blocks:
            os.pwrite(fd, rng.randbytes(BLOCK), b * BLOCK)
    finally:
        os.close(fd)
    return len(blocks), len({b * BLOCK // CHUNK for b in blocks})


def run_rep(w: Path, base: Path, env: dict[str, str], seed: int, fsync: bool) -> dict[str, Any]:
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    subprocess.run(
        [*CLI, "repo", "init", "--encryption", "aes-256-gcm"], env=env, check=True, capture_output=True
    )
    subprocess.run([*CLI, "backup", str(base), "--volume", "bench"], env=env, check=True, capture_output=True)
    full_img, damaged_img = w / "full.img", w / "damaged.img"
    flush = [] if fsync else ["--no-fsync"]
    full_load, full_s, full_cpu, full = timed_json(["restore", "bench@latest", str(full_img), *flush], env)
    subprocess.run(["cp", "--sparse=always", str(full_img), str(damaged_img)], check=True)
    blocks, chunks = damage(damaged_img, seed)
    delta_load, delta_s, delta_cpu, delta = timed_json(
        ["restore", "bench@latest", str(damaged_img), "--delta", *flush], env
    )
    return {
        "full_s": full_s,
        "full_cpu_s": full_cpu,
        "full_load": full_load,
        "delta_s": delta_s,
        "delta_cpu_s": delta_cpu,
        "delta_load": delta_load,
        "ratio": delta_s / full_s,
        "blocks_damaged": blocks,
        "chunks_damaged": chunks,
        "damaged_bytes": chunks * CHUNK,
        "full": full,
        "delta": delta,
        "fetch_ratio": delta["bytes_fetched"] / (chunks * CHUNK),
        "bit_exact": same_bytes(full_img, base) and same_bytes(damaged_img, base),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dingyuan-bench"), help="scratch and results")
    ap.add_argument("--data", type=Path, help="directory with base.img and mut.img (default WORK/data)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fsync", action="store_true", help="flush each restore to disk (the CLI's default)")
    args = ap.parse_args()
    work: Path = args.work.resolve()
    data: Path = (args.data or work / "data").resolve()
    ensure_workload(data)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        DINGYUAN_REPO=str(work / "restore-bench" / "repo"),
        DINGYUAN_PASSPHRASE=PASSWORD,
        DINGYUAN_CACHE_DIR=str(work / "restore-bench" / "cache"),
    )
    reps = []
    for n in range(args.reps):
        log(f"repetition {n + 1}/{args.reps}")
        reps.append(run_rep(work / "restore-bench", data / "base.img", env, seed=n, fsync=args.fsync))
    (work / "restore.json").write_text(json.dumps(reps, indent=2))
    med = statistics.median
    full_s, delta_s = med(r["full_s"] for r in reps), med(r["delta_s"] for r in reps)
    fetched, damaged = med(r["delta"]["bytes_fetched"] for r in reps), med(r["damaged_bytes"] for r in reps)
    ratio, fetch_ratio = delta_s / full_s, fetched / damaged
    exact = all(r["bit_exact"] for r in reps)
    last = reps[-1]["delta"]
    rep = reps[-1]
    met = {True: "met", False: "not met"}
    mode = "fsync" if args.fsync else "--no-fsync"
    print(f"Delta restore, {args.reps} repetition(s), medians, {mode}\n")
    print(f"Damage: {rep['blocks_damaged']} blocks of 4 KiB in {rep['chunks_damaged']} chunks of 64 KiB.")
    print(f"The delta compared {last['chunks_compared']} chunks, {last['chunks_differing']} differed, ")
    print(f"{last['chunks_fetched']} were fetched (the others are holes in the snapshot); it wrote")
    print(f"{last['bytes_written'] / 2**20:.1f} MiB and zeroed {last['bytes_zeroed'] / 2**20:.1f} MiB.\n")
    print("| check | figure | budget | result |")
    print("|---|---|---|---|")
    for kind in ("full", "delta"):
        wall, cpu = med(r[f"{kind}_s"] for r in reps), med(r[f"{kind}_cpu_s"] for r in reps)
        load = med(r[f"{kind}_load"] for r in reps)
        print(f"| {kind} restore | {wall:.2f} s ({cpu:.2f} CPU-s, load {load:.1f}) | | |")
    print(f"| delta / full time | {ratio:.2f}x | {TIME_BUDGET}x | {met[ratio <= TIME_BUDGET]} |")
    figure = f"{fetched / 2**20:.1f} MiB / {damaged / 2**20:.1f} MiB = {fetch_ratio:.2f}x"
    print(f"| fetched / damaged bytes | {figure} | {FETCH_BUDGET}x | {met[fetch_ratio <= FETCH_BUDGET]} |")
    print(f"| bit-exact | {'yes' if exact else 'NO'} | | {met[exact]} |")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
