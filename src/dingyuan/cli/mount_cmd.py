"""dingyuan mount|umount|restore-files: the filesystem inside a snapshot or clone, through an
export of the running vault (``nbdfuse`` and a loop device on this machine; no kernel NBD
client needed). A mount's state lives in ``$DINGYUAN_RUN_DIR/mounts`` (default
``/run/dingyuan/mounts``), so ``umount`` can undo a mount whose CLI was interrupted."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import DingyuanError
from .common import F, emit_json, json_option
from .export_cmd import start_export
from .remote import api_call, vault_option

DEFAULT_RUN_DIR = "/run/dingyuan"


def state_dir() -> Path:
    return Path(os.environ.get("DINGYUAN_RUN_DIR", DEFAULT_RUN_DIR)) / "mounts"


def partition_option(f: F) -> F:
    return click.option(
        "--partition",
        type=click.IntRange(1, 256),
        help="The partition number [default: the whole disk, or its only partition with a filesystem].",
    )(f)


@click.command()
@click.argument("ref", metavar="SNAPSHOT|CLONE")
@click.argument("target", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@partition_option
@click.option("--rw", is_flag=True, help="Mount read/write: writes go to a clone (a new one for a snapshot).")
@vault_option
@json_option
def mount(ref: str, target: Path, partition: int | None, rw: bool, vault_dir: Path, as_json: bool) -> None:
    """Mount the filesystem of a snapshot (read-only) or a clone on DIR.

    With --rw a snapshot is mounted through a new clone: the snapshot is never written. Undo with
    `dingyuan umount DIR`.
    """
    from ..exports.mount import mount as do_mount

    export = start_export(vault_dir, ref, rw, ())
    try:
        info = do_mount(
            export["uri"], target, partition=partition, writable=rw, state_dir=state_dir(), owner=export["id"]
        )
    except BaseException:
        api_call(vault_dir, "DELETE", f"/exports/{export['id']}")
        if export["new_clone"]:
            api_call(vault_dir, "DELETE", f"/clones/{export['target']}")
        raise
    doc = {
        "target": str(info.target),
        "export": export["id"],
        "kind": export["kind"],
        "source": export["target"],
        "partition": info.partition,
        "fstype": info.fstype,
        "writable": rw,
    }
    if as_json:
        emit_json(doc)
        return
    what = (
        f"clone {export['target'][:12]}" if export["kind"] == "clone" else f"snapshot {export['target'][:12]}"
    )
    part = f", partition {info.partition}" if info.partition else ""
    click.echo(
        f"mounted {what}{part} ({info.fstype}, {'read/write' if rw else 'read-only'}) on {info.target}"
    )


@click.command()
@click.argument("target", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@vault_option
def umount(target: Path, vault_dir: Path) -> None:
    """Unmount DIR (also a mount that was interrupted) and stop its export; a clone keeps its writes."""
    from ..exports.mount import unmount

    info = unmount(target, state_dir=state_dir())
    if info is None:
        raise DingyuanError(f"dingyuan has nothing mounted on {target}")
    if info.owner is not None:
        api_call(vault_dir, "DELETE", f"/exports/{info.owner}")
    click.echo(f"unmounted {info.target}")


@click.command("restore-files")
@click.argument("ref", metavar="SNAPSHOT|CLONE")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True)
@click.option(
    "--to",
    "to",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to restore into (PATH keeps its place below it).",
)
@partition_option
@vault_option
def restore_files(ref: str, paths: tuple[str, ...], to: Path, partition: int | None, vault_dir: Path) -> None:
    """Copy files and directories out of a snapshot: /etc/fstab goes to DIR/etc/fstab."""
    from ..exports.files import restore_files as do_restore

    export = start_export(vault_dir, ref, False, ())
    try:
        restored = do_restore(export["uri"], list(paths), to, partition=partition, state_dir=state_dir())
    finally:
        api_call(vault_dir, "DELETE", f"/exports/{export['id']}")
    for p in restored:
        click.echo(f"restored {p}")
