"""Run a protected server from its snapshot, end to end: an agent protects the test system (a real
Debian kernel with a busybox userland) and a PostgreSQL data disk; the vault boots the snapshots
in qemu over NBD, converts them for other hypervisors, and drills them: a good snapshot passes and
records its time to ready, a broken one fails and says so, on the snapshot itself."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from drillkit import Images, garble, make_pg_images
from fskit import loop_mount
from mountkit import leftovers, needs_mount_tools
from protectkit import Agent, Vault, sha256_file, wait_for

import bootkit

pytestmark = [needs_mount_tools, pytest.mark.slow]
READY_BUDGET = 180.0  # seconds to the ready marker under software emulation (the budget)
VOLUMES = ("system", "web", "broken", "pg", "pgbad", "auto")


@dataclass
class Site:
    root: Path
    vault: Vault
    system: Path  # the test system's disk, as protected
    pg: Images

    def dy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.vault.dy(*args, check=check)

    def snapshot(self, volume: str) -> dict[str, Any]:
        snaps: list[dict[str, Any]] = self.vault.snapshots("srv1", volume)
        return snaps[-1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, traversable_tmp: Path) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("boot")
    system = bootkit.copy_image(bootkit.build_image(root / "cache"), root / "system.img")
    broken = bootkit.copy_image(system, root / "broken.img")
    bootkit.break_boot_sector(broken)
    web = bootkit.copy_image(system, root / "web.img")  # stays up, serving its probe port
    bootkit.write_settings(web, linger=300)
    pg = make_pg_images(traversable_tmp)
    pgbad = root / "pgbad.img"
    shutil.copy(pg.crash, pgbad)
    with loop_mount(pgbad, root / "pgbad-mnt"):
        garble(root / "pgbad-mnt" / pg.data / "global" / "pg_control", 512)

    vault = Vault(root)
    vault.start()
    agent = Agent(root, vault, "srv1")
    try:
        vault.policy("daily", schedule="interval", interval_seconds=86400)
        drill = {"kind": "boot", "pattern": bootkit.READY, "timeout_seconds": 120, "memory_mib": 512}
        vault.policy("drilled", schedule="interval", interval_seconds=86400, drill=drill)
        sources = {
            "system": system,
            "web": web,
            "broken": broken,
            "pg": pg.crash,
            "pgbad": pgbad,
            "auto": system,
        }
        for volume in VOLUMES:
            vault.protect("srv1", volume, sources[volume], "drilled" if volume == "auto" else "daily")
        agent.start()
        wait_for("a snapshot of every volume", lambda: all(vault.snapshots("srv1", v) for v in VOLUMES), 300)
        agent.stop()  # nothing more to back up: the machine is the VMs' now
        yield Site(root, vault, system, pg)
    finally:
        agent.stop()
        vault.stop()
    assert leftovers(root) == []


def _wait_serial(log: Path, marker: str, timeout: float) -> None:
    wait_for(
        f"{marker} on the serial console",
        lambda: log.exists() and marker in log.read_text(errors="replace"),
        timeout,
        0.2,
    )


def test_a_snapshot_boots_over_nbd_and_its_writes_land_in_a_clone(site: Site, tmp_path: Path) -> None:
    snap = site.snapshot("system")
    t0 = time.monotonic()
    boot = json.loads(site.dy("boot", "srv1:system@latest", "--memory", "512", "--json").stdout)
    serial = Path(boot["serial_log"])
    _wait_serial(serial, bootkit.READY, READY_BUDGET)
    ready = time.monotonic() - t0
    print(f"time to ready marker: {ready:.1f} s ({boot['accelerator']})")
    assert ready <= READY_BUDGET
    _wait_serial(serial, bootkit.WRITE_OK, 60)
    assert [b["id"] for b in json.loads(site.dy("boot", "list", "--json").stdout)] == [boot["id"]]
    site.dy("boot", "stop", boot["id"])

    # the VM's write is in the clone; the snapshot is as it was, bytes and id
    clone_img, snap_img = tmp_path / "clone.img", tmp_path / "snap.img"
    for ref, out in ((boot["clone"], clone_img), (snap["id"], snap_img)):
        export = json.loads(site.dy("export", "start", ref, "--json").stdout)
        subprocess.run(["nbdcopy", export["uri"], str(out)], check=True)
        site.dy("export", "stop", str(export["id"]))
    assert bootkit.written_marker(clone_img) == bootkit.WROTE.encode()
    assert sha256_file(snap_img) == sha256_file(site.system)
    assert site.snapshot("system")["id"] == snap["id"]
    promoted = json.loads(
        site.dy("clone", "promote", boot["clone"], "--volume", "system-after", "--json").stdout
    )
    assert promoted["volume"] == "system-after"


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx"])
def test_convert_gives_an_identical_disk(site: Site, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"system.{fmt}"
    site.dy("convert", "srv1:system@latest", str(out), "--format", fmt, "--no-progress")
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(out)], capture_output=True, check=True, text=True
        ).stdout
    )
    assert info["format"] == fmt
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, str(site.system), str(out)],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def _drill(site: Site, volume: str, *probe: str, timeout: int = 120) -> tuple[int, dict[str, Any]]:
    done = site.dy(
        "drill", f"srv1:{volume}@latest", *probe, "--timeout", str(timeout), "--memory", "512", check=False
    )
    verdict = site.snapshot(volume)["annotations"]["drill"]
    return done.returncode, verdict


def test_boot_drills_pass_a_good_snapshot_and_fail_a_broken_one(site: Site) -> None:
    status, verdict = _drill(site, "system", "--console", bootkit.READY)
    assert status == 0 and verdict["result"] == "passed" and verdict["kind"] == "boot"
    assert 0 < verdict["seconds"] <= READY_BUDGET

    status, verdict = _drill(site, "broken", "--console", bootkit.READY, timeout=45)
    assert status == 40 and verdict["result"] == "failed"
    assert "did not show" in verdict["detail"] or "stopped" in verdict["detail"], verdict["detail"]
    shown = json.loads(
        site.dy(
            "snapshot",
            "show",
            "srv1:broken@latest",
            "--json",
            "--repo",
            str(site.vault.dir / "repository"),
            "--passphrase-file",
            str(site.vault.passfile),
        ).stdout
    )
    assert shown["annotations"]["drill"]["result"] == "failed"
    clones = json.loads(site.dy("clone", "list", "--json").stdout)
    assert not [c for c in clones if c["name"].startswith("drill-")]  # a drill cleans up after itself


def test_a_tcp_probe_drill_waits_for_the_guest_service(site: Site) -> None:
    status, verdict = _drill(site, "web", "--port", str(bootkit.GUEST_BANNER_PORT))  # it greets first
    assert status == 0 and verdict["result"] == "passed", verdict
    assert re.search(r"port \d+ answered", verdict["detail"])


def test_database_drills_pass_a_good_snapshot_and_fail_a_corrupt_one(site: Site) -> None:
    status, verdict = _drill(site, "pg", "--database", "postgresql")
    assert status == 0 and verdict["result"] == "passed", verdict
    assert verdict["kind"] == "postgresql"
    status, verdict = _drill(site, "pgbad", "--database", "postgresql")
    assert status == 40 and verdict["result"] == "failed"
    assert "PG_CONTROL_VERSION" in verdict["detail"], verdict["detail"]  # the server says why


def test_a_policy_drills_each_new_snapshot(site: Site) -> None:
    def verdict() -> dict[str, Any] | None:
        annotations = site.snapshot("auto")["annotations"]
        return annotations.get("drill")  # type: ignore[no-any-return]

    got = wait_for("the policy's drill of the new snapshot", verdict, 300, 1.0)
    assert got["result"] == "passed" and got["kind"] == "boot", got
    jobs = site.vault.call("GET", "/jobs", params={"limit": 1000})
    assert any(
        j["kind"] == "drill" and j["details"].get("snapshot") == site.snapshot("auto")["id"] for j in jobs
    )


def test_a_boot_that_cannot_start_leaves_nothing_behind(site: Site) -> None:
    clones = site.dy("clone", "list", "--json").stdout
    failed = site.dy("boot", "srv1:system@latest", "--network", "bridge", "--bridge", "nosuch0", check=False)
    assert failed.returncode != 0 and "nosuch0" in failed.stderr, failed.stderr
    assert site.dy("clone", "list", "--json").stdout == clones
    assert json.loads(site.dy("export", "list", "--json").stdout) == []
    assert json.loads(site.dy("boot", "list", "--json").stdout) == []
