"""Providers without real devices: mountinfo and sysfs parsing, and the LVM and VSS command
sequences on recorded outputs of their tools (neither can run here: no device-mapper, no
Windows)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from dingyuan.agent.consistency import choose
from dingyuan.agent.consistency.base import PointInTime
from dingyuan.agent.consistency.linux import loop_mounts_of, mount_of, mounts
from dingyuan.agent.consistency.live import NOTE, LiveProvider
from dingyuan.agent.consistency.lvm import LvmProvider
from dingyuan.agent.consistency.vss import VssProvider, diskshadow_script, parse_writers, volume_of
from dingyuan.agent.quiesce import Quiescer, ScriptPlugin
from dingyuan.errors import CommandFailed, ProviderFailed, ProviderUnavailable, QuiesceFailed, UsageError

FIXTURES = Path(__file__).parent / "fixtures"

MOUNTINFO = """\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 7:0 / /srv/pool rw,relatime shared:20 - xfs /dev/loop0 rw,attr2,inode64
41 40 7:1 / /mnt/guest\\040disk rw,relatime shared:21 - ext4 /dev/loop1 rw
42 22 7:1 / /mnt/bind rw,relatime shared:21 - ext4 /dev/loop1 rw
43 22 259:3 / /mnt/part rw,relatime shared:22 - ext4 /dev/loop2p1 rw
"""


def test_mountinfo_and_loop_devices(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert [m.mountpoint for m in mounts(info)][2] == "/mnt/guest disk"
    m = mount_of("/srv/pool/images/disk.img", info)
    assert m is not None and m.fstype == "xfs" and m.mountpoint == "/srv/pool"
    sysb = tmp_path / "block"
    for name, dev, backing in [
        ("loop1", "7:1", "/srv/pool/disk.img"),
        ("loop2", "7:2", "/srv/pool/parts.img"),
    ]:
        (sysb / name / "loop").mkdir(parents=True)
        (sysb / name / "dev").write_text(dev + "\n")
        (sysb / name / "loop" / "backing_file").write_text(backing + "\n")
    (sysb / "loop2" / "loop2p1").mkdir()
    (sysb / "loop2" / "loop2p1" / "dev").write_text("259:3\n")
    (sysb / "loop3").mkdir()  # not attached: no loop/backing_file
    found = loop_mounts_of("/srv/pool/disk.img", sysb, info)
    assert [m.mountpoint for m in found] == ["/mnt/guest disk"]  # one per filesystem, not per bind
    assert [m.mountpoint for m in loop_mounts_of("/srv/pool/parts.img", sysb, info)] == ["/mnt/part"]
    assert loop_mounts_of("/srv/pool/other.img", sysb, info) == []


def test_choose_names_and_levels(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(b"x")
    assert isinstance(choose("live", f), LiveProvider)
    assert isinstance(choose("crash", f), LiveProvider)  # the default policy level reads live
    with pytest.raises(UsageError, match="unknown consistency provider"):
        choose("zfs", f)
    with pytest.raises(ProviderUnavailable, match="only on Windows"):
        choose("vss", f)
    with pytest.raises(ProviderUnavailable, match="'live'"):
        choose("freeze", f)
    with pytest.raises(ValueError):
        PointInTime(f, "consistent", "live")


def test_live_is_labelled_crash(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(b"x")
    with LiveProvider().take(f, Quiescer([ScriptPlugin("true", "true")])) as pit:
        assert pit.path == f and pit.level == "crash" and pit.notes[0] == NOTE
    assert pit.stats() == {"consistency_provider": "live", "paused_ms": 0.0, "consistency_notes": pit.notes}


class Recorded:
    """Answers commands from a table of recorded outputs and logs every call."""

    def __init__(self, answers: dict[str, str | Exception]) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(list(argv))
        for key, answer in self.answers.items():
            if " ".join(argv).startswith(key):
                if isinstance(answer, Exception):
                    raise answer
                return answer
        raise AssertionError(f"unexpected command {argv}")


LVS = "lvs --noheadings --nosuffix --units b --separator | -o vg_name,lv_name,lv_attr,lv_size"


def test_lvm_sequence_on_recorded_outputs() -> None:
    run = Recorded(
        {
            LVS: "  vg0|data|-wi-ao----|10737418240\n",
            "lvcreate": '  Logical volume "data-dy-pit-x" created.\n',
            "lvs --noheadings -o lv_attr": "  swi-a-s---\n",
            "lvremove": '  Logical volume "data-dy-pit-x" successfully removed.\n',
        }
    )
    provider = LvmProvider(run=run, mounted=True)
    assert provider.check("/dev/vg0/data") is None
    with provider.take("/dev/vg0/data") as pit:
        assert pit.level == "filesystem" and pit.provider == "lvm"
        snap = pit.path.name
        assert pit.path == Path("/dev/vg0") / snap and snap.startswith("data-dy-pit-")
    cmds = [c[0] for c in run.calls]
    assert cmds == ["lvs", "lvs", "lvcreate", "lvs", "lvremove"]
    assert run.calls[2] == ["lvcreate", "--snapshot", "--name", snap, "--extents", "10%ORIGIN", "vg0/data"]
    assert run.calls[-1] == ["lvremove", "-f", f"vg0/{snap}"]


def test_lvm_thin_volume_and_an_overflowed_snapshot() -> None:
    run = Recorded(
        {
            LVS: "  vg0|thin1|Vwi-aotz--|21474836480\n",
            "lvcreate": '  Logical volume "thin1-dy-pit-x" created.\n',
            "lvs --noheadings -o lv_attr": "  swi-I-s---\n",
            "lvremove": "",
        }
    )
    with pytest.raises(ProviderFailed, match="ran out of copy-on-write space"):  # noqa: SIM117
        with LvmProvider(run=run, mounted=False).take("/dev/vg0/thin1") as pit:
            assert pit.level == "crash"  # not mounted: nobody froze anything
    assert "--setactivationskip" in run.calls[1] and "--extents" not in run.calls[1]
    assert run.calls[-1][0] == "lvremove"


def test_lvm_refuses_what_is_not_a_volume_and_cleans_up_a_failed_create() -> None:
    no_lv = Recorded({LVS: CommandFailed(command="lvs", detail='Failed to find logical volume "sdb"')})
    assert "not an LVM logical volume" in (LvmProvider(run=no_lv).check("/dev/sdb") or "")
    pool = Recorded({LVS: "  vg0|pool|twi-aotz--|1073741824\n"})
    assert "not a plain or thin volume" in (LvmProvider(run=pool).check("/dev/vg0/pool") or "")
    failing = Recorded(
        {
            LVS: "  vg0|data|-wi-ao----|10737418240\n",
            "lvcreate": CommandFailed(command="lvcreate", detail="Insufficient free space"),
            "lvremove": CommandFailed(command="lvremove", detail="not found"),
        }
    )
    with (
        pytest.raises(CommandFailed, match="Insufficient free space"),
        LvmProvider(run=failing).take("/dev/x"),
    ):
        pass
    assert failing.calls[-1][0] == "lvremove"


def vss_run(writers: str) -> Recorded:
    return Recorded(
        {
            "diskshadow": (FIXTURES / "vss" / "diskshadow_create.txt").read_text(),
            "vssadmin list writers": (FIXTURES / "vss" / writers).read_text(),
            "vssadmin delete shadows": (FIXTURES / "vss" / "delete.txt").read_text(),
        }
    )


def test_vss_sequence_on_recorded_outputs() -> None:
    run = vss_run("writers_ok.txt")
    provider = VssProvider(run=run, windows=True)
    assert provider.check("\\\\.\\C:") is None
    with provider.take("C:\\") as pit:
        assert str(pit.path) == "\\\\?\\GLOBALROOT\\Device\\HarddiskVolumeShadowCopy7"
        assert pit.level == "application"
    names = [w.name for w in parse_writers((FIXTURES / "vss" / "writers_ok.txt").read_text())]
    assert "Microsoft Exchange Writer" in names
    assert [c[:2] for c in run.calls] == [["diskshadow", "/s"], ["vssadmin", "list"], ["vssadmin", "delete"]]
    assert run.calls[-1] == [
        "vssadmin",
        "delete",
        "shadows",
        "/shadow={5a4b2a77-5c3b-4f0e-9d1e-3a0f2f1d9c11}",
        "/quiet",
    ]
    assert "add volume C: alias dy" in diskshadow_script("C:")
    assert volume_of("\\\\?\\d:") == "D:"


def test_vss_failed_writer_follows_the_policy() -> None:
    writers = parse_writers((FIXTURES / "vss" / "writers_failed.txt").read_text())
    assert [w.name for w in writers if not w.ok] == ["SqlServerWriter"]
    assert "Microsoft Exchange Writer" in [w.name for w in writers if w.ok]  # Exchange: its writer
    run = vss_run("writers_failed.txt")
    with VssProvider(run=run, windows=True).take("C:", Quiescer(on_failure="crash")) as pit:
        assert pit.level == "crash"
    skip = vss_run("writers_failed.txt")
    with (
        pytest.raises(QuiesceFailed, match="SqlServerWriter"),
        VssProvider(run=skip, windows=True).take("C:", Quiescer(on_failure="skip")),
    ):
        pass
    assert skip.calls[-1][:2] == ["vssadmin", "delete"]  # the shadow copy is deleted anyway


def test_vss_error_output() -> None:
    run = Recorded({"diskshadow": (FIXTURES / "vss" / "diskshadow_error.txt").read_text()})
    with pytest.raises(ProviderFailed, match="failed"), VssProvider(run=run, windows=True).take("C:"):
        pass
    assert [c[0] for c in run.calls] == ["diskshadow"]  # nothing created, nothing to delete
