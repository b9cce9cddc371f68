"""Mounting an exported disk (an NBD export of a snapshot or clone) on a directory, and undoing it.

The machines we run on may have no ``nbd`` kernel module, no device-mapper and no udev, and the
kernel does not scan the partition table of a loop device. So a mount is a chain of four steps,
each undone in reverse::

    NBD export ──nbdfuse──► FILE ──sfdisk──► partition ──losetup──► /dev/loopN ──mount──► DIR
    (read-only: through    (in a private   (start, size)   (--offset,
     nbdkit's cow filter)   FUSE dir)                       --sizelimit)

1. ``nbdfuse`` presents the export as a file in a private FUSE mountpoint. It runs in the
   foreground until ``fusermount3 -u``, so it is spawned in a session of its own (it outlives the
   CLI that mounted) with its output in a log file, and is ready when it writes its pid file.
2. The filesystem: the whole disk when it holds one, else the partition asked for, else the only
   partition holding a filesystem (several: :class:`MountError` lists them).
3. A loop device over that byte range of the file.
4. ``mount`` (``ntfs-3g`` for NTFS), always ``nosuid,nodev``: a snapshot's setuid programs and
   device nodes must not become a way into the machine that browses it.

A read-only mount writes not a byte to the export, and still shows the filesystem as it would be
after a restart: a snapshot of a running machine is crash-consistent, so its journal (ext3/4, XFS,
the btrfs log tree) can hold committed, fsync'ed changes not yet written in place, and mounting
with journal replay off (``noload``, ``norecovery``) would show a filesystem without them (files
that were fsync'ed before the snapshot are missing, or worse). So nbdfuse reads the export through
``nbdkit --filter=cow``, a copy-on-write overlay that never passes a write on (it opens the export
read-only) and is thrown away when nbdkit exits; the kernel replays the journal into the overlay and
the filesystem is mounted ``ro``.

Crash safety. Each mount has a state file ``STATE_DIR/<key>.json`` (the key is derived from the
target directory) and a work directory ``STATE_DIR/<key>/`` (the FUSE mountpoint, nbdfuse's pid and
log). The rules that let :func:`unmount` undo any interrupted mount:

- The state file is written (atomically: temporary file, fsync, rename) before the first step, and
  rewritten after each step with what that step made; it is removed last, after every step is undone.
- Whatever a step made must be findable even if the process dies before recording it: the FUSE
  mountpoint is a fixed path of the work directory, the loop devices are found by their backing
  file (``losetup --list``), and the filesystem by its source device on the target
  (``/proc/self/mountinfo``). A mount on the target whose source is not one of our loop devices is
  never touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import MountError, UsageError

#: version of the state file; a reader refuses others
STATE_VERSION = 1

#: URI schemes libnbd connects to
NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")

#: the filesystems (as blkid names them) dingyuan mounts
FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "ntfs")

#: options a filesystem needs: a snapshot of an XFS filesystem has its UUID, which XFS refuses to
# mount twice, and the snapshot is often mounted next to the filesystem it was taken of
EXTRA_OPTIONS = {"xfs": ["nouuid"]}

#: the ``mount -t`` type of a filesystem blkid names differently (NTFS goes through ntfs-3g, FUSE)
MOUNT_TYPE = {"ntfs": "ntfs-3g"}

#: seconds a tool (sfdisk, losetup, mount, ...) may take: each reads the export over the network
TOOL_TIMEOUT = 120.0

#: characters of a tool's output kept in an error
OUTPUT_TAIL = 1000

#: seconds unmount waits for a FUSE mountpoint to stop being busy (a loop device released late)
# and for nbdfuse to exit after its filesystem is unmounted
SETTLE_TIMEOUT = 10.0

#: the name of the export's file inside the FUSE mountpoint
IMAGE_NAME = "disk"


@dataclass(frozen=True)
class Partition:
    """One entry of a disk's partition table; ``start`` and ``size`` in bytes."""

    number: int
    start: int
    size: int
    #: the MBR type code (``83``) or GPT type GUID
    type: str
    #: the GPT partition name ("" on MBR)
    name: str
    #: the filesystem blkid finds in it (``ext4``, ``swap``, ...), None when it finds none
    fstype: str | None


@dataclass
class MountInfo:
    """One mount and everything needed to undo it (the content of its state file)."""

    uri: str
    target: Path
    #: the private FUSE mountpoint where nbdfuse presents the export as ``IMAGE_NAME``
    fuse_dir: Path
    writable: bool
    #: the partition number, None for a whole disk
    partition: int | None = None
    #: the filesystem's byte range on the disk
    offset: int = 0
    size: int = 0
    fstype: str | None = None
    loop_device: str | None = None
    nbdfuse_pid: int | None = None
    #: what the caller made for this mount and undoes after it (the CLI: its export's id)
    owner: int | None = None
    #: every step done; False for a mount under way or interrupted
    complete: bool = False

    @property
    def image_file(self) -> Path:
        return self.fuse_dir / IMAGE_NAME

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(version=STATE_VERSION, target=str(self.target), fuse_dir=str(self.fuse_dir))
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> MountInfo:
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"state version {doc.get('version')!r}, this dingyuan reads {STATE_VERSION}")
        fields = {k: v for k, v in doc.items() if k != "version"}
        return cls(**dict(fields, target=Path(fields["target"]), fuse_dir=Path(fields["fuse_dir"])))


# public API -------------------------------------------------------------------------------------
def mount(
    uri: str,
    target: Path,
    *,
    partition: int | None = None,
    writable: bool = False,
    state_dir: Path,
    timeout: float = 30.0,
    owner: int | None = None,
) -> MountInfo:
    """Mount the filesystem of the NBD export ``uri`` on the directory ``target``.

    ``partition`` picks a partition by number; without it the whole disk, or its only partition
    holding a filesystem. ``timeout`` bounds the wait for nbdfuse to connect. ``owner`` is kept in
    the mount's state for the caller (:func:`unmount` returns it). On failure every
    step done is undone and :class:`MountError` says what failed; if the undoing fails too, the
    state stays in ``state_dir`` and :func:`unmount` finishes it.
    """
    scheme = uri.partition("://")[0]
    if scheme not in NBD_SCHEMES or "://" not in uri:
        raise UsageError(
            f"'{uri}' is not an NBD URI (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
        )
    target = Path(os.path.realpath(target))
    if not target.is_dir():
        raise MountError(action="mount on", path=target, detail="not a directory: create it first")
    ours = MountError(
        action="mount on",
        path=target,
        detail="dingyuan has a mount there already: unmount it first ('dingyuan umount DIR')",
    )
    if _state_file(state_dir, target).exists():
        raise ours
    if _mounts_at(target):
        raise MountError(action="mount on", path=target, detail="something is mounted there already")
    work = _work_dir(state_dir, target)
    info = MountInfo(
        uri=uri, target=target, fuse_dir=work / "fuse", writable=writable, partition=partition, owner=owner
    )
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        _save(state_dir, info, create=True)  # the claim: of two mounts on one target, one goes on
    except FileExistsError:
        raise ours from None
    try:
        work.mkdir(mode=0o700, exist_ok=True)
        info.fuse_dir.mkdir(mode=0o700, exist_ok=True)
        _start_nbdfuse(info, work, state_dir, timeout)
        _choose_filesystem(info)
        _save(state_dir, info)
        info.loop_device = _attach_loop(info)
        _save(state_dir, info)
        _mount_filesystem(info)
        info.complete = True
        _save(state_dir, info)
    except BaseException as e:
        try:
            _teardown(info, state_dir)
        except MountError as undo:
            e.add_note(f"Undoing the mount failed too ({undo}); run unmount on {target} to finish.")
        raise
    return info


def unmount(target: Path, *, state_dir: Path) -> MountInfo | None:
    """Undo the mount on ``target``: whatever of it is left, so it also finishes an interrupted
    mount or unmount. Returns what was unmounted, None when dingyuan has no mount there (so a
    second call does nothing). A busy filesystem raises :class:`MountError` naming the processes
    that use it, and nothing further is undone."""
    target = Path(os.path.realpath(target))
    state_file = _state_file(state_dir, target)
    try:
        info = MountInfo.from_json(json.loads(state_file.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise MountError(
            action="read the mount state", path=state_file, detail=f"{e}; unmount it by hand"
        ) from None
    _teardown(info, state_dir)
    return info


def mounts(state_dir: Path) -> list[MountInfo]:
    """The mounts recorded in ``state_dir`` (incomplete ones have ``complete`` False), by target."""
    found = []
    for path in state_dir.glob("*.json"):
        with contextlib.suppress(FileNotFoundError):  # unmounted meanwhile
            try:
                found.append(MountInfo.from_json(json.loads(path.read_text())))
            except (ValueError, TypeError, KeyError) as e:
                raise MountError(action="read the mount state", path=path, detail=str(e)) from None
    return sorted(found, key=lambda m: str(m.target))


@contextlib.contextmanager
def mounted(
    uri: str, *, partition: int | None = None, writable: bool = False, state_dir: Path
) -> Iterator[MountInfo]:
    """A mount of ``uri`` (read-only unless ``writable``) on a private temporary directory for
    the ``with`` block, unmounted (and the directory removed) when it ends, however it ends."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="rw-" if writable else "ro-", dir=state_dir))
    try:
        info = mount(uri, target, partition=partition, writable=writable, state_dir=state_dir)
        try:
            yield info
        finally:
            unmount(target, state_dir=state_dir)
    finally:
        if not _mounts_at(target):
            target.rmdir()


def partitions(image_file: Path) -> list[Partition]:
    """The partitions of the disk image ``image_file`` (MBR or GPT), with the filesystem found in
    each; an empty list when it has no partition table."""
    done = _run(
        ["sfdisk", "--json", str(image_file)],
        action="read the partition table of",
        path=image_file,
        check=False,
    )
    if done.returncode != 0:
        if "does not contain a recognized partition table" in done.stderr:
            return []
        raise MountError(action="read the partition table of", path=image_file, detail=_tail(done))
    table = json.loads(done.stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    found = []
    for entry in table.get("partitions", []):
        number = re.search(r"(\d+)$", entry["node"][len(str(image_file)) :])
        if number is None:
            raise MountError(
                action="read the partition table of", path=image_file, detail=f"unexpected entry {entry}"
            )
        start, size = entry["start"] * sector, entry["size"] * sector
        found.append(
            Partition(
                number=int(number[1]),
                start=start,
                size=size,
                type=str(entry.get("type", "")),
                name=str(entry.get("name", "")),
                fstype=probe_filesystem(image_file, start, size),
            )
        )
    return found


def probe_filesystem(path: Path, offset: int = 0, size: int | None = None) -> str | None:
    """The filesystem (or other content: ``swap``, ``LVM2_member``) blkid finds at ``offset`` of
    ``path``, None when it finds none or only a partition table."""
    argv = ["blkid", "-p", "-o", "export", "-O", str(offset)]
    if size is not None:
        argv += ["-S", str(size)]
    done = _run([*argv, str(path)], action="probe the filesystem of", path=path, check=False)
    if done.returncode == 2:  # nothing found
        return None
    if done.returncode == 8:  # several signatures: blkid -p will not guess, nor will we
        return "several signatures"
    if done.returncode != 0:
        raise MountError(action="probe the filesystem of", path=path, detail=_tail(done))
    fields = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    return fields.get("TYPE")


# the steps --------------------------------------------------------------------------------------
def _start_nbdfuse(info: MountInfo, work: Path, state_dir: Path, timeout: float) -> None:
    """Start nbdfuse in a session of its own and wait until it serves the file.

    nbdfuse stays in the foreground until its mountpoint is unmounted and writes its pid file when
    ready. It is spawned without a ``Popen`` object (which would warn when garbage-collected while
    nbdfuse, rightly, keeps running); its output goes to a log file, since a pipe would break when
    the mounting process exits."""
    pid_file, log = work / "nbdfuse.pid", work / "nbdfuse.log"
    pid_file.unlink(missing_ok=True)
    argv = ["nbdfuse", "--pidfile", str(pid_file), str(info.image_file)]
    if info.writable:
        argv.append(info.uri)
    else:  # through a copy-on-write overlay (see the module's docstring)
        argv += [
            "--command",
            "nbdkit",
            "--single",
            "--exit-with-parent",
            "--filter=cow",
            "nbd",
            f"uri={info.uri}",
        ]
    try:
        pid = os.posix_spawnp(
            "nbdfuse",
            argv,
            dict(os.environ),
            setsid=True,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ],
        )
    except OSError as e:
        raise MountError(action="connect to", path=info.uri, detail=f"cannot run nbdfuse: {e}") from None
    info.nbdfuse_pid = pid
    _save(state_dir, info)
    deadline = time.monotonic() + timeout
    while not (pid_file.exists() and pid_file.read_text().strip() and info.image_file.exists()):
        status = _reap(pid)
        if status is not None:
            raise MountError(
                action="connect to",
                path=info.uri,
                detail=f"nbdfuse exited ({status}): {_log_tail(log)}; check that the NBD server runs "
                "and that the URI names one of its exports",
            )
        if time.monotonic() > deadline:
            raise MountError(
                action="connect to",
                path=info.uri,
                detail=f"nbdfuse did not connect within {timeout:g} s: {_log_tail(log)}",
            )
        time.sleep(0.02)
    if info.writable and not os.stat(info.image_file).st_mode & 0o222:
        raise MountError(
            action="mount", path=info.uri, detail="the export is read-only: mount it without --rw"
        )


def _choose_filesystem(info: MountInfo) -> None:
    """Set ``info``'s partition, byte range and filesystem type (see :func:`mount`)."""
    image = info.image_file
    disk_size = os.stat(image).st_size
    whole = probe_filesystem(image)
    if whole in FILESYSTEMS:
        if info.partition is not None:
            raise MountError(
                action="mount",
                path=info.uri,
                detail=f"the disk has no partitions, it is one {whole} filesystem: "
                "mount it without --partition",
            )
        info.offset, info.size, info.fstype = 0, disk_size, whole
        return
    table = partitions(image)
    if not table:
        raise MountError(
            action="mount",
            path=info.uri,
            detail=f"found neither a partition table nor a filesystem dingyuan mounts ({whole or 'nothing'})",
        )
    listing = "; ".join(
        f"{p.number}: {_size(p.size)} {p.fstype or 'no filesystem'}{f' ({p.name})' if p.name else ''}"
        for p in table
    )
    if info.partition is None:
        usable = [p for p in table if p.fstype in FILESYSTEMS]
        if len(usable) != 1:
            why = "no partition holds" if not usable else "several partitions hold"
            raise MountError(
                action="mount",
                path=info.uri,
                detail=f"{why} a filesystem dingyuan mounts; partitions: {listing}. "
                "Choose one with --partition N",
            )
        chosen = usable[0]
    else:
        matches = [p for p in table if p.number == info.partition]
        if not matches:
            raise MountError(
                action="mount", path=info.uri, detail=f"no partition {info.partition}; partitions: {listing}"
            )
        chosen = matches[0]
        if chosen.fstype not in FILESYSTEMS:
            raise MountError(
                action="mount",
                path=info.uri,
                detail=f"partition {chosen.number} holds {chosen.fstype or 'no filesystem'}, which dingyuan "
                f"does not mount ({', '.join(FILESYSTEMS)}); partitions: {listing}",
            )
    info.partition, info.offset, info.size, info.fstype = (
        chosen.number,
        chosen.start,
        chosen.size,
        chosen.fstype,
    )


def _attach_loop(info: MountInfo) -> str:
    argv = ["losetup", "--find", "--show", "--offset", str(info.offset), "--sizelimit", str(info.size)]
    done = _run(
        [*argv, str(info.image_file)],
        action="attach a loop device to",
        path=info.uri,
        hint="check that loop devices are free (losetup --list) and that the kernel has the loop driver",
    )
    return done.stdout.strip()


def _mount_filesystem(info: MountInfo) -> None:
    assert info.fstype is not None and info.loop_device is not None
    options = ["nosuid", "nodev", "rw" if info.writable else "ro", *EXTRA_OPTIONS.get(info.fstype, [])]
    fstype = MOUNT_TYPE.get(info.fstype, info.fstype)
    _run(
        ["mount", "-t", fstype, "-o", ",".join(options), info.loop_device, str(info.target)],
        action=f"mount {info.fstype} on",
        path=info.target,
        hint=f"the kernel's reason is in dmesg: this kernel may lack {info.fstype} (/proc/filesystems), "
        "or the filesystem is damaged (check a writable clone of it with its fsck)",
    )


# undoing ----------------------------------------------------------------------------------------
def _teardown(info: MountInfo, state_dir: Path) -> None:
    """Undo every step of ``info`` that is still in place, last step first; the state file goes
    last, so an interruption here leaves it for the next attempt."""
    loops = _loops_backed_by(info.image_file)
    for fstype, source in reversed(_mounts_at(info.target)):
        if source not in loops:
            break  # not ours (mounted over ours, or in its place): leave it
        done = _run(["umount", str(info.target)], action="unmount", path=info.target, check=False)
        if done.returncode != 0:
            raise MountError(action="unmount", path=info.target, detail=_busy_detail(info.target, done))
        if fstype == "fuseblk":  # ntfs-3g: its daemon lets the loop device go when it exits
            _wait_closed(loops)
    for device in loops:
        done = _run(["losetup", "--detach", device], action="detach", path=device, check=False)
        if done.returncode != 0 and device in _loops_backed_by(info.image_file):
            raise MountError(action="detach", path=device, detail=_tail(done))
    _unmount_fuse(info)
    _stop_nbdfuse(info)
    work = info.fuse_dir.parent
    with contextlib.suppress(FileNotFoundError):
        info.fuse_dir.rmdir()
    for name in ("nbdfuse.pid", "nbdfuse.log"):
        (work / name).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        work.rmdir()
    _state_file(state_dir, info.target).unlink(missing_ok=True)
    _fsync_dir(state_dir)


def _busy_detail(target: Path, done: subprocess.CompletedProcess[str]) -> str:
    if "busy" not in done.stderr:
        return _tail(done)
    # fuser prints the pids on standard output (its table and complaints go to standard error)
    users = _run(["fuser", "-m", str(target)], action="list the users of", path=target, check=False)
    procs = []
    for pid in filter(str.isdigit, users.stdout.split()):
        with contextlib.suppress(OSError):
            procs.append(f"{Path(f'/proc/{pid}/comm').read_text().strip()} (pid {pid})")
    who = ", ".join(procs) if procs else "some process"
    return f"busy: {who} uses files under it; close them and unmount again"


def _wait_closed(devices: Sequence[str]) -> None:
    """Wait (a little) until no process holds ``devices`` open, so detaching them is immediate."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        done = _run(["fuser", "-s", *devices], action="list the users of", path=devices[0], check=False)
        if done.returncode != 0:  # no process uses them
            return
        time.sleep(0.05)


def _unmount_fuse(info: MountInfo) -> None:
    """``fusermount3 -u`` the private FUSE mountpoint; a loop device that is detached but still
    being released keeps it busy for a moment, so retry until ``SETTLE_TIMEOUT``."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while _mounts_at(info.fuse_dir):
        done = _run(
            ["fusermount3", "-u", str(info.fuse_dir)], action="unmount", path=info.fuse_dir, check=False
        )
        if done.returncode == 0:
            continue
        if time.monotonic() > deadline:
            raise MountError(
                action="unmount",
                path=info.fuse_dir,
                detail=f"{_tail(done)}; a loop device may still use the export (losetup --list)",
            )
        time.sleep(0.1)


def _stop_nbdfuse(info: MountInfo) -> None:
    """Wait for nbdfuse to exit (it does once its mountpoint is unmounted); one that does not, or
    that never mounted, is terminated. A pid now used by another program is left alone."""
    pid = info.nbdfuse_pid
    if pid is None:
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT
    signalled = False
    while _reap(pid) is None and _is_our_nbdfuse(pid, info):
        if time.monotonic() > deadline and not signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            signalled, deadline = True, time.monotonic() + SETTLE_TIMEOUT
        elif time.monotonic() > deadline:
            raise MountError(action="stop nbdfuse for", path=info.uri, detail=f"pid {pid} does not exit")
        time.sleep(0.02)


def _is_our_nbdfuse(pid: int, info: MountInfo) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" and os.fsencode(str(info.image_file)) in cmdline


def _reap(pid: int) -> str | None:
    """How our child ``pid`` ended, None while it runs (or when it is not our child)."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if done == 0:
        return None
    code = os.waitstatus_to_exitcode(status)
    return f"status {code}" if code >= 0 else f"signal {-code}"


# what the system says ---------------------------------------------------------------------------
def _mounts_at(path: Path) -> list[tuple[str, str]]:
    """The (fstype, source) of each mount on ``path``, bottom first (/proc/self/mountinfo)."""

    def unescape(s: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)

    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if unescape(fields[4]) == str(path):
            found.append((tail[0], unescape(tail[1])))
    return found


def _loops_backed_by(image: Path) -> list[str]:
    """The loop devices whose backing file is ``image`` (also when the file is gone)."""
    done = _run(["losetup", "--list", "--json"], action="list loop devices for", path=image)
    if not done.stdout.strip():  # no loop devices at all
        return []
    name = str(image)
    return [
        dev["name"]
        for dev in json.loads(done.stdout)["loopdevices"]
        if dev.get("back-file") in (name, f"{name} (deleted)")
    ]


# helpers ----------------------------------------------------------------------------------------
def _run(
    argv: list[str], *, action: str, path: object, check: bool = True, hint: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run a tool; with ``check``, a failure raises MountError with its output's tail and ``hint``
    (what to do)."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=TOOL_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise MountError(action=action, path=path, detail=f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise MountError(
            action=action,
            path=path,
            detail=f"{argv[0]} did not finish in {TOOL_TIMEOUT:g} s (is the NBD server up?)",
        ) from None
    if check and done.returncode != 0:
        tail = _tail(done)
        detail = tail if tail.startswith(f"{argv[0]}:") else f"{argv[0]}: {tail}"
        raise MountError(action=action, path=path, detail=f"{detail}{'; ' + hint if hint else ''}")
    return done


def _tail(done: subprocess.CompletedProcess[str]) -> str:
    text = (done.stderr.strip() or done.stdout.strip() or f"status {done.returncode}")[-OUTPUT_TAIL:]
    return " ".join(text.split())


def _log_tail(log: Path) -> str:
    try:
        text = log.read_text(errors="replace").strip()
    except FileNotFoundError:
        text = ""
    return " ".join(text[-OUTPUT_TAIL:].split()) or "no output"


def _size(n: int) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    value = float(n)
    while value >= 1024 and len(units) > 1:
        value /= 1024
        units.pop(0)
    return f"{value:.0f} {units[0]}" if units[0] == "B" else f"{value:.1f} {units[0]}"


def _key(target: Path) -> str:
    return hashlib.sha256(os.fsencode(str(target))).hexdigest()[:16]


def _state_file(state_dir: Path, target: Path) -> Path:
    return state_dir / f"{_key(target)}.json"


def _work_dir(state_dir: Path, target: Path) -> Path:
    return state_dir / _key(target)


def _save(state_dir: Path, info: MountInfo, *, create: bool = False) -> None:
    """Write ``info``'s state file atomically and durably (temporary file, fsync, rename, fsync of
    the directory). ``create``: raise FileExistsError if it exists (link instead of rename, so two
    mounts on one target cannot both start)."""
    final = _state_file(state_dir, info.target)
    tmp = state_dir / f".{final.stem}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(info.to_json(), indent=1).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if create:
        try:
            os.link(tmp, final)
        finally:
            tmp.unlink()
    else:
        os.replace(tmp, final)
    _fsync_dir(state_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
