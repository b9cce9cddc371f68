"""Converting an exported disk (an NBD export of a snapshot or clone) into a hypervisor's disk file.

One streaming pass of ``qemu-img convert`` reads the export and writes the file: nothing of the
disk is staged in between, and the export's holes (and runs of zeros) stay holes in the output.

========  =====================================  ===============================================
format    for                                    what qemu-img writes
========  =====================================  ===============================================
raw       anything (``dd`` to a disk, a cloud    a sparse file: holes where the disk reads zeros
          import, a loop device)
qcow2     KVM / QEMU (libvirt, Proxmox,          qcow2 v3, unallocated clusters where the disk
          OpenStack)                             reads zeros
vmdk      VMware ESXi, vCenter, Workstation,     ``streamOptimized`` (see :data:`FORMAT_OPTIONS`)
          Fusion
vhdx      Microsoft Hyper-V                      dynamic VHDX: unallocated blocks for zeros
========  =====================================  ===============================================

Crash safety: the output is written under a temporary name in the target's directory
(``.NAME.XXXX.part``), flushed, and renamed to ``NAME`` only when qemu-img succeeded, then the
directory is flushed too. A failed or interrupted conversion (an error, Ctrl-C, an exception in
the progress callback) removes the temporary file; a process killed outright can leave it behind,
but never a half file under ``NAME``. An existing ``NAME`` is never overwritten. The file is
readable by its owner only (mode 0600): it holds everything the machine's disk held.

Errors: a source qemu-img cannot open or read is a :class:`~dingyuan.errors.SourceError`, anything
else (a directory that cannot be written, a full disk) a
:class:`~dingyuan.errors.RestoreTargetError`; both carry the tail of qemu-img's own message.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args

from ..errors import RestoreTargetError, SourceError, UsageError

Format = Literal["raw", "qcow2", "vmdk", "vhdx"]

#: ``qemu-img convert -o`` options per output format.
#:
#: VMDK is ``streamOptimized``, the subformat of OVF/OVA packages: it is what every VMware product
#: imports (ESXi's and vCenter's "Deploy OVF template", ``ovftool``, Workstation's and Fusion's
#: "Open"/"Import"), its grains are compressed (a smaller file to carry to the hypervisor) and
#: holes take no space, and it is written strictly front to back, which suits a streaming
#: conversion. The alternative, ``monolithicSparse``, is Workstation's working format: ESXi
#: cannot run it and imports it only through ``vmkfstools -i`` (with the ``multiextent`` module
#: loaded), so it serves one product well and the other badly. The price of streamOptimized is
#: that no product runs it in place: it is imported (converted to the product's own format) once.
#:
#: VHDX is ``dynamic``: Hyper-V runs it in place and allocates blocks as the guest writes.
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "raw": (),
    "qcow2": (),
    "vmdk": ("subformat=streamOptimized",),
    "vhdx": ("subformat=dynamic",),
}

#: characters of qemu-img's message kept in an error
OUTPUT_TAIL = 1000

#: free bytes under which a failed write is reported as a full filesystem
FULL_BELOW = 1 << 20

#: seconds ``qemu-img info`` may take to open the source (it reads the export over the network)
INFO_TIMEOUT = 120.0

#: one progress report of ``qemu-img convert -p``: ``    (12.34/100%)``, ended by a carriage return
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")

Progress = Callable[[int, int], None]


def convert(uri: str, out: Path, fmt: Format, progress: Progress | None = None) -> None:
    """Write the disk at ``uri`` (an ``nbd://`` export, or any raw source qemu-img reads) to the
    new file ``out`` in the format ``fmt``.

    ``progress(done, total)`` is called as the conversion advances, in bytes of the disk's
    virtual size: ``done`` never decreases and the last call, after the file is in place, has
    ``done == total``.
    """
    if fmt not in get_args(Format):
        raise UsageError(f"unknown disk format '{fmt}': choose one of {', '.join(get_args(Format))}")
    out = Path(os.path.abspath(out))
    _check_target(out)
    total = _virtual_size(uri)
    try:
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    except OSError as e:
        raise RestoreTargetError(target=out, detail=e.strerror or str(e)) from None
    os.close(fd)
    tmp = Path(name)
    try:
        _run_convert(uri, tmp, out, fmt, total, progress)
        _check_target(out)  # made while we converted: keep it, drop ours
        try:
            _fsync(tmp)
            os.rename(tmp, out)
            _fsync(out.parent)
        except OSError as e:
            raise RestoreTargetError(target=out, detail=e.strerror or str(e)) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if progress is not None:
        progress(total, total)


def _check_target(out: Path) -> None:
    if os.path.lexists(out):
        raise RestoreTargetError(target=out, detail="it exists; choose a new file name or remove it")
    if not out.parent.is_dir():
        raise RestoreTargetError(target=out, detail=f"no directory {out.parent}")


def _virtual_size(uri: str) -> int:
    """The disk's size in bytes: opening the source first also refuses a bad URI before any file
    is made."""
    try:
        done = subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "raw", uri],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=INFO_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise SourceError(source=uri, detail="qemu-img is not installed (package qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise SourceError(source=uri, detail=f"no answer within {INFO_TIMEOUT:g} s") from None
    if done.returncode != 0:
        raise SourceError(source=uri, detail=_tail(done.stderr or done.stdout, done.returncode))
    return int(json.loads(done.stdout)["virtual-size"])


def _run_convert(uri: str, tmp: Path, out: Path, fmt: str, total: int, progress: Progress | None) -> None:
    """Run ``qemu-img convert -p``, passing its percentages on as bytes; on failure raise the
    error its message points at (source or target)."""
    argv = ["qemu-img", "convert", "-p", "-f", "raw", "-O", fmt]
    if FORMAT_OPTIONS[fmt]:
        argv += ["-o", ",".join(FORMAT_OPTIONS[fmt])]
    argv += [uri, str(tmp)]
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        except FileNotFoundError:
            raise RestoreTargetError(
                target=out, detail="qemu-img is not installed (package qemu-utils)"
            ) from None
        stdout = proc.stdout
        assert stdout is not None
        try:
            _follow(stdout.fileno(), total, progress)
            status = proc.wait()
        finally:
            if proc.poll() is None:  # we are leaving early: an exception, Ctrl-C
                proc.kill()
                proc.wait()
            stdout.close()
        if status != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace").replace(str(tmp), str(out))
            if re.search(r"Could not open '" + re.escape(uri) + "'|error while reading", message):
                raise SourceError(source=uri, detail=_tail(message, status))
            raise RestoreTargetError(target=out, detail=_tail(message, status) + _full(tmp.parent))


def _follow(fd: int, total: int, progress: Progress | None) -> None:
    """Read qemu-img's progress reports until it closes its output, calling ``progress`` with
    each new high in bytes (the final 100% is reported by the caller, after the rename)."""
    pending = b""
    reported = -1
    while chunk := os.read(fd, 4096):
        pending += chunk
        *reports, pending = re.split(rb"[\r\n]", pending)
        for report in reports:
            m = _PROGRESS.search(report)
            if m is None or progress is None:
                continue
            done = min(total, int(float(m.group(1)) * total / 100))
            if done > reported and done < total:
                reported = done
                progress(done, total)


def _full(directory: Path) -> str:
    """A note when the target's filesystem is full: qemu-img does not always say so (a short
    write into a streamOptimized VMDK comes out as "Invalid argument")."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return ""
    free = st.f_bavail * st.f_frsize
    return f"; the filesystem holding {directory} is full ({free} bytes free)" if free < FULL_BELOW else ""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tail(text: str, status: int) -> str:
    text = " ".join(text.strip()[-OUTPUT_TAIL:].split())
    return text or f"qemu-img failed with status {status}"
