"""Booting a protected server's disk as a virtual machine (qemu), and the same VM for libvirt and
for a physical server (iPXE).

The vault serves the snapshot's clone over NBD and qemu boots straight from the ``nbd://`` URI:
no copy is made, the guest's writes go to the clone. A VM is described by a :class:`VmSpec` and
lives in a *run directory* that holds everything about it::

    RUN_DIR/vm.json       what was started: the spec, the command, the pid, the start time
    RUN_DIR/serial.log    the guest's serial console (boot loaders and kernels print here)
    RUN_DIR/qmp.sock      qemu's QMP socket (power-down, quit)
    RUN_DIR/vnc.sock      the console's VNC, when asked for (a unix socket: nothing listens on
                          the network)
    RUN_DIR/qemu.log      qemu's own messages (why it refused to start)
    RUN_DIR/exit-status   qemu's exit status, written when it exits
    RUN_DIR/efivars.fd    the UEFI variables of a UEFI VM (a copy of OVMF's template)

qemu runs in a session of its own under a small shell that records its exit status, so the VM
outlives the process that started it (the vault owns it, and finds it again after a restart with
:meth:`Vm.load`), and its end can be told apart from its death: a status file means qemu exited
(0 when the guest powered off), none means it was killed.

Acceleration: KVM only when ``/dev/kvm`` opens *and* the CPU flags show vmx or svm. A nested KVM
whose host hides those flags is software-backed and slower than plain emulation (Linux guests hang
on it), so such machines use TCG.

Networks (``VmSpec.network``): ``isolated`` gives the guest no network at all, or, when a probe
port is asked for, qemu's user network with ``restrict=on`` (the guest reaches nothing, not even
the host) and one forwarded port, ``127.0.0.1:<free port>`` -> the guest's probe port, for a
health probe; ``user`` is qemu's NAT (the guest reaches what the host reaches); ``bridge`` joins a
host bridge through ``qemu-bridge-helper``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit
from xml.etree import ElementTree as ET

from ..errors import ExportError, UsageError

Accel = Literal["kvm", "tcg"]
Network = Literal["isolated", "user", "bridge"]
Firmware = Literal["bios", "uefi"]

#: version of vm.json; a reader refuses others
VM_STATE_VERSION = 1
QEMU = "qemu-system-x86_64"
#: OVMF as Debian's ``ovmf`` package installs it (the 4 MiB build: the one with room for
#: Secure Boot variables, which current guests expect)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: the longest path a unix socket can bind (sun_path less its terminating NUL)
_MAX_SOCKET_PATH = 107
_TERMINAL_CODES = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: how much of the serial console's text already read wait_for_serial searches again
_SERIAL_WINDOW = 64 << 10
#: how long after a QMP 'quit' (or SIGKILL) qemu gets to be gone
_QUIT_WAIT = 10.0
#: runs the VM's command ("$@") and records its exit status in $1 when it exits
_WRAPPER = 'status=$1; shift; "$@"; echo $? >"$status.tmp" && mv "$status.tmp" "$status"'


def accelerator(kvm_device: str = "/dev/kvm", cpuinfo: str = "/proc/cpuinfo") -> Accel:
    """``kvm`` when the KVM device opens and the CPU has hardware virtualisation (vmx, svm), else
    ``tcg`` (see the module's docstring for why both are needed)."""
    try:
        os.close(os.open(kvm_device, os.O_RDWR | os.O_CLOEXEC))
        flags = Path(cpuinfo).read_text()
    except OSError:
        return "tcg"
    has_flag = any(
        line.startswith("flags") and {"vmx", "svm"} & set(line.partition(":")[2].split())
        for line in flags.splitlines()
    )
    return "kvm" if has_flag else "tcg"


@dataclass(frozen=True)
class VmSpec:
    """What to boot and how; checked when made (:class:`UsageError` names the wrong field)."""

    name: str
    #: an NBD URI (``nbd://HOST:PORT/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``) or a raw image
    disk_uri: str
    memory_mib: int = 1024
    cpus: int = 1
    network: Network = "isolated"
    #: the host bridge of a ``bridge`` network
    bridge: str | None = None
    firmware: Firmware = "bios"
    #: a guest TCP port to forward from the host's loopback, for a health probe
    probe_port: int | None = None
    vnc: bool = False
    #: open the disk read-only (a read-only export: a snapshot rather than a clone)
    read_only: bool = False

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise UsageError(f"VM name {self.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if not self.disk_uri or any(c in self.disk_uri for c in "\0\n"):
            raise UsageError(f"disk {self.disk_uri!r}: give an nbd:// URI or an image file")
        if self.memory_mib < 64 or self.cpus < 1:
            raise UsageError(f"memory {self.memory_mib} MiB, {self.cpus} CPUs: need >= 64 MiB and >= 1")
        if self.network not in ("isolated", "user", "bridge"):
            raise UsageError(f"network {self.network!r}: one of isolated, user, bridge")
        if (self.network == "bridge") != bool(self.bridge):
            raise UsageError("a bridge name goes with network 'bridge', and only with it")
        if self.bridge is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.bridge):
            raise UsageError(f"bridge {self.bridge!r} is not an interface name")
        if self.firmware not in ("bios", "uefi"):
            raise UsageError(f"firmware {self.firmware!r}: one of bios, uefi")
        if self.probe_port is not None and not 0 < self.probe_port < 65536:
            raise UsageError(f"probe port {self.probe_port} is not a TCP port")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmSpec:
        return cls(**data)


def qemu_command(
    spec: VmSpec,
    run_dir: Path,
    *,
    accel: Accel | None = None,
    probe_host_port: int | None = None,
    qemu: str = QEMU,
) -> list[str]:
    """The qemu command line that boots ``spec`` with its sockets and logs in ``run_dir``.

    ``probe_host_port`` is the host's loopback port forwarded to ``spec.probe_port`` (required
    when the spec has one; :meth:`Vm.start` picks a free one)."""
    _check_run_dir(run_dir)
    if spec.probe_port is not None and probe_host_port is None:
        raise UsageError("a probe port needs the host port to forward from")
    accel = accel or accelerator()
    drive = f"file={_qemu_escape(spec.disk_uri)},format=raw,if=virtio,cache=writeback"
    if spec.read_only:
        drive += ",readonly=on"
    # without a screen, the firmware (SeaBIOS) writes to the serial console too: why a disk did
    # not boot ("not a bootable disk") is then in serial.log
    machine = "q35" if spec.vnc else "q35,graphics=off"
    cmd = [qemu, "-name", f"guest={spec.name}", "-machine", machine, "-accel", accel]
    if accel == "kvm":
        cmd += ["-cpu", "host"]
    cmd += ["-m", str(spec.memory_mib), "-smp", str(spec.cpus), "-drive", drive]
    if spec.firmware == "uefi":
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"]
        cmd += ["-drive", f"if=pflash,format=raw,unit=1,file={run_dir / 'efivars.fd'}"]
    cmd += ["-nic", _nic(spec, probe_host_port)]
    cmd += ["-serial", f"file:{run_dir / 'serial.log'}", "-display", "none"]
    if spec.vnc:
        cmd += ["-vnc", f"unix:{run_dir / 'vnc.sock'}"]
    cmd += ["-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off", "-no-reboot"]
    return cmd


def _nic(spec: VmSpec, probe_host_port: int | None) -> str:
    forward = ""
    if spec.probe_port is not None:
        forward = f",hostfwd=tcp:127.0.0.1:{probe_host_port}-:{spec.probe_port}"
    if spec.network == "isolated":
        return f"user,model=virtio-net-pci,restrict=on{forward}" if forward else "none"
    if spec.network == "user":
        return f"user,model=virtio-net-pci{forward}"
    return f"bridge,br={spec.bridge},model=virtio-net-pci"


def _qemu_escape(value: str) -> str:
    """A value inside a qemu option list: a comma is written twice."""
    return value.replace(",", ",,")


def _check_run_dir(run_dir: Path) -> None:
    longest = run_dir.absolute() / "qmp.sock"
    if "," in str(run_dir) or len(str(longest).encode()) > _MAX_SOCKET_PATH:
        raise UsageError(
            f"run directory {run_dir}: its sockets' paths must be at most {_MAX_SOCKET_PATH} bytes "
            "and hold no comma; choose a shorter path"
        )


@dataclass
class Vm:
    """A VM started by :meth:`start` (in this process or another: :meth:`load`)."""

    run_dir: Path
    spec: VmSpec
    command: list[str]
    #: the wrapper shell's pid: the session and process group of qemu
    pid: int
    #: the pid's start time in clock ticks since boot (so a reused pid is not taken for the VM)
    pid_start: int
    #: wall-clock time just before qemu was started (seconds since the epoch)
    started_at: float
    accel: Accel
    probe_host_port: int | None = None

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def vnc_socket(self) -> Path | None:
        return self.run_dir / "vnc.sock" if self.spec.vnc else None

    # starting and finding ----------------------------------------------------------------------
    @classmethod
    def start(cls, spec: VmSpec, run_dir: Path, *, accel: Accel | None = None, timeout: float = 30.0) -> Vm:
        """Start qemu for ``spec`` and return once it runs the guest (its QMP monitor answers,
        which is after it opened the disk). Raises :class:`ExportError` with qemu's own message
        when it does not start (an NBD server that does not answer, a bad image, ...)."""
        run_dir = run_dir.absolute()
        _check_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            running = cls.load(run_dir).alive()
        except (ExportError, UsageError):  # no VM there, or a state file of no use any more
            running = False
        if running:
            raise UsageError(f"a VM already runs in {run_dir}: stop it first")
        for stale in ("serial.log", "qmp.sock", "vnc.sock", "exit-status", "qemu.log"):
            (run_dir / stale).unlink(missing_ok=True)
        if shutil.which(QEMU) is None:
            raise ExportError(f"cannot boot {spec.name}: {QEMU} is not installed")
        if spec.firmware == "uefi":
            if not (OVMF_CODE.exists() and OVMF_VARS.exists()):
                raise ExportError(f"cannot boot {spec.name} with UEFI: OVMF ({OVMF_CODE}) is not installed")
            if not (run_dir / "efivars.fd").exists():
                shutil.copyfile(OVMF_VARS, run_dir / "efivars.fd")
        accel = accel or accelerator()
        host_port = _free_port() if spec.probe_port is not None else None
        command = qemu_command(spec, run_dir, accel=accel, probe_host_port=host_port)
        started_at = time.time()
        log = run_dir / "qemu.log"
        try:
            pid = os.posix_spawn(
                "/bin/sh",
                ["/bin/sh", "-c", _WRAPPER, "sh", str(run_dir / "exit-status"), *command],
                dict(os.environ),
                setsid=True,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                    (os.POSIX_SPAWN_DUP2, 1, 2),
                ],
            )
        except OSError as e:
            raise ExportError(f"cannot start the VM {spec.name}: {e}") from None
        vm = cls(run_dir, spec, command, pid, _start_ticks(pid) or 0, started_at, accel, host_port)
        _write_atomically(run_dir / "vm.json", json.dumps(vm.to_json(), indent=1))
        vm._wait_running(timeout)
        return vm

    @classmethod
    def load(cls, run_dir: Path) -> Vm:
        """The VM whose state is in ``run_dir`` (started by any process)."""
        path = run_dir.absolute() / "vm.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ExportError(f"no VM in {run_dir} (no vm.json)") from None
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict) or data.get("version") != VM_STATE_VERSION:
            raise ExportError(f"{path} has a format this dingyuan does not understand")
        try:
            return cls(
                run_dir=run_dir.absolute(),
                spec=VmSpec.from_json(data["spec"]),
                command=[str(a) for a in data["command"]],
                pid=int(data["pid"]),
                pid_start=int(data["pid_start"]),
                started_at=float(data["started_at"]),
                accel=data["accel"],
                probe_host_port=data["probe_host_port"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{path} is malformed ({e})") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VM_STATE_VERSION,
            "spec": self.spec.to_json(),
            "pid": self.pid,
            "pid_start": self.pid_start,
            "started_at": self.started_at,
            "started": datetime.fromtimestamp(self.started_at, UTC).isoformat(),
            "accel": self.accel,
            "probe_host_port": self.probe_host_port,
            "command": self.command,
        }

    # state ----------------------------------------------------------------------------------
    def alive(self) -> bool:
        """Whether qemu (its wrapper) still runs."""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)  # reap it when this process started it
        return _start_ticks(self.pid) == self.pid_start

    @property
    def exit_status(self) -> int | None:
        """qemu's exit status once it exited (0: the guest powered off, or qemu was told to quit;
        1: qemu failed), minus the signal number when a signal ended it; None while it runs or
        when it was killed with its wrapper (the last resort of :meth:`stop`)."""
        try:
            status = int((self.run_dir / "exit-status").read_text())
        except (OSError, ValueError):
            return None
        return 128 - status if status > 128 else status

    def wait_for_serial(self, pattern: str, timeout: float) -> float:
        """Wait until the serial console shows ``pattern`` (a regular expression); returns the
        seconds from the VM's start to then. Raises :class:`ExportError` with the console's last
        lines when ``timeout`` passes first, or when qemu exits without printing it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen, window = 0, ""
        while True:
            running = self.alive()
            new, seen = self._serial_since(seen)
            # the lines read before, kept as far back as a marker can reach across two reads
            window = window[-_SERIAL_WINDOW:] + new
            if regex.search(window):
                return time.time() - self.started_at
            if not running:
                raise ExportError(
                    f"VM {self.spec.name} stopped (exit status {self.exit_status}) before its console "
                    f"showed {pattern!r}; {self._diagnostics()}"
                )
            if time.monotonic() > deadline:
                raise ExportError(
                    f"VM {self.spec.name}'s console did not show {pattern!r} within {timeout:g} s; "
                    f"{self._diagnostics()}"
                )
            time.sleep(0.1)

    def wait_for_tcp(self, timeout: float, send: bytes = b"") -> float:
        """Wait until the guest's service on the probe port answers: it sends at least a byte,
        after ``send`` when given (a service that waits for its client, such as HTTP, needs a
        request; one that greets, such as SSH, needs none). Returns the seconds from the VM's
        start to then.

        A connection alone proves nothing: qemu's user network accepts every connection to a
        forwarded port at once, and holds it open while the guest does not answer at all."""
        if self.probe_host_port is None:
            raise UsageError(f"VM {self.spec.name} has no probe port")
        deadline = time.monotonic() + timeout
        while True:
            if self._probe(self.probe_host_port, send):
                return time.time() - self.started_at
            if not self.alive():
                raise ExportError(f"VM {self.spec.name} stopped before its probe port answered")
            if time.monotonic() > deadline:
                raise ExportError(
                    f"VM {self.spec.name}'s port {self.spec.probe_port} did not answer within "
                    f"{timeout:g} s; {self._diagnostics()}"
                )
            time.sleep(0.2)

    @staticmethod
    def _probe(port: int, send: bytes) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
                s.sendall(send)
                return s.recv(1) != b""
        except OSError:  # refused, reset, closed or silent (TimeoutError)
            return False

    # stopping -------------------------------------------------------------------------------
    def stop(self, timeout: float = 60.0) -> None:
        """Stop the VM: an ACPI power-button press (the guest shuts down cleanly) and up to
        ``timeout`` seconds for it; then QMP ``quit`` (like pulling the plug; the disk has what
        the guest flushed); then SIGKILL to qemu's process group."""
        if not self.alive():
            return
        with contextlib.suppress(OSError, ExportError):
            self._qmp("system_powerdown")
        if self._wait_gone(timeout):
            return
        with contextlib.suppress(OSError, ExportError):
            self._qmp("quit")
        if self._wait_gone(_QUIT_WAIT):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if not self._wait_gone(_QUIT_WAIT):
            raise ExportError(f"VM {self.spec.name} (pid {self.pid}) does not end, even on SIGKILL")

    def _wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def _qmp(self, command: str) -> dict[str, Any]:
        with _QmpClient(self.qmp_socket, timeout=5.0) as qmp:
            return qmp.execute(command)

    def _wait_running(self, timeout: float) -> None:
        """Until the QMP monitor answers (qemu serves it once the machine is made and the disk
        opened), or qemu exits (then its messages tell why)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise ExportError(
                    f"qemu did not start the VM {self.spec.name} (exit status {self.exit_status}): "
                    f"{_tail(self.run_dir / 'qemu.log')}"
                )
            with contextlib.suppress(OSError, ExportError):
                self._qmp("query-status")
                return
            if time.monotonic() > deadline:
                self.stop(timeout=0)
                raise ExportError(f"qemu did not start the VM {self.spec.name} within {timeout:g} s")
            time.sleep(0.1)

    def _serial_since(self, offset: int) -> tuple[str, int]:
        """What the console printed from byte ``offset`` on, and where that ends."""
        try:
            with self.serial_log.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return "", offset
        return data.decode(errors="replace"), offset + len(data)

    def _diagnostics(self) -> str:
        text = f"console (last lines): {_tail(self.serial_log)}"
        qemu_log = _tail(self.run_dir / "qemu.log")
        return f"{text}; qemu: {qemu_log}" if qemu_log != "(empty)" else text


class _QmpClient:
    """The least of QMP: greeting, capabilities, one command at a time (events are skipped)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
            self._file = self._sock.makefile("rb")
            self._read()  # the greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def execute(self, command: str) -> dict[str, Any]:
        self._sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            reply = self._read()
            if "error" in reply:
                raise ExportError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            if "return" in reply:
                return reply

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ExportError("QMP: qemu closed the monitor")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        with contextlib.suppress(AttributeError):
            self._file.close()
        self._sock.close()

    def __enter__(self) -> _QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# libvirt and iPXE ---------------------------------------------------------------------------------
def libvirt_xml(spec: VmSpec, *, domain_type: Literal["kvm", "qemu"] = "kvm") -> str:
    """A libvirt domain for ``spec``, for users who run their VMs with libvirt
    (``virsh define``). The disk is libvirt's network disk over NBD; the probe port is not
    forwarded (libvirt forwards ports only with its passt backend: add one by hand if needed),
    so an ``isolated`` VM has no interface at all."""
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.cpus)
    os_el = ET.SubElement(dom, "os", firmware="efi") if spec.firmware == "uefi" else ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "on_reboot").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    devices.append(_libvirt_disk(spec))
    if spec.network == "user":
        nic = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(nic, "model", type="virtio")
    elif spec.network == "bridge":
        nic = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge=str(spec.bridge))
        ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(devices, "console", type="pty")
    if spec.vnc:
        ET.SubElement(devices, "graphics", type="vnc", listen="127.0.0.1")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _libvirt_disk(spec: VmSpec) -> ET.Element:
    url = urlsplit(spec.disk_uri)
    if url.scheme in ("nbd", "nbd+unix"):
        disk = ET.Element("disk", type="network", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw", cache="writeback")
        source = ET.SubElement(disk, "source", protocol="nbd", name=unquote(url.path.lstrip("/")))
        if url.scheme == "nbd":
            ET.SubElement(source, "host", name=url.hostname or "localhost", port=str(url.port or 10809))
        else:
            sockets = parse_qs(url.query).get("socket")
            if not sockets:
                raise UsageError(f"{spec.disk_uri}: an nbd+unix URI needs ?socket=PATH")
            ET.SubElement(source, "host", transport="unix", socket=sockets[0])
    elif url.scheme in ("", "file"):
        disk = ET.Element("disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw", cache="writeback")
        ET.SubElement(disk, "source", file=os.path.abspath(unquote(url.path)))
    else:
        raise UsageError(f"disk {spec.disk_uri}: libvirt gets an nbd://, nbd+unix:// URI or a file")
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if spec.read_only:
        ET.SubElement(disk, "readonly")
    return disk


def ipxe_script(server: str, iqn: str, *, port: int = 3260, lun: int = 1, name: str = "") -> str:
    """An iPXE script that boots a physical server from the vault's iSCSI export of its disk
    (``sanboot``): iPXE has no NBD client, so bare-metal boots go through iSCSI. ``lun`` is the
    LUN the target presents the disk as (0 for the vault's exports)."""
    if not re.fullmatch(r"iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9.:_-]+)?", iqn):
        raise UsageError(f"{iqn!r} is not an iSCSI qualified name (iqn.YYYY-MM.domain[:name])")
    if not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", server):
        raise UsageError(f"{server!r}: give a host name, an IPv4 address or a bracketed IPv6 address")
    if not 0 < port < 65536 or lun < 0:
        raise UsageError(f"iSCSI port {port}, LUN {lun}: out of range")
    what = f" {name}" if name else ""
    return (
        "#!ipxe\n"
        f"# Boot{what} from the dingyuan vault's iSCSI export.\n"
        "dhcp || goto failed\n"
        f"sanboot iscsi:{server}::{port}:{lun}:{iqn} || goto failed\n"
        ":failed\n"
        "echo Booting from iSCSI failed; dropping to the iPXE shell.\n"
        "shell\n"
    )


# helpers ------------------------------------------------------------------------------------------
def _free_port() -> int:
    """A TCP port free on the loopback now (another process could take it before qemu binds it;
    qemu then refuses to start and says so)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_ticks(pid: int) -> int | None:
    """The start time of a running (not zombie) process ``pid``, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return "(empty)"
    text = _TERMINAL_CODES.sub("", text)  # the firmware draws its screen on the serial console
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else "(empty)"
