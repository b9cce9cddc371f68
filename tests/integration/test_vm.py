"""Booting a real test system (tests/bootkit.py: MBR, extlinux, Debian's kernel, a busybox
initramfs) as a VM with the launcher: from an image file and from an NBD export served by
qemu-nbd, as the vault serves a clone. The guest reports on its serial console and writes to its
disk, so the tests see that it booted, that its writes land on the export, and that a disk that
cannot boot is reported as such within the timeout."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountkit import free_port, nbd_server

import bootkit
from dingyuan.errors import ExportError, UsageError
from dingyuan.recovery.vm import Firmware, Network, Vm, VmSpec

#: the budget for the ready marker under software emulation (it takes a few seconds)
READY_BUDGET = 180.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-nbd") is None,
    reason="needs root (the boot disk is built on a loop device), qemu-system-x86_64 and qemu-nbd",
)


@pytest.fixture(scope="session")
def boot_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test system, built once per session; tests boot copies or read-only exports of it."""
    return bootkit.build_image(tmp_path_factory.mktemp("bootkit"))


@pytest.fixture
def disk(boot_image: Path, tmp_path: Path) -> Path:
    return bootkit.copy_image(boot_image, tmp_path / "disk.img")


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """The VM's run directory; a VM a failing test left running there is stopped."""
    path = tmp_path / "run"
    yield path
    if (path / "vm.json").exists():
        Vm.load(path).stop(timeout=0)


def wait_exit(vm: Vm, timeout: float = 30.0) -> int | None:
    deadline = time.monotonic() + timeout
    while vm.alive():
        assert time.monotonic() < deadline, f"VM still runs after {timeout} s"
        time.sleep(0.1)
    return vm.exit_status


def test_boots_from_an_image_file_and_writes_to_it(disk: Path, run_dir: Path) -> None:
    assert bootkit.written_marker(disk) != bootkit.WROTE.encode()
    vm = Vm.start(VmSpec("file-boot", str(disk), memory_mib=256), run_dir)
    ready = vm.wait_for_serial(bootkit.READY, READY_BUDGET)
    print(f"image file: ready marker after {ready:.1f} s ({vm.accel})")
    vm.wait_for_serial(bootkit.WRITE_OK, 30)
    assert wait_exit(vm) == 0  # the guest powered off
    assert bootkit.written_marker(disk) == bootkit.WROTE.encode()
    assert ready < READY_BUDGET


def test_boots_from_a_read_only_nbd_export(boot_image: Path, run_dir: Path) -> None:
    before = boot_image.read_bytes()
    with nbd_server(boot_image, read_only=True) as uri:
        vm = Vm.start(VmSpec("nbd-ro", uri, memory_mib=256, read_only=True), run_dir)
        ready = vm.wait_for_serial(bootkit.READY, READY_BUDGET)
        print(f"read-only NBD export: ready marker after {ready:.1f} s ({vm.accel})")
        vm.wait_for_serial(bootkit.WRITE_FAILED, 30)  # the guest sees a read-only disk
        assert wait_exit(vm) == 0
    assert boot_image.read_bytes() == before


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_boots_from_a_writable_nbd_export_and_its_writes_land_there(
    disk: Path, run_dir: Path, firmware: Firmware
) -> None:
    with nbd_server(disk) as uri:
        vm = Vm.start(VmSpec("nbd-rw", uri, memory_mib=256, firmware=firmware), run_dir)
        ready = vm.wait_for_serial(bootkit.READY, READY_BUDGET)
        print(f"writable NBD export, {firmware}: ready marker after {ready:.1f} s ({vm.accel})")
        vm.wait_for_serial(bootkit.WRITE_OK, 30)
        assert wait_exit(vm) == 0
    assert (run_dir / "efivars.fd").exists() == (firmware == "uefi")  # UEFI variables of its own
    assert bootkit.written_marker(disk) == bootkit.WROTE.encode()


def test_a_read_only_export_opened_for_writing_is_refused_with_qemus_reason(
    boot_image: Path, run_dir: Path
) -> None:
    with nbd_server(boot_image, read_only=True) as uri, pytest.raises(ExportError, match="read-only"):
        Vm.start(VmSpec("nbd-ro", uri, memory_mib=256), run_dir)


def test_an_unreachable_export_is_refused_at_start(run_dir: Path) -> None:
    uri = f"nbd://127.0.0.1:{free_port()}/disk"
    with pytest.raises(ExportError, match="qemu did not start"):
        Vm.start(VmSpec("nbd-gone", uri, memory_mib=256), run_dir)


def test_a_disk_without_boot_sector_fails_within_the_timeout(disk: Path, run_dir: Path) -> None:
    bootkit.break_boot_sector(disk)
    vm = Vm.start(VmSpec("broken", str(disk), memory_mib=256), run_dir)
    began = time.monotonic()
    with pytest.raises(ExportError, match=rf"did not show '{bootkit.READY}' within 8 s") as failure:
        vm.wait_for_serial(bootkit.READY, 8)
    assert time.monotonic() - began < 12
    assert "not a bootable disk" in str(failure.value)  # the firmware's own words, from the console
    assert vm.alive()  # the firmware waits for a bootable disk: the caller decides to stop it
    vm.stop(timeout=0)
    assert not vm.alive()


def test_wait_for_serial_reports_a_vm_that_ended_without_the_marker(disk: Path, run_dir: Path) -> None:
    vm = Vm.start(VmSpec("ends", str(disk), memory_mib=256), run_dir)
    with pytest.raises(ExportError, match=r"stopped \(exit status 0\) before its console showed 'NEVER'"):
        vm.wait_for_serial("NEVER", READY_BUDGET)


def test_stop_ends_a_running_vm(disk: Path, run_dir: Path) -> None:
    bootkit.write_settings(disk, linger=600)
    vm = Vm.start(VmSpec("stop-me", str(disk), memory_mib=256), run_dir)
    vm.wait_for_serial(bootkit.WRITE_OK, READY_BUDGET)
    assert vm.alive()
    with pytest.raises(UsageError, match="already runs"):
        Vm.start(VmSpec("stop-me", str(disk), memory_mib=256), run_dir)
    began = time.monotonic()
    vm.stop(timeout=1)  # this guest ignores the power button: qemu is told to quit
    assert time.monotonic() - began < 15
    assert not vm.alive()
    with pytest.raises(ProcessLookupError):
        os.killpg(vm.pid, 0)  # nothing of the VM's process group is left
    assert not (run_dir / "qmp.sock").exists()  # qemu ended cleanly and removed its socket


def test_load_finds_a_vm_started_by_another_process(disk: Path, run_dir: Path) -> None:
    bootkit.write_settings(disk, linger=600)
    starter = textwrap.dedent(
        f"""
        from pathlib import Path
        from dingyuan.recovery.vm import Firmware, Network, Vm, VmSpec
        Vm.start(VmSpec("elsewhere", {str(disk)!r}, memory_mib=256), Path({str(run_dir)!r}))
        """
    )
    subprocess.run([sys.executable, "-c", starter], check=True, timeout=60)  # and it exits
    vm = Vm.load(run_dir)
    assert vm.spec.name == "elsewhere" and vm.alive()
    vm.wait_for_serial(bootkit.WRITE_OK, READY_BUDGET)
    vm.stop(timeout=1)
    assert not Vm.load(run_dir).alive()


class Listener:
    """A TCP listener on the host's loopback that records what connects to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)  # so the thread sees close() soon
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                self.received.append(conn.recv(100))

    def close(self) -> None:
        self.closing.set()
        self.thread.join(5)
        self.sock.close()


def http_get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return b"".join(iter(lambda: s.recv(4096), b""))


@pytest.mark.parametrize(
    ("network", "outcome"), [("isolated", bootkit.NET_BLOCKED), ("user", bootkit.NET_REACHED)]
)
def test_the_probe_port_answers_and_only_a_user_network_reaches_out(
    disk: Path, run_dir: Path, network: Network, outcome: str
) -> None:
    """The guest tries to reach a listener on the host's loopback (10.0.2.2 inside qemu's user
    network); an isolated VM must not get through, yet its probe port answers."""
    listener = Listener()
    try:
        bootkit.write_settings(disk, reach=listener.port, linger=600)
        spec = VmSpec("net", str(disk), memory_mib=256, network=network, probe_port=bootkit.GUEST_HTTP_PORT)
        vm = Vm.start(spec, run_dir)
        vm.wait_for_serial(outcome, READY_BUDGET)
        probed = vm.wait_for_tcp(60, send=b"GET / HTTP/1.0\r\n\r\n")
        print(f"{network} network: probe port answered after {probed:.1f} s")
        assert vm.probe_host_port is not None
        assert bootkit.PROBE_REPLY.encode() in http_get(vm.probe_host_port)
        vm.stop(timeout=1)
    finally:
        listener.close()
    assert listener.received == ([] if network == "isolated" else [b"from-guest\n"])


def test_wait_for_tcp_waits_for_a_greeting(disk: Path, run_dir: Path) -> None:
    bootkit.write_settings(disk, linger=600)
    vm = Vm.start(VmSpec("banner", str(disk), memory_mib=256, probe_port=bootkit.GUEST_BANNER_PORT), run_dir)
    vm.wait_for_tcp(READY_BUDGET)
    assert vm.probe_host_port is not None
    with socket.create_connection(("127.0.0.1", vm.probe_host_port), timeout=10) as s:
        assert s.recv(100).startswith(bootkit.BANNER.encode())
    vm.stop(timeout=1)


def test_wait_for_tcp_does_not_take_qemus_forwarder_for_the_guest(disk: Path, run_dir: Path) -> None:
    """qemu accepts a forwarded connection even when nothing listens in the guest."""
    bootkit.write_settings(disk, linger=600)
    spec = VmSpec("no-listener", str(disk), memory_mib=256, probe_port=4444)
    vm = Vm.start(spec, run_dir)
    vm.wait_for_serial(bootkit.WRITE_OK, READY_BUDGET)
    with pytest.raises(ExportError, match="did not answer within 6 s"):
        vm.wait_for_tcp(6, send=b"GET / HTTP/1.0\r\n\r\n")
    vm.stop(timeout=1)
