"""Restoring single files and directories out of an NBD export (served by qemu-nbd): contents and
metadata come back, symlinks stay symlinks, nothing outside the snapshot's filesystem is reached,
and nothing stays mounted, whatever happens."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fskit import loop_mount, make_fs
from mountkit import leftovers, nbd_server, needs_mount_tools, populate, read_tree, unmounting

from dingyuan.errors import RestoreTargetError, UsageError
from dingyuan.exports.files import restore_files

pytestmark = needs_mount_tools

MTIME_NS = 1_600_000_000_123_456_789


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield from unmounting(tmp_path / "state")


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """An ext4 disk served by qemu-nbd (read-only) and the tree it holds: :func:`populate`'s, plus
    a file with a distinctive owner, mode and time, a hard link, a symlink to a directory inside,
    and symlinks pointing outside the filesystem (absolute, and by climbing with ``..``)."""
    image = tmp_path / "disk.img"
    make_fs(image, 64 << 20, "ext4")
    with loop_mount(image, tmp_path / "fill"):
        root = tmp_path / "fill"
        populate(root, 11)
        owned = root / "tree/a/owned.txt"
        owned.write_bytes(b"owned by 1234:5678\n")
        os.chown(owned, 1234, 5678)
        owned.chmod(0o640)
        os.utime(owned, ns=(MTIME_NS, MTIME_NS))
        os.link(owned, root / "tree/a/hardlink.txt")
        os.utime(root / "tree/a", ns=(MTIME_NS, MTIME_NS))
        (root / "inner").symlink_to("tree/a")
        (root / "escape-abs").symlink_to("/etc")
        (root / "escape-rel").symlink_to("../../../../../../..")
        tree = read_tree(root)
    with nbd_server(image, read_only=True) as uri:
        yield uri, tree


def test_restore_a_file_a_directory_and_a_symlink(
    tmp_path: Path, state_dir: Path, snapshot: tuple[str, dict[str, tuple[str, bytes]]]
) -> None:
    uri, tree = snapshot
    to = tmp_path / "restored"
    got = restore_files(
        uri, ["/data.bin", "tree/a", "/tree/link", "inner/b/deep.bin"], to, state_dir=state_dir
    )
    assert got == [to / "data.bin", to / "tree/a", to / "tree/link", to / "inner/b/deep.bin"]
    assert (to / "data.bin").read_bytes() == tree["data.bin"][1]
    # the directory, whole: contents, symlinks as symlinks
    restored = read_tree(to / "tree/a")
    assert restored == {k[len("tree/a/") :]: v for k, v in tree.items() if k.startswith("tree/a/")}
    assert os.readlink(to / "tree/link") == "a/notes.txt"
    # a path through a symlink inside the filesystem is restored under the path as given
    assert (to / "inner/b/deep.bin").read_bytes() == tree["tree/a/b/deep.bin"][1]
    assert not (to / "inner").is_symlink()
    # metadata: owner, mode, times, hard links
    owned = os.stat(to / "tree/a/owned.txt")
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1234, 5678, 0o640)
    assert owned.st_mtime_ns == MTIME_NS
    assert os.stat(to / "tree/a").st_mtime_ns == MTIME_NS
    assert os.stat(to / "tree/a/hardlink.txt").st_ino == owned.st_ino
    assert leftovers(tmp_path) == []
    assert list(state_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../etc/passwd", r"'\.\./etc/passwd' uses '\.\.'"),
        ("/tree/../../etc/passwd", r"uses '\.\.'"),
        (
            "escape-abs/passwd",
            r"the symlink /escape-abs -> /etc, which points outside",
        ),
        ("escape-rel/etc/passwd", r"'escape-rel/etc/passwd' goes through a symlink that points outside"),
        ("/", r"'/' is the whole filesystem"),
    ],
)
def test_paths_that_leave_the_filesystem_are_refused(
    tmp_path: Path,
    state_dir: Path,
    snapshot: tuple[str, dict[str, tuple[str, bytes]]],
    path: str,
    message: str,
) -> None:
    uri, _ = snapshot
    to = tmp_path / "restored"
    with pytest.raises(UsageError, match=message):
        restore_files(uri, ["/data.bin", path], to, state_dir=state_dir)
    assert not to.exists()  # every path is checked before anything is copied
    assert leftovers(tmp_path) == []


def test_symlinks_are_restored_not_followed(
    tmp_path: Path, state_dir: Path, snapshot: tuple[str, dict[str, tuple[str, bytes]]]
) -> None:
    uri, _ = snapshot
    to = tmp_path / "restored"
    restore_files(uri, ["escape-abs", "escape-rel"], to, state_dir=state_dir)
    assert os.readlink(to / "escape-abs") == "/etc"
    assert os.readlink(to / "escape-rel") == "../../../../../../.."
    assert leftovers(tmp_path) == []


def test_a_missing_path_is_named(
    tmp_path: Path, state_dir: Path, snapshot: tuple[str, dict[str, tuple[str, bytes]]]
) -> None:
    uri, _ = snapshot
    to = tmp_path / "restored"
    with pytest.raises(UsageError, match="'/no/such/file' does not exist in the snapshot's filesystem"):
        restore_files(uri, ["/data.bin", "/no/such/file"], to, state_dir=state_dir)
    with pytest.raises(UsageError, match=r"'data.bin/x' does not exist .*\(/data.bin is not a directory\)"):
        restore_files(uri, ["data.bin/x"], to, state_dir=state_dir)
    assert not to.exists()
    assert leftovers(tmp_path) == []


def test_existing_files_are_not_overwritten_and_a_failed_copy_unmounts(
    tmp_path: Path, state_dir: Path, snapshot: tuple[str, dict[str, tuple[str, bytes]]]
) -> None:
    uri, _ = snapshot
    to = tmp_path / "restored"
    (to / "tree").mkdir(parents=True)
    (to / "tree/c.bin").write_bytes(b"mine")
    with pytest.raises(RestoreTargetError, match="it exists"):
        restore_files(uri, ["/tree/c.bin"], to, state_dir=state_dir)
    assert (to / "tree/c.bin").read_bytes() == b"mine"
    # a copy that fails half-way still unmounts
    (to / "tree/a").write_bytes(b"a file where a directory must go")
    with pytest.raises(RestoreTargetError, match="File exists"):
        restore_files(uri, ["/data.bin", "/tree/a/notes.txt"], to, state_dir=state_dir)
    assert (to / "data.bin").exists()
    assert leftovers(tmp_path) == []
    assert list(state_dir.iterdir()) == []
