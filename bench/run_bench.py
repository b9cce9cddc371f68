#!/usr/bin/env python3
"""dingyuan against restic, borg and benji on the same disk workload, in one run.

    python3 bench/run_bench.py [--work DIR] [--data DIR] [--reps N] [--peers restic,borg,benji]

For every tool and repetition, the sequence of the shared kit's bench_peers.sh:
fresh repository, copy base.img to the source, timed full backup, copy mut.img over the source
(``cp --sparse=always``), timed incremental backup, timed restore of the latest snapshot, and a byte
comparison of the restored image with mut.img. ``sync`` runs before each timed step; caches are not dropped.

Each timed step is one child process: wall time, user and system CPU and peak RSS come from ``os.wait4``
(the child and the processes it waited for). Repository sizes are ``du -sb`` of the repository directory.
Figures are medians over the repetitions; peak RSS is the largest seen in any step of any repetition.
Results are printed as markdown tables and written to WORK/results.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import stat
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
ALL_PEERS = ("restic", "borg", "benji")
OPS = ("full", "incr", "restore")
PASSWORD = "bench"  # restic's and dingyuan's repository passphrase: both encrypt
PipStep = tuple[dict[str, str], list[str]]  # extra environment, pip arguments
BENJI_INSTALL: tuple[PipStep, ...] = (  # as the shared kit's README says
    ({"CC": "/bin/false"}, ["install", "ruamel.yaml==0.15.100"]),  # no C compiler: the pure-Python build
    ({}, ["install", "benji==0.17.0"]),
)
# The budgets: dingyuan / best peer (time or bytes) must not exceed these ratios.
RATIO_BUDGETS = (
    ("full backup time", "full", "wall_s", 0.5),
    ("incremental backup time", "incr", "wall_s", 0.2),
    ("restore time", "restore", "wall_s", 0.5),
    ("bytes added by incremental", "added", "bytes", 0.5),
)
RSS_BUDGET_MIB = 150.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Runs an untimed helper command, output captured; raises on failure."""
    return subprocess.run(cmd, check=True, text=True, capture_output=True, stdin=subprocess.DEVNULL, **kw)


class StepFailed(Exception):
    pass


@dataclass
class Step:
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_kib: int
    repo_bytes: int | None = None

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


@dataclass
class Rep:
    steps: dict[str, Step] = field(default_factory=dict)
    bit_exact: bool | None = None


def timed(cmd: list[str], cwd: Path, env: dict[str, str], logfile: Path) -> Step:
    """Runs CMD as one child after a sync and returns its wall time and resource usage."""
    os.sync()
    with logfile.open("ab") as out:
        out.write(f"\n$ (cd {cwd} && {shlex.join(cmd)})\n".encode())
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-15:]
        raise StepFailed(
            f"exit status {proc.returncode}: {shlex.join(cmd)}: {tail[-1] if tail else 'no output'}\n    "
            + "\n    ".join(tail)
        )
    return Step(wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss)


def du_bytes(path: Path) -> int:
    """Apparent size of a tree like ``du -sb``: files, directories and links, hard links once."""
    if not path.exists():
        return 0
    seen: set[tuple[int, int]] = set()
    total = path.lstat().st_size
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def same_bytes(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"not root: cannot apt-get install {' '.join(packages)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdin=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, check=True)


# --- the tools ------------------------------------------------------------------------------------------


class Tool:
    """One backup tool: how to make a repository, back up, restore. W is the per-repetition directory:
    W/src/disk.img is the source, W/repo the repository, W/restore the restore target."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.note = ""

    def prepare(self) -> bool:
        """Installs the tool when missing; False (with self.note) when it cannot be used."""
        raise NotImplementedError

    def version(self) -> str:
        return ""

    def env(self, w: Path) -> dict[str, str]:
        return dict(os.environ)

    def init(self, w: Path, env: dict[str, str], logfile: Path) -> None:
        raise NotImplementedError

    def backup(self, w: Path, op: str) -> tuple[list[str], Path]:
        """The command (and its working directory) of the full (op="full") or incremental backup."""
        raise NotImplementedError

    def restore(self, w: Path) -> tuple[list[str], Path, Path]:
        """The restore command, its working directory and the restored image's path."""
        raise NotImplementedError


def _logged(cmd: list[str], logfile: Path, **kw: Any) -> None:
    with logfile.open("ab") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n".encode())
        out.flush()
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kw)


class Dingyuan(Tool):
    name = "dingyuan"

    exe_override: str | None = None  # --dingyuan

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        venv_exe = REPO_ROOT / ".venv" / "bin" / "dingyuan"
        self.exe = self.exe_override or (
            str(venv_exe) if venv_exe.exists() else (shutil.which("dingyuan") or "")
        )

    def prepare(self) -> bool:
        if not self.exe:
            self.note = "no dingyuan executable (.venv/bin/dingyuan or PATH): run scripts/test.sh first"
            return False
        probe = subprocess.run([self.exe, "--help"], capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            self.note = f"`{self.exe} --help` fails (CLI not ready?): {last[-200:]}"
            return False
        return True

    def version(self) -> str:
        python = Path(self.exe).with_name("python")
        ver = run([str(python), "-c", "import importlib.metadata as m; print(m.version('dingyuan'))"])
        commit = run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
        return f"{ver.stdout.strip()} ({commit.stdout.strip()})"

    def env(self, w: Path) -> dict[str, str]:
        return dict(
            os.environ,
            DINGYUAN_REPO=str(w / "repo"),
            DINGYUAN_PASSPHRASE=PASSWORD,
            DINGYUAN_CACHE_DIR=str(w / "cache"),
        )

    def init(self, w: Path, env: dict[str, str], logfile: Path) -> None:
        _logged([self.exe, "repo", "init", "--encryption", "aes-256-gcm"], logfile, env=env, cwd=w)

    def backup(self, w: Path, op: str) -> tuple[list[str], Path]:
        return [self.exe, "backup", "disk.img", "--volume", "bench"], w / "src"

    def restore(self, w: Path) -> tuple[list[str], Path, Path]:
        # Like the peers, which leave restored files in the page cache; the durable restore
        # (dingyuan's default: fsync before reporting success) is timed as an extra step.
        target = w / "restore" / "disk.img"
        return [self.exe, "restore", "--no-fsync", "bench@latest", str(target)], w, target

    def durable_restore(self, w: Path) -> list[str]:
        return [self.exe, "restore", "bench@latest", str(w / "restore" / "durable.img")]


class Restic(Tool):
    name = "restic"

    def prepare(self) -> bool:
        if not shutil.which("restic"):
            apt_install("restic")
        return True

    def version(self) -> str:
        return run(["restic", "version"]).stdout.split(" compiled")[0]

    def env(self, w: Path) -> dict[str, str]:
        # Encrypted (restic always is). The cache of a new repository starts empty either way; keeping it
        # under W keeps ~/.cache clean.
        return dict(os.environ, RESTIC_PASSWORD=PASSWORD, RESTIC_CACHE_DIR=str(w / "cache"))

    def init(self, w: Path, env: dict[str, str], logfile: Path) -> None:
        _logged(["restic", "-q", "-r", str(w / "repo"), "init"], logfile, env=env)

    def backup(self, w: Path, op: str) -> tuple[list[str], Path]:
        return ["restic", "-r", str(w / "repo"), "backup", "--host", "bench", "disk.img"], w / "src"

    def restore(self, w: Path) -> tuple[list[str], Path, Path]:
        cmd = ["restic", "-r", str(w / "repo"), "restore", "latest", "--target", str(w / "restore")]
        return cmd, w / "src", w / "restore" / "disk.img"


class Borg(Tool):
    name = "borg"

    def prepare(self) -> bool:
        if not shutil.which("borg"):
            apt_install("borgbackup")
        return True

    def version(self) -> str:
        return run(["borg", "--version"]).stdout.strip()

    def env(self, w: Path) -> dict[str, str]:
        return dict(
            os.environ,
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_BASE_DIR=str(w / "borg-home"),  # caches and security dir of this run only
        )

    def init(self, w: Path, env: dict[str, str], logfile: Path) -> None:
        _logged(["borg", "init", "--encryption=none", str(w / "repo")], logfile, env=env)

    def backup(self, w: Path, op: str) -> tuple[list[str], Path]:
        return ["borg", "create", "--stats", f"{w / 'repo'}::{op}", "disk.img"], w / "src"

    def restore(self, w: Path) -> tuple[list[str], Path, Path]:
        return (
            ["borg", "extract", f"{w / 'repo'}::incr", "disk.img"],
            w / "restore",
            w / "restore" / "disk.img",
        )


class Benji(Tool):
    name = "benji"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.venv = work / "venv-benji"
        self.exe = str(self.venv / "bin" / "benji")

    def _works(self) -> bool:
        return (
            Path(self.exe).exists()
            and subprocess.run([self.exe, "--help"], capture_output=True, check=False).returncode == 0
        )

    def prepare(self) -> bool:
        if self._works():
            return True
        log(f"installing benji 0.17 into {self.venv}")
        try:
            run([sys.executable, "-m", "venv", str(self.venv)])
            for extra_env, pip_args in BENJI_INSTALL:
                env = dict(os.environ, PIP_NO_INPUT="1", **extra_env)
                run([str(self.venv / "bin" / "python"), "-m", "pip", *pip_args], env=env)
        except (OSError, subprocess.CalledProcessError) as exc:
            err = getattr(exc, "stderr", "") or str(exc)
            self.note = "benji install failed: " + " ".join(err.strip().splitlines()[-3:])[-400:]
            return False
        if not self._works():
            self.note = f"benji installed in {self.venv} but `benji --help` fails"
            return False
        return True

    def version(self) -> str:
        python = str(self.venv / "bin" / "python")
        return (
            "benji "
            + run([python, "-c", "import importlib.metadata as m; print(m.version('benji'))"]).stdout.strip()
        )

    def _config(self, w: Path) -> Path:
        return w / "benji.yaml"

    def init(self, w: Path, env: dict[str, str], logfile: Path) -> None:
        (w / "repo" / "data").mkdir(parents=True)
        self._config(w).write_text(
            "configurationVersion: '1'\n"
            f"databaseEngine: sqlite:///{w}/repo/benji.sqlite\n"
            "defaultStorage: s1\n"
            "storages:\n"
            "  - name: s1\n"
            "    storageId: 1\n"
            "    module: file\n"
            "    configuration:\n"
            f"      path: {w}/repo/data\n"
            "ios:\n"
            "  - name: file\n"
            "    module: file\n"
        )
        _logged([self.exe, "-c", str(self._config(w)), "database-init"], logfile, env=env)

    def backup(self, w: Path, op: str) -> tuple[list[str], Path]:
        cfg = str(self._config(w))
        src = f"file:{w}/src/disk.img"
        if op == "full":
            return [self.exe, "-c", cfg, "backup", "-u", "v1", src, "disk"], w / "src"
        return [self.exe, "-c", cfg, "backup", "-u", "v2", "-f", "v1", src, "disk"], w / "src"

    def restore(self, w: Path) -> tuple[list[str], Path, Path]:
        target = w / "restore" / "disk.img"
        return [self.exe, "-c", str(self._config(w)), "restore", "v2", f"file:{target}"], w / "src", target


TOOLS: dict[str, type[Tool]] = {"dingyuan": Dingyuan, "restic": Restic, "borg": Borg, "benji": Benji}


# --- workload -------------------------------------------------------------------------------------------


def find_gen_workload() -> Path:
    candidates = []
    if shared := os.environ.get("DINGYUAN_SHARED"):
        candidates += [Path(shared) / "bench" / "gen_workload.py", Path(shared) / "gen_workload.py"]
    candidates.append(REPO_ROOT.parent / "shared" / "bench" / "gen_workload.py")
    for path in candidates:
        if path.exists():
            return path
    raise SystemExit("gen_workload.py not found: set DINGYUAN_SHARED to the shared kit (…/shared)")


def python_with_numpy() -> str:
    for python in (sys.executable, str(REPO_ROOT / ".venv" / "bin" / "python"), "/usr/bin/python3"):
        if Path(python).exists():
            probe = subprocess.run([python, "-c", "import numpy"], capture_output=True, check=False)
            if probe.returncode == 0:
                return python
    log("no Python with numpy found: installing python3-numpy")
    apt_install("python3-numpy")
    return "/usr/bin/python3"


def ensure_workload(data: Path) -> None:
    base, mut = data / "base.img", data / "mut.img"
    if base.exists() and mut.exists():
        log(f"workload: reusing {base} and {mut}")
        return
    gen = find_gen_workload()
    python = python_with_numpy()
    data.mkdir(parents=True, exist_ok=True)
    for cmd, image in (("gen", base), ("mutate", mut)):
        if not image.exists():
            log(f"workload: {gen.name} {cmd} {data} (needs root for the loop mount)")
            subprocess.run([python, str(gen), cmd, str(data)], check=True, stdin=subprocess.DEVNULL)


# --- running --------------------------------------------------------------------------------------------


def run_rep(tool: Tool, w: Path, data: Path, logfile: Path) -> Rep:
    shutil.rmtree(w, ignore_errors=True)
    (w / "src").mkdir(parents=True)
    (w / "restore").mkdir()
    source = w / "src" / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(data / "base.img"), str(source)], check=True)
    env = tool.env(w)
    tool.init(w, env, logfile)
    rep = Rep()
    for op in ("full", "incr"):
        if op == "incr":
            subprocess.run(["cp", "--sparse=always", str(data / "mut.img"), str(source)], check=True)
        cmd, cwd = tool.backup(w, op)
        rep.steps[op] = step = timed(cmd, cwd, env, logfile)
        step.repo_bytes = du_bytes(w / "repo")
    cmd, cwd, restored = tool.restore(w)
    rep.steps["restore"] = timed(cmd, cwd, env, logfile)
    rep.bit_exact = restored.exists() and same_bytes(restored, data / "mut.img")
    if isinstance(tool, Dingyuan):
        rep.steps["restore_fsync"] = timed(tool.durable_restore(w), w, env, logfile)
    return rep


def summarize(reps: list[Rep], image_bytes: int) -> dict[str, Any]:
    med = statistics.median
    out: dict[str, Any] = {}
    for op in OPS:
        wall = med(r.steps[op].wall_s for r in reps)
        out[op] = {
            "wall_s": wall,
            "cpu_s": med(r.steps[op].cpu_s for r in reps),
            "maxrss_mib": max(r.steps[op].maxrss_kib for r in reps) / 1024,
            "mb_per_s": image_bytes / 1e6 / wall if wall > 0 else None,
        }
    full_bytes = [r.steps["full"].repo_bytes or 0 for r in reps]
    added = [(r.steps["incr"].repo_bytes or 0) - (r.steps["full"].repo_bytes or 0) for r in reps]
    out["repo_after_full_bytes"] = med(full_bytes)
    out["added"] = {"bytes": med(added)}
    out["peak_rss_mib"] = max(out[op]["maxrss_mib"] for op in OPS)
    out["bit_exact"] = all(r.bit_exact for r in reps)
    return out


def fmt(x: float | None, nd: int = 1) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def results_table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "| tool | full backup | incremental | restore | CPU s (full / incr / restore) | peak RSS "
        "| repo after full | added by incremental | restore bit-exact |\n|" + "---|" * 9
    )
    rows = [head]
    for name, res in results.items():
        s = res.get("summary")
        if not s:
            note = " ".join(str(res.get("note", "")).split()).replace("|", "\\|")
            rows.append(f"| {name} | {res['status']}: {note} |" + " |" * 7)
            continue
        f, i, r = s["full"], s["incr"], s["restore"]
        rows.append(
            f"| {name} | {fmt(f['wall_s'])} s ({fmt(f['mb_per_s'], 0)} MB/s) | {fmt(i['wall_s'])} s "
            f"| {fmt(r['wall_s'])} s ({fmt(r['mb_per_s'], 0)} MB/s) "
            f"| {fmt(f['cpu_s'])} / {fmt(i['cpu_s'])} / {fmt(r['cpu_s'])} "
            f"| {fmt(s['peak_rss_mib'], 0)} MiB | {fmt(s['repo_after_full_bytes'] / MiB, 0)} MiB "
            f"| +{fmt(s['added']['bytes'] / MiB, 1)} MiB | {'yes' if s['bit_exact'] else 'NO'} |"
        )
    return "\n".join(rows)


def budget_checks(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's budgets, each {check, unit, budget, result, [dingyuan, best_peer, peer_value, ratio]}."""
    dy = results.get("dingyuan", {}).get("summary")
    peers = {n: r["summary"] for n, r in results.items() if n != "dingyuan" and r.get("summary")}
    checks: list[dict[str, Any]] = []
    for label, op, key, budget in RATIO_BUDGETS:
        check: dict[str, Any] = {"check": label, "unit": key, "budget": f"≤ {budget}× best peer"}
        check["result"] = "n/a"
        if peers:
            best = min(peers, key=lambda n: peers[n][op][key])
            check.update(best_peer=best, peer_value=peers[best][op][key])
            if dy:
                value = dy[op][key]
                ratio = value / check["peer_value"] if check["peer_value"] > 0 else float("inf")
                check.update(dingyuan=value, ratio=ratio, result="PASS" if ratio <= budget else "FAIL")
        checks.append(check)
    rss: dict[str, Any] = {
        "check": "dingyuan peak RSS",
        "unit": "mib",
        "budget": f"≤ {RSS_BUDGET_MIB:.0f} MiB",
    }
    exact: dict[str, Any] = {
        "check": "dingyuan restore bit-exact",
        "unit": "bool",
        "budget": "every repetition",
    }
    rss["result"] = exact["result"] = "n/a"
    if dy:
        rss.update(
            dingyuan=dy["peak_rss_mib"], result="PASS" if dy["peak_rss_mib"] <= RSS_BUDGET_MIB else "FAIL"
        )
        exact.update(dingyuan=dy["bit_exact"], result="PASS" if dy["bit_exact"] else "FAIL")
    return [*checks, rss, exact]


def show(value: Any, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "bool":
        return "yes" if value else "no"
    if unit == "bytes":
        return f"{value / MiB:.1f} MiB"
    if unit == "mib":
        return f"{value:.0f} MiB"
    return f"{value:.2f} s"


def budget_table(checks: list[dict[str, Any]]) -> str:
    rows = ["| check | dingyuan | best peer | ratio | budget | result |", "|---|---|---|---|---|---|"]
    for c in checks:
        peer = f"{show(c['peer_value'], c['unit'])} ({c['best_peer']})" if "best_peer" in c else "—"
        ratio = f"{c['ratio']:.2f}×" if "ratio" in c else "—"
        dy = show(c.get("dingyuan"), c["unit"])
        rows.append(f"| {c['check']} | {dy} | {peer} | {ratio} | {c['budget']} | {c['result']} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dingyuan-bench"), help="scratch and results")
    ap.add_argument("--data", type=Path, help="directory with base.img and mut.img (default WORK/data)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per tool; figures are medians")
    ap.add_argument(
        "--peers", default=",".join(ALL_PEERS), help="comma-separated subset of restic,borg,benji"
    )
    ap.add_argument("--no-dingyuan", action="store_true", help="measure the peers only")
    ap.add_argument(
        "--dingyuan", metavar="EXE", help="dingyuan executable (default .venv/bin/dingyuan, PATH)"
    )
    args = ap.parse_args()

    peers = [p for p in (x.strip() for x in args.peers.split(",")) if p]
    if unknown := set(peers) - set(ALL_PEERS):
        ap.error(f"unknown peers: {', '.join(sorted(unknown))}")
    work: Path = args.work.resolve()
    data: Path = (args.data or work / "data").resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)

    ensure_workload(data)
    load_before = os.getloadavg()
    image_bytes = (data / "base.img").stat().st_size
    Dingyuan.exe_override = args.dingyuan
    names = ([] if args.no_dingyuan else ["dingyuan"]) + peers

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        tool = TOOLS[name](work)
        res: dict[str, Any] = {"status": "skipped", "note": ""}
        results[name] = res
        try:
            usable = tool.prepare()
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            usable, tool.note = False, f"install failed: {exc}"
        if not usable:
            res["note"] = tool.note
            log(f"[{name}] skipped: {tool.note}")
            continue
        try:
            res["version"] = tool.version()
        except (OSError, subprocess.CalledProcessError):
            res["version"] = "unknown"
        logfile = work / "logs" / f"{name}.log"
        logfile.write_bytes(b"")
        w = work / "run" / name
        reps: list[Rep] = []
        try:
            for i in range(1, args.reps + 1):
                rep = run_rep(tool, w, data, logfile)
                reps.append(rep)
                log(
                    f"[{name} {i}/{args.reps}] "
                    + ", ".join(f"{op} {st.wall_s:.1f} s" for op, st in rep.steps.items())
                    + f", bit-exact: {rep.bit_exact}"
                )
        except (StepFailed, subprocess.CalledProcessError, OSError) as exc:
            res.update(status="failed", note=str(exc).splitlines()[0])
            log(f"[{name}] FAILED: {exc} (log: {logfile})")
        finally:
            shutil.rmtree(w, ignore_errors=True)
        res["reps"] = [
            {"steps": {op: asdict(s) for op, s in r.steps.items()}, "bit_exact": r.bit_exact} for r in reps
        ]
        if reps and res["status"] != "failed":
            res["status"] = "ok"
            res["summary"] = summarize(reps, image_bytes)

    checks = budget_checks(results)
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "image_bytes": image_bytes,
        "data": str(data),
        "reps": args.reps,
        "medians_over_reps": True,
        "loadavg_before": load_before,  # other work on the machine skews the figures
        "loadavg_after": os.getloadavg(),
    }
    (work / "results.json").write_text(
        json.dumps({"meta": meta, "tools": results, "budgets": checks}, indent=2) + "\n"
    )

    size = f"{image_bytes / (1 << 30):.1f} GiB image"
    print(f"\n## Results ({size}, median of {args.reps} repetitions, {os.cpu_count()} CPUs)\n")
    print(results_table(results))
    print("\n## dingyuan against the best peer (the issue's budgets)\n")
    print(budget_table(checks))
    for name, res in results.items():
        if res["status"] != "ok":
            print(f"\n- {name}: {res['status']} — {res['note']}")
    dy_reps = results.get("dingyuan", {}).get("reps", [])
    durable = [r["steps"]["restore_fsync"]["wall_s"] for r in dy_reps if "restore_fsync" in r["steps"]]
    if durable:
        print(f"\n- dingyuan restore with fsync to disk (its default): {statistics.median(durable):.2f} s")
    print(f"\nLoad average before / after: {load_before[0]:.2f} / {meta['loadavg_after'][0]:.2f} (1 min)")
    print(f"\nJSON: {work / 'results.json'}; tool output: {work / 'logs'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
