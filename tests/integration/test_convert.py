"""Converting an NBD export into VM disk files (raw, qcow2, vmdk, vhdx) with qemu-img.

A sparse raw image (data runs with holes between them) is served read-only by qemu-nbd, a
reference NBD server. Each conversion must read back as the same disk (``qemu-img compare``),
keep the holes as holes, and report progress up to the disk's size. Failures (an export that does
not exist, a read-only directory, a full filesystem, an interruption) leave nothing in the target
directory and say why.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountkit import nbd_server

from dingyuan.errors import RestoreTargetError, SourceError, UsageError
from dingyuan.recovery.convert import Format, convert

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-nbd") is None,
    reason="needs qemu-img and qemu-nbd (package qemu-utils)",
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")

SIZE = 64 << 20
#: (offset, length) of the data runs; everything else is a hole
RUNS = [(0, 1 << 20), (10 << 20, 3 << 20), (33 << 20, 64 << 10), (SIZE - (2 << 20), 2 << 20)]
DATA = sum(length for _, length in RUNS)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sparse raw disk: random (incompressible) data in RUNS, holes elsewhere."""
    path = tmp_path_factory.mktemp("source") / "disk.img"
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset, length in RUNS:
            f.seek(offset)
            f.write(rng.randbytes(length))
    assert allocated(path) < DATA + (1 << 20), "the source image is not sparse"
    return path


@pytest.fixture(scope="module")
def uri(image: Path) -> Iterator[str]:
    with nbd_server(image, read_only=True) as u:
        yield u


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def compare(image: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-f", "raw", str(image), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vhdx"])
def test_the_converted_disk_reads_as_the_export_and_progress_reaches_its_size(
    uri: str, image: Path, tmp_path: Path, fmt: Format
) -> None:
    out = tmp_path / f"disk.{fmt}"
    calls: list[tuple[int, int]] = []
    convert(uri, out, fmt, lambda done, total: calls.append((done, total)))

    result = compare(image, out)
    assert result.returncode == 0 and "Images are identical" in result.stdout, result.stdout + result.stderr
    info = subprocess.run(["qemu-img", "info", str(out)], capture_output=True, text=True, check=True).stdout
    assert f"file format: {fmt}" in info, info
    if fmt == "vmdk":
        assert "create type: streamOptimized" in info, info
    assert sorted(os.listdir(tmp_path)) == [out.name], "a temporary file was left behind"
    assert out.stat().st_mode & 0o777 == 0o600, "the disk's contents are readable by others"

    assert calls[-1] == (SIZE, SIZE)
    assert {total for _, total in calls} == {SIZE}
    dones = [done for done, _ in calls]
    assert dones == sorted(dones) and len(set(dones)) == len(dones), calls
    assert any(0 < done < SIZE for done in dones), f"no report between start and end: {calls}"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_holes_stay_holes(uri: str, tmp_path: Path, fmt: Format) -> None:
    out = tmp_path / f"disk.{fmt}"
    convert(uri, out, fmt)
    # the data and a little metadata; a conversion that filled the holes would take all 64 MiB
    assert allocated(out) < DATA + (2 << 20), f"{allocated(out)} bytes allocated for {DATA} of data"


def test_an_export_that_does_not_exist_is_a_source_error_and_makes_no_file(uri: str, tmp_path: Path) -> None:
    bad = uri.rsplit("/", 1)[0] + "/no-such-export"
    with pytest.raises(SourceError, match="no-such-export") as e:
        convert(bad, tmp_path / "disk.qcow2", "qcow2")
    assert "not available" in str(e.value) or "not present" in str(e.value), e.value
    assert os.listdir(tmp_path) == []


def test_a_server_that_does_not_answer_is_a_source_error(tmp_path: Path) -> None:
    from mountkit import free_port

    with pytest.raises(SourceError, match="Connection refused"):
        convert(f"nbd://127.0.0.1:{free_port()}/disk", tmp_path / "disk.raw", "raw")
    assert os.listdir(tmp_path) == []


@needs_root
def test_a_read_only_directory_is_a_target_error_and_makes_no_file(uri: str, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=16m") as ro:
        with pytest.raises(RestoreTargetError, match="Read-only file system"):
            convert(uri, ro / "disk.qcow2", "qcow2")
        assert os.listdir(ro) == []


@needs_root
@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vhdx"])
def test_a_full_filesystem_is_a_target_error_and_the_partial_file_is_removed(
    uri: str, tmp_path: Path, fmt: Format
) -> None:
    with tmpfs(tmp_path / "small", "size=2m") as small:  # the disk holds 6 MiB of random data
        with pytest.raises(RestoreTargetError) as e:
            convert(uri, small / f"disk.{fmt}", fmt)
        assert "No space left on device" in str(e.value) or "is full" in str(e.value), e.value
        assert str(small / f"disk.{fmt}") in str(e.value)
        assert ".part" not in str(e.value), "the message names the temporary file"
        assert os.listdir(small) == []


def test_an_interrupted_conversion_leaves_nothing_and_stops_qemu_img(uri: str, tmp_path: Path) -> None:
    def interrupt(done: int, total: int) -> None:
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(uri, tmp_path / "disk.qcow2", "qcow2", interrupt)
    assert os.listdir(tmp_path) == []
    running = subprocess.run(
        ["pgrep", "-f", f"qemu-img convert .*{tmp_path}"], capture_output=True, check=False
    )
    assert running.returncode == 1, running.stdout


def test_an_existing_file_is_never_overwritten(uri: str, tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    out.write_bytes(b"precious")
    with pytest.raises(RestoreTargetError, match="it exists"):
        convert(uri, out, "raw")
    assert out.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["disk.raw"]


def test_an_unknown_format_is_refused(uri: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="vdi"):
        convert(uri, tmp_path / "disk.vdi", "vdi")  # type: ignore[arg-type]  # what a caller may pass
    assert os.listdir(tmp_path) == []
