"""iSCSI exports end to end: a vault process serves snapshots (read-only, write-protected) and
clones (writable) over iSCSI to libiscsi's tools and qemu, with CHAP, across a vault restart, and
qemu boots the test system from an iSCSI export, both as an iscsi:// drive and through iPXE's
sanboot as a physical server would."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mountkit import leftovers, needs_mount_tools
from protectkit import Vault, cli, sha256_file, wait_for

import bootkit
from dingyuan.recovery.vm import accelerator

pytestmark = [needs_mount_tools]
USER, SECRET = "winsrv01", "a-long-chap-secret"
IPXE_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")
BOOT_BUDGET = 180.0


@dataclass
class Site:
    root: Path
    vault: Vault
    raw: Path
    system: Path

    def dy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.vault.dy(*args, check=check)

    def export(self, ref: str, *more: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(
            self.dy("export", "start", ref, "--protocol", "iscsi", *more, "--json").stdout
        )
        return doc

    def snapshot(self, volume: str) -> dict[str, Any]:
        snaps: list[dict[str, Any]] = self.vault.call("GET", "/snapshots", params={"volume": volume})
        return snaps[-1]

    def restore(self, ref: str, out: Path) -> Path:
        cli(
            "restore",
            ref,
            str(out),
            "--repo",
            str(self.vault.dir / "repository"),
            "--passphrase-file",
            str(self.vault.passfile),
        )
        return out


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("iscsi")
    raw = root / "raw.img"
    rng = random.Random(7)
    with open(raw, "wb") as f:
        f.truncate(48 << 20)
        for _ in range(30):
            f.seek(rng.randrange(0, (48 << 20) - (256 << 10)))
            f.write(rng.randbytes(rng.randrange(1, 256 << 10)))
    system = bootkit.copy_image(bootkit.build_image(root / "cache"), root / "system.img")
    vault = Vault(root)
    repo = ["--repo", str(vault.dir / "repository"), "--passphrase-file", str(vault.passfile)]
    for volume, image in (("raw", raw), ("system", system)):
        cli("backup", str(image), "--volume", volume, "--host", "srv1", *repo)
    vault.start()
    try:
        yield Site(root, vault, raw, system)
    finally:
        vault.stop()
    assert leftovers(root) == []


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, f"{' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def with_chap(uri: str, user: str, secret: str) -> str:
    return uri.replace("iscsi://", f"iscsi://{user}%{secret}@", 1)


def test_a_snapshot_export_reads_exactly_and_refuses_writes(site: Site, tmp_path: Path) -> None:
    snap = site.snapshot("raw")
    export = site.export("raw@latest")
    uri, iqn = export["uri"], export["name"]
    assert export["portal"] == f"127.0.0.1:{site.vault.iscsi_port}"
    assert uri == f"iscsi://{export['portal']}/{iqn}/0"
    assert re.fullmatch(r"iqn\.2026-11\.org\.dingyuan:[a-z0-9]+\.snapshot-[0-9a-f]{12}-[0-9a-f]{6}", iqn)

    listing = run("iscsi-ls", f"iscsi://{export['portal']}").stdout
    assert f"Target:{iqn} Portal:{export['portal']},1" in listing
    assert "Vendor:DINGYUAN" in run("iscsi-inq", uri).stdout
    capacity = run("iscsi-readcapacity16", uri).stdout
    assert f"Total size:{site.raw.stat().st_size}" in capacity

    restored = site.restore(str(snap["id"]), tmp_path / "restored.img")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(restored), uri)

    refused = run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", uri, check=False)
    assert refused.returncode != 0 or "failed" in refused.stdout + refused.stderr
    assert sha256_file(site.restore(str(snap["id"]), tmp_path / "again.img")) == sha256_file(site.raw)
    site.dy("export", "stop", str(export["id"]))
    assert iqn not in run("iscsi-ls", f"iscsi://{export['portal']}").stdout


def test_chap_guards_the_login(site: Site, tmp_path: Path) -> None:
    export = site.export("raw@latest", "--chap", f"{USER}:{SECRET}")
    uri = export["uri"]
    assert export["chap_user"] == USER and SECRET not in json.dumps(export)
    for wrong in (uri, with_chap(uri, USER, "not-the-secret-1"), with_chap(uri, "intruder", SECRET)):
        refused = run("iscsi-inq", wrong, check=False)
        assert refused.returncode != 0 and "Authentication failure" in refused.stdout + refused.stderr
    assert "Vendor:DINGYUAN" in run("iscsi-inq", with_chap(uri, USER, SECRET)).stdout
    short = site.dy("export", "start", "raw@latest", "--protocol", "iscsi", "--chap", "u:short", check=False)
    assert short.returncode != 0 and "12 characters" in short.stderr
    site.dy("export", "stop", str(export["id"]))


def test_a_writable_export_writes_a_clone_that_survives_a_restart(site: Site, tmp_path: Path) -> None:
    snap = site.snapshot("raw")
    export = site.export("raw@latest", "--writable")
    assert export["kind"] == "clone" and export["writable"]
    run("qemu-io", "-f", "raw", "-c", "write -P 0xa5 1M 3M", "-c", "write -P 0x5a 40000k 4k", export["uri"])

    site.vault.kill()
    site.vault.start()
    wait_for(
        "the iSCSI export back", lambda: run("iscsi-inq", export["uri"], check=False).returncode == 0, 30
    )
    copy = tmp_path / "clone.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", export["uri"], str(copy))
    expected = bytearray(site.raw.read_bytes())
    expected[1 << 20 : 4 << 20] = b"\xa5" * (3 << 20)
    expected[40000 << 10 : (40000 << 10) + 4096] = b"\x5a" * 4096
    assert copy.read_bytes() == bytes(expected)
    site.dy("export", "stop", str(export["id"]))
    assert site.snapshot("raw")["id"] == snap["id"]
    assert sha256_file(site.restore(str(snap["id"]), tmp_path / "snap.img")) == sha256_file(site.raw)
    site.dy("clone", "delete", export["target"])


def _qemu(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    serial = tmp_path / "serial.log"
    accel = accelerator()
    with open(tmp_path / "qemu.log", "wb") as log:
        proc = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-accel",
                accel,
                "-m",
                "512",
                "-nographic",
                "-monitor",
                "none",
                "-serial",
                f"file:{serial}",
                "-no-reboot",
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, serial


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_serial(proc: subprocess.Popen[bytes], serial: Path, marker: str, timeout: float) -> None:
    def seen() -> bool:
        if proc.poll() is not None and not (serial.exists() and marker in serial.read_text(errors="replace")):
            raise AssertionError(
                f"qemu exited ({proc.returncode}) before {marker}: "
                f"{serial.read_text(errors='replace')[-2000:] if serial.exists() else ''}"
            )
        return serial.exists() and marker in serial.read_text(errors="replace")

    wait_for(f"{marker} on the serial console", seen, timeout, 0.2)


@pytest.mark.slow
def test_qemu_boots_the_test_system_from_an_iscsi_drive(site: Site, tmp_path: Path) -> None:
    export = site.export("system@latest", "--writable")
    proc, serial = _qemu(tmp_path, "-drive", f"file={export['uri']},format=raw,if=virtio,cache=none")
    try:
        _wait_serial(proc, serial, bootkit.READY, BOOT_BUDGET)
        _wait_serial(proc, serial, bootkit.WRITE_OK, 60)
    finally:
        _stop(proc)
    site.dy("export", "stop", str(export["id"]))
    clone = json.loads(site.dy("export", "start", export["target"], "--json").stdout)  # over NBD
    copy = tmp_path / "clone.img"
    run("nbdcopy", clone["uri"], str(copy))
    site.dy("export", "stop", str(clone["id"]))
    assert bootkit.written_marker(copy) == bootkit.WROTE.encode()
    site.dy("clone", "delete", export["target"])


@pytest.mark.slow
@pytest.mark.skipif(not IPXE_ROM.exists(), reason="needs qemu's iPXE ROMs (ipxe-qemu)")
def test_ipxe_sanboot_loads_the_system_from_the_export(site: Site, tmp_path: Path) -> None:
    """A physical server's path: iPXE logs in to the export (qemu's user network reaches the
    host's loopback as 10.0.2.2) and the BIOS boots the disk through it: bootloader, kernel and
    initramfs all come over iSCSI. The guest kernel has no iSCSI initiator of its own, so its
    init, finding no disk, says so: that line proves the initramfs came over the wire."""
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    script = tftp / "boot.ipxe"
    export = site.export(
        "system@latest", "--chap", f"{USER}:{SECRET}", "--ipxe", str(script), "--ipxe-server", "10.0.2.2"
    )
    text = script.read_text()
    assert f"sanboot iscsi:10.0.2.2::{site.vault.iscsi_port}:0:{export['name']}" in text
    # iPXE takes CHAP credentials from settings; the script the vault writes leaves them to the admin
    script.write_text(text.replace("dhcp ||", f"set username {USER}\nset password {SECRET}\ndhcp ||"))
    proc, serial = _qemu(
        tmp_path,
        "-netdev",
        f"user,id=n0,tftp={tftp},bootfile=boot.ipxe",
        "-device",
        "virtio-net-pci,netdev=n0,bootindex=1",  # its option ROM is qemu's iPXE
    )
    try:
        _wait_serial(proc, serial, "no /dev/vda", BOOT_BUDGET)
    finally:
        _stop(proc)
    site.dy("export", "stop", str(export["id"]))
