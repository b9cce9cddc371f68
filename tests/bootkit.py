r"""A real, small bootable test system, for the tests that boot snapshots as virtual machines.

The disk is what a protected server's disk looks like to firmware: an MBR partition table, MBR
boot code in sector 0, and a bootable ext2 partition holding a boot loader (extlinux), a Linux
kernel and an initramfs, for BIOS boots; and an EFI system partition (FAT, type 0xEF) with
syslinux's EFI loader as ``\EFI\BOOT\BOOTX64.EFI`` beside the same kernel and initramfs, for UEFI
boots (OVMF). Every part is a Debian package, so nothing is downloaded at build time:

- the kernel is the installed Debian kernel (``linux-image-cloud-amd64``: its package puts
  ``/boot/vmlinuz-VERSION`` and ``/lib/modules/VERSION``; the cloud flavour is small and has the
  virtio drivers qemu's disks and NICs need, as modules);
- the initramfs is ``busybox-static`` plus the virtio modules of that kernel, written here as a
  ``newc`` cpio archive (so no cpio tool and no root is needed for it);
- the boot loader is ``extlinux`` with ``syslinux-common``'s ``mbr.bin``. ``extlinux --install``
  needs the file system mounted: the partition is attached to a loop device with ``--offset``
  (partitions of loop devices are not scanned everywhere, and there may be no udev), which needs
  root. ext2 because syslinux reads it on every version (not ext4 with 64-bit block numbers);
- the EFI loader is ``syslinux-efi``'s, put on a FAT file system made in a file (``mkfs.fat``,
  ``mcopy``: no mount) and copied into the second partition.

What the guest does (``/init``), all on the serial console ``ttyS0``:

1. mounts proc, sys and dev, loads the virtio modules, waits for ``/dev/vda``;
2. prints ``READY`` (the moment a user would call the system up);
3. writes ``WROTE`` into sector :data:`WRITE_OFFSET` of the disk, syncs, and prints
   ``WRITE_OK`` (or ``WRITE_FAILED`` on a read-only disk), so a test can see that the VM's writes
   land where it booted from;
4. with a network card: configures qemu's user network (10.0.2.15, gateway 10.0.2.2), serves
   ``PROBE_REPLY`` over HTTP on :data:`GUEST_HTTP_PORT` and ``BANNER`` to every connection on
   :data:`GUEST_BANNER_PORT` (targets for a health probe), and, when the
   settings sector asks, tries to reach ``10.0.2.2:PORT`` (the host's loopback through qemu) and
   prints ``NET_REACHED`` or ``NET_BLOCKED``;
5. waits ``linger`` seconds if the settings say so, then powers off (``poweroff -f``).

Settings are ``key=value`` lines a test writes into sector :data:`SETTINGS_OFFSET` of its copy of
the disk before it boots (:func:`write_settings`): ``reach=PORT`` and ``linger=SECONDS``. Both
sectors lie past the partition, so nothing in the file system moves them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

MIB = 1 << 20
SECTOR = 512
#: the whole disk (a sparse file: what is written of it is about the size of the kernel)
DISK_SIZE = 64 * MIB
PART_START = 1 * MIB
PART_SIZE = 24 * MIB
#: the EFI system partition
ESP_START = PART_START + PART_SIZE
ESP_SIZE = 24 * MIB
#: the sector the guest reads its settings from (a test writes them there)
SETTINGS_OFFSET = 56 * MIB
#: the sector the guest writes :data:`WROTE` into
WRITE_OFFSET = 60 * MIB
GUEST_HTTP_PORT = 80
#: where the guest greets every connection with :data:`BANNER` (as an SSH server would)
GUEST_BANNER_PORT = 22

# what the guest prints on the serial console (and writes to its disk)
READY = "DINGYUAN-READY"
WROTE = "DINGYUAN-WROTE"
WRITE_OK = "DINGYUAN-WRITE-OK"
WRITE_FAILED = "DINGYUAN-WRITE-FAILED"
NET_REACHED = "DINGYUAN-NET-REACHED"
NET_BLOCKED = "DINGYUAN-NET-BLOCKED"
PROBE_REPLY = "DINGYUAN-PROBE"
BANNER = "DINGYUAN-BANNER"

MBR_BIN = Path("/usr/lib/EXTLINUX/mbr.bin")
SYSLINUX_EFI = Path("/usr/lib/SYSLINUX.EFI/efi64/syslinux.efi")
LDLINUX_E64 = Path("/usr/lib/syslinux/modules/efi64/ldlinux.e64")
BUSYBOX = Path("/bin/busybox")
#: modules to load in the guest, in this order after their dependencies (each may be built in)
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net")
#: Debian packages the build and the boots use (scripts/test.sh installs them)
PACKAGES = (
    "linux-image-cloud-amd64 busybox-static extlinux syslinux-common syslinux-efi dosfstools mtools "
    "qemu-system-x86 ovmf"
)

KERNEL_CMDLINE = "console=ttyS0,115200 panic=-1 loglevel=4"

EXTLINUX_CONF = f"""\
SERIAL 0 115200
DEFAULT dingyuan
PROMPT 0
TIMEOUT 0
LABEL dingyuan
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND {KERNEL_CMDLINE}
"""

INIT = f"""\
#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
[ -b /dev/vda ] || {{ echo "no /dev/vda"; poweroff -f; }}
echo {READY}
if printf '{WROTE}\\n' | dd of=/dev/vda bs={SECTOR} seek={WRITE_OFFSET // SECTOR} count=1 \\
        conv=sync,notrunc 2>/dev/null && sync; then
    echo {WRITE_OK}
else
    echo {WRITE_FAILED}
fi
setting() {{
    dd if=/dev/vda bs={SECTOR} skip={SETTINGS_OFFSET // SECTOR} count=1 2>/dev/null | tr -d '\\000' \\
        | sed -n "s/^$1=//p"
}}
if [ -e /sys/class/net/eth0 ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    httpd -p {GUEST_HTTP_PORT} -h /www
    nc -ll -p {GUEST_BANNER_PORT} -e echo {BANNER} &
    port=$(setting reach)
    if [ -n "$port" ]; then
        if echo from-guest | nc -w 3 10.0.2.2 "$port"; then echo {NET_REACHED}; else echo {NET_BLOCKED}; fi
    fi
fi
linger=$(setting linger)
[ -z "$linger" ] || sleep "$linger"
poweroff -f
"""


class BootkitError(RuntimeError):
    """The test system cannot be built on this machine (a package is missing, or not root)."""


def build_image(cache_dir: Path) -> Path:
    """The bootable disk image, built once per set of inputs into ``cache_dir`` (a build is a few
    seconds; its name carries a hash of the kernel, busybox and this module's recipe). Treat it as
    read-only: boot a :func:`copy_image` of it, or serve it read-only."""
    kernel, modules = find_kernel()
    key = _digest([kernel, BUSYBOX, MBR_BIN, SYSLINUX_EFI, Path(__file__)])
    image = cache_dir / f"bootkit-{key}.img"
    if not image.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as work:
            partial = Path(work) / "disk.img"
            _build(partial, kernel, modules, Path(work))
            os.replace(partial, image)
    return image


def copy_image(image: Path, dest: Path) -> Path:
    """A writable copy of ``image`` at ``dest`` (sparse, like the original)."""
    subprocess.run(["cp", "--sparse=always", str(image), str(dest)], check=True)
    return dest


def break_boot_sector(image: Path) -> None:
    """Zeroes sector 0 (boot code and partition table): firmware finds nothing to boot."""
    with image.open("r+b") as f:
        f.write(bytes(SECTOR))


def write_settings(image: Path, **settings: int | str) -> None:
    """Writes the guest's settings (``reach=PORT``, ``linger=SECONDS``) into ``image``."""
    text = "".join(f"{k}={v}\n" for k, v in settings.items()).encode()
    assert len(text) <= SECTOR
    with image.open("r+b") as f:
        f.seek(SETTINGS_OFFSET)
        f.write(text.ljust(SECTOR, b"\0"))


def written_marker(image: Path) -> bytes:
    """What the guest wrote to its disk: ``WROTE`` after a boot that could write."""
    with image.open("rb") as f:
        f.seek(WRITE_OFFSET)
        return f.read(len(WROTE))


def find_kernel() -> tuple[Path, Path]:
    """The newest installed Debian kernel that has its modules: (vmlinuz, /lib/modules/VERSION)."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").exists():
            found.append((_version_key(version), vmlinuz, modules))
    if not found:
        raise BootkitError(f"no Debian kernel with modules in /boot: install {PACKAGES}")
    _, vmlinuz, modules = max(found)
    return vmlinuz, modules


def _version_key(version: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", version)]


def _digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _build(image: Path, kernel: Path, modules: Path, work: Path) -> None:
    missing = [p for p in (BUSYBOX, MBR_BIN, SYSLINUX_EFI, LDLINUX_E64) if not p.exists()]
    tools = ("extlinux", "sfdisk", "mke2fs", "losetup", "mount", "mkfs.fat", "mcopy", "mmd")
    missing += [t for t in tools if shutil.which(t) is None]
    if missing:
        raise BootkitError(f"missing {', '.join(map(str, missing))}: install {PACKAGES}")
    if os.geteuid() != 0:
        raise BootkitError("building the boot disk needs root (a loop device and a mount)")
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    table = (
        "label: dos\n"
        f"start={PART_START // SECTOR}, size={PART_SIZE // SECTOR}, type=83, bootable\n"
        f"start={ESP_START // SECTOR}, size={ESP_SIZE // SECTOR}, type=ef\n"
    )
    _run(["sfdisk", "--quiet", str(image)], stdin=table)
    mkfs = ["mke2fs", "-q", "-F", "-t", "ext2", "-L", "dyboot", "-E", f"offset={PART_START}"]
    _run([*mkfs, str(image), f"{PART_SIZE // 1024}k"])
    initrd = work / "initrd.img"
    initrd.write_bytes(initramfs(modules))
    mnt = work / "mnt"
    mnt.mkdir()
    attach = ["losetup", "--find", "--show", "--offset", str(PART_START), "--sizelimit", str(PART_SIZE)]
    loop = _run([*attach, str(image)]).strip()
    try:
        _run(["mount", "-t", "ext2", loop, str(mnt)])
        try:
            shutil.copyfile(kernel, mnt / "vmlinuz")
            shutil.copyfile(initrd, mnt / "initrd.img")
            (mnt / "extlinux.conf").write_text(EXTLINUX_CONF)
            _run(["extlinux", "--install", str(mnt)])
        finally:
            _run(["umount", str(mnt)])
    finally:
        _run(["losetup", "--detach", loop])
    esp = _esp(work, kernel, initrd)
    with image.open("r+b") as f:
        f.write(MBR_BIN.read_bytes()[:440])  # the boot code, before the disk signature and table
        data = esp.read_bytes()
        for at in range(0, len(data), 1 << 16):  # what holds data: the disk stays sparse
            piece = data[at : at + (1 << 16)]
            if piece.count(0) != len(piece):
                f.seek(ESP_START + at)
                f.write(piece)


def _esp(work: Path, kernel: Path, initrd: Path) -> Path:
    """The EFI system partition's file system, made in a file."""
    esp = work / "esp.img"
    with esp.open("wb") as f:
        f.truncate(ESP_SIZE)
    _run(["mkfs.fat", "-F", "16", "-n", "ESP", str(esp)])
    (work / "syslinux.cfg").write_text(EXTLINUX_CONF)
    mtools = {"MTOOLS_SKIP_CHECK": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    _run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], env=mtools)
    files = {
        SYSLINUX_EFI: "::/EFI/BOOT/BOOTX64.EFI",
        LDLINUX_E64: "::/EFI/BOOT/ldlinux.e64",
        work / "syslinux.cfg": "::/EFI/BOOT/syslinux.cfg",
        kernel: "::/vmlinuz",
        initrd: "::/initrd.img",
    }
    for source, target in files.items():
        _run(["mcopy", "-i", str(esp), str(source), target], env=mtools)
    return esp


def initramfs(modules: Path) -> bytes:
    """The guest's initramfs: busybox, /init, the virtio modules it loads, the probe's page."""
    archive = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "etc", "lib", "lib/modules", "www"):
        archive.add(d, stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    archive.add("bin/sh", stat.S_IFLNK | 0o777, b"busybox")
    archive.add("init", stat.S_IFREG | 0o755, INIT.encode())
    archive.add("www/index.html", stat.S_IFREG | 0o644, f"{PROBE_REPLY}\n".encode())
    order = _load_order(modules, GUEST_MODULES)
    for name, path in order:
        archive.add(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, path.read_bytes())
    archive.add("etc/modules", stat.S_IFREG | 0o644, "".join(f"{n}\n" for n, _ in order).encode())
    # busybox's applets, as links (installing them at boot would cost the guest time)
    for applet in subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True).stdout.split():
        if applet not in ("busybox", "sh"):
            archive.add(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
    return archive.finish()


def _load_order(modules: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """Modules to load for ``wanted`` (dependencies first), from the kernel's modules.dep;
    a module built into the kernel is not in modules.dep and needs nothing."""
    deps: dict[str, tuple[Path, list[str]]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        target, _, needs = line.partition(":")
        deps[_module_name(target)] = (modules / target, [_module_name(n) for n in needs.split()])
    order: list[tuple[str, Path]] = []

    def visit(name: str) -> None:
        if name not in deps or any(n == name for n, _ in order):
            return
        path, needs = deps[name]
        for need in needs:
            visit(need)
        if path.suffix != ".ko":
            raise BootkitError(f"{path}: compressed modules are not supported by this test system")
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


class _Cpio:
    """A ``newc`` cpio archive (the format the kernel unpacks an initramfs from)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._parts.append(_pad4(header + name.encode() + b"\0"))
        self._parts.append(_pad4(data))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _run(argv: list[str], stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise BootkitError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout
