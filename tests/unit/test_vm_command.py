"""The shapes of what the VM launcher hands to qemu, libvirt and iPXE: the option a user relies on
is there (the disk, the console log, no route out for an isolated VM), and wrong specs are refused
up front rather than by qemu."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dingyuan.errors import UsageError
from dingyuan.recovery.vm import OVMF_CODE, VmSpec, accelerator, ipxe_script, libvirt_xml, qemu_command

URI = "nbd://127.0.0.1:10809/web-01"


def options(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


def test_qemu_command_boots_the_export_with_its_console_and_monitor_in_the_run_dir(tmp_path: Path) -> None:
    cmd = qemu_command(VmSpec("web-01", URI, memory_mib=2048, cpus=2), tmp_path, accel="tcg")
    assert cmd[0] == "qemu-system-x86_64"
    assert options(cmd, "-drive") == [f"file={URI},format=raw,if=virtio,cache=writeback"]
    assert options(cmd, "-serial") == [f"file:{tmp_path}/serial.log"]
    assert options(cmd, "-qmp") == [f"unix:{tmp_path}/qmp.sock,server=on,wait=off"]
    assert options(cmd, "-accel") == ["tcg"]
    assert options(cmd, "-m") == ["2048"] and options(cmd, "-smp") == ["2"]
    assert options(cmd, "-display") == ["none"] and "-no-reboot" in cmd
    assert options(cmd, "-nic") == ["none"]  # isolated without a probe: no network at all
    assert options(cmd, "-machine") == ["q35,graphics=off"]  # the firmware's messages go to the log
    assert "-vnc" not in cmd and "-cpu" not in cmd


def test_qemu_command_networks(tmp_path: Path) -> None:
    isolated = VmSpec("a", URI, probe_port=22)
    assert options(qemu_command(isolated, tmp_path, accel="tcg", probe_host_port=4022), "-nic") == [
        "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:4022-:22"
    ]
    user = VmSpec("a", URI, network="user")
    assert options(qemu_command(user, tmp_path, accel="tcg"), "-nic") == ["user,model=virtio-net-pci"]
    bridge = VmSpec("a", URI, network="bridge", bridge="br0")
    nic = options(qemu_command(bridge, tmp_path, accel="tcg"), "-nic")
    assert nic == ["bridge,br=br0,model=virtio-net-pci"]
    with pytest.raises(UsageError):
        qemu_command(isolated, tmp_path, accel="tcg")  # a probe port needs the host side


def test_qemu_command_options(tmp_path: Path) -> None:
    spec = VmSpec("a", "/images/a,b.img", firmware="uefi", vnc=True, read_only=True)
    cmd = qemu_command(spec, tmp_path, accel="kvm")
    drives = options(cmd, "-drive")
    assert drives[0] == "file=/images/a,,b.img,format=raw,if=virtio,cache=writeback,readonly=on"
    assert drives[1] == f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
    assert drives[2] == f"if=pflash,format=raw,unit=1,file={tmp_path}/efivars.fd"
    assert options(cmd, "-vnc") == [f"unix:{tmp_path}/vnc.sock"] and options(cmd, "-machine") == ["q35"]
    assert options(cmd, "-accel") == ["kvm"] and options(cmd, "-cpu") == ["host"]


def test_qemu_command_refuses_a_run_dir_its_sockets_cannot_live_in(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="shorter path"):
        qemu_command(VmSpec("a", URI), tmp_path / ("x" * 120), accel="tcg")


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "bad name"},
        {"name": ""},
        {"disk_uri": ""},
        {"memory_mib": 16},
        {"cpus": 0},
        {"network": "nat"},
        {"network": "bridge"},
        {"bridge": "br0"},
        {"network": "bridge", "bridge": "br0; rm -rf /"},
        {"firmware": "coreboot"},
        {"probe_port": 70000},
    ],
)
def test_spec_refuses_what_qemu_would_not_run(fields: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        VmSpec(**{"name": "a", "disk_uri": URI, **fields})  # type: ignore[arg-type]


def test_spec_round_trips_through_json() -> None:
    spec = VmSpec("a", URI, network="bridge", bridge="br0", probe_port=80, vnc=True)
    assert VmSpec.from_json(spec.to_json()) == spec


def test_accelerator_needs_both_the_device_and_the_cpu_flags(tmp_path: Path) -> None:
    with_vmx, without = tmp_path / "vmx", tmp_path / "none"
    with_vmx.write_text("processor\t: 0\nflags\t\t: fpu vme vmx sse2\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu vme hypervisor sse2\n")
    assert accelerator("/dev/null", str(with_vmx)) == "kvm"
    assert accelerator("/dev/null", str(without)) == "tcg"  # nested KVM without hardware support
    assert accelerator(str(tmp_path / "no-kvm"), str(with_vmx)) == "tcg"


def test_libvirt_xml_has_the_nbd_disk() -> None:
    dom = ET.fromstring(libvirt_xml(VmSpec("web-01", URI, network="user", firmware="uefi")))
    assert dom.get("type") == "kvm" and dom.findtext("name") == "web-01"
    disk = dom.find("devices/disk")
    assert disk is not None and disk.get("type") == "network"
    source = disk.find("source")
    assert source is not None and (source.get("protocol"), source.get("name")) == ("nbd", "web-01")
    host = source.find("host")
    assert host is not None and (host.get("name"), host.get("port")) == ("127.0.0.1", "10809")
    assert dom.find("os[@firmware='efi']") is not None
    assert dom.find("devices/interface[@type='user']") is not None


def test_libvirt_xml_unix_socket_and_file_disks() -> None:
    dom = ET.fromstring(libvirt_xml(VmSpec("a", "nbd+unix:///clone-7?socket=/run/dy/nbd.sock")))
    host = dom.find("devices/disk/source/host")
    assert host is not None and (host.get("transport"), host.get("socket")) == ("unix", "/run/dy/nbd.sock")
    assert dom.find("devices/interface") is None  # isolated
    dom = ET.fromstring(libvirt_xml(VmSpec("a", "/images/a.img", read_only=True)))
    source = dom.find("devices/disk/source")
    assert source is not None and source.get("file") == "/images/a.img"
    assert dom.find("devices/disk/readonly") is not None


@pytest.mark.skipif(
    shutil.which("virt-xml-validate") is None, reason="needs virt-xml-validate (libvirt-clients)"
)
@pytest.mark.parametrize(
    "spec",
    [
        VmSpec("web-01", URI, network="bridge", bridge="br0", vnc=True),
        VmSpec("web-02", "nbd+unix:///disk?socket=/run/nbd.sock", firmware="uefi", read_only=True),
        VmSpec("web-03", "/images/a.img", network="user"),
    ],
)
def test_libvirt_xml_is_valid_for_libvirt(spec: VmSpec, tmp_path: Path) -> None:
    path = tmp_path / "domain.xml"
    path.write_text(libvirt_xml(spec))
    done = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ipxe_script_sanboots_the_iscsi_export() -> None:
    script = ipxe_script("192.0.2.10", "iqn.2026-01.org.dingyuan:web-01", name="web-01")
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    assert "sanboot iscsi:192.0.2.10::3260:1:iqn.2026-01.org.dingyuan:web-01 || goto failed" in lines
    with pytest.raises(UsageError):
        ipxe_script("192.0.2.10", "web-01")
    with pytest.raises(UsageError):
        ipxe_script("host name", "iqn.2026-01.org.dingyuan:web-01")
