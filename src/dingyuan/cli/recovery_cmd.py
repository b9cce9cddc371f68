"""dingyuan convert: a snapshot or clone as a VM disk (raw, qcow2, vmdk, vhdx), streamed from an
export of the running vault."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..errors import DingyuanError, UsageError, VerifyFailed
from .common import emit_json, json_option, progress_bar
from .export_cmd import start_export
from .remote import api_call, vault_option

FORMATS = ("raw", "qcow2", "vmdk", "vhdx")


@click.command()
@click.argument("ref", metavar="SNAPSHOT|CLONE")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    required=True,
    help="qcow2 for KVM, vmdk for VMware, vhdx for Hyper-V, raw for anything.",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
@vault_option
def convert(ref: str, out: Path, fmt: str, progress: bool, vault_dir: Path) -> None:
    """Write a snapshot (or clone) as a VM disk image: sparse, streamed, never half-written."""
    from ..recovery.convert import convert as do_convert

    export = start_export(vault_dir, ref, False, ())
    try:
        with progress_bar(f"converting to {fmt}", progress) as update:
            do_convert(export["uri"], out, fmt, update)  # type: ignore[arg-type]  # a FORMATS choice
    finally:
        api_call(vault_dir, "DELETE", f"/exports/{export['id']}")
    click.echo(f"wrote {out} ({fmt}) from {export['kind']} {export['target'][:12]}")


class _BootGroup(click.Group):
    """``dingyuan boot SNAPSHOT ...`` is ``dingyuan boot start SNAPSHOT ...``."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["start", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=_BootGroup)
def boot() -> None:
    """Run a snapshot or clone as a VM on the vault's machine: `dingyuan boot SNAPSHOT|CLONE`."""


@boot.command("start")
@click.argument("ref", metavar="SNAPSHOT|CLONE")
@click.option("--memory", "memory_mib", type=click.IntRange(64), default=1024, show_default=True, help="MiB.")
@click.option("--cpus", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option(
    "--network",
    type=click.Choice(["isolated", "user", "bridge"]),
    default="isolated",
    show_default=True,
    help="isolated: none; user: NAT through the vault; bridge: on --bridge.",
)
@click.option("--bridge", help="The host bridge for --network bridge.")
@click.option("--firmware", type=click.Choice(["bios", "uefi"]), default="bios", show_default=True)
@click.option(
    "--libvirt-xml",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Do not start qemu: export a clone and write a libvirt domain for it to this file.",
)
@vault_option
@json_option
def boot_start(
    ref: str,
    memory_mib: int,
    cpus: int,
    network: str,
    bridge: str | None,
    firmware: str,
    libvirt_xml: Path | None,
    vault_dir: Path,
    as_json: bool,
) -> None:
    """Boot a snapshot (through a new clone: the snapshot is never written) or a clone."""
    settings = {
        "memory_mib": memory_mib,
        "cpus": cpus,
        "network": network,
        "bridge": bridge,
        "firmware": firmware,
    }
    if libvirt_xml is not None:
        from ..recovery.vm import VmSpec
        from ..recovery.vm import libvirt_xml as domain_xml

        export = start_export(vault_dir, ref, True, ())
        spec = VmSpec(name=f"dingyuan-{export['target'][:12]}", disk_uri=export["uri"], **settings)  # type: ignore[arg-type]
        libvirt_xml.write_text(domain_xml(spec))
        click.echo(f"wrote {libvirt_xml}: `virsh define {libvirt_xml}`")
        click.echo(f"export {export['id']} serves clone {export['target'][:12]} to it", err=True)
        return
    clones = {key for c in api_call(vault_dir, "GET", "/clones") for key in (c["name"], c["id"])}
    body: dict[str, Any] = {**settings, "clone" if ref in clones else "snapshot": ref}
    doc = api_call(vault_dir, "POST", "/boots", json=body)
    if as_json:
        emit_json(doc)
        return
    click.echo(f"boot {doc['id']}: VM running ({doc['accelerator']})")
    click.echo(f"  disk                clone {doc['clone'][:12]} of snapshot {doc['snapshot'][:12]}")
    click.echo(f"  serial console log  {doc['serial_log']}")
    if doc["vnc_socket"]:
        click.echo(f"  VNC (unix socket)   {doc['vnc_socket']}")
    click.echo(f"  stop                dingyuan boot stop {doc['id']}")
    click.echo(f"  keep as a volume    dingyuan boot promote {doc['id']} --volume NAME")


@boot.command("list")
@vault_option
@json_option
def boot_list(vault_dir: Path, as_json: bool) -> None:
    """List the VMs the vault runs."""
    docs = api_call(vault_dir, "GET", "/boots")
    if as_json:
        emit_json(docs)
        return
    for d in docs:
        state = "running" if d["running"] else "stopped"
        click.echo(
            f"{d['id']}  {state:8} snapshot {d['snapshot'][:12]}  clone {d['clone'][:12]}  {d['serial_log']}"
        )


@boot.command("stop")
@click.argument("boot_ids", metavar="ID...", nargs=-1, required=True)
@vault_option
def boot_stop(boot_ids: tuple[str, ...], vault_dir: Path) -> None:
    """Stop VMs (the clone keeps what each wrote)."""
    for i in boot_ids:
        api_call(vault_dir, "DELETE", f"/boots/{i}")
        click.echo(f"stopped boot {i}")


@boot.command("promote")
@click.argument("boot_id", metavar="ID")
@click.option("--volume", required=True, help="The new volume's name.")
@click.option("--host", help="The new volume's host [default: the snapshot's host].")
@vault_option
def boot_promote(boot_id: str, volume: str, host: str | None, vault_dir: Path) -> None:
    """Stop the VM and keep its disk as a volume of its own."""
    doc = api_call(vault_dir, "POST", f"/boots/{boot_id}/promote", json={"volume": volume, "host": host})
    click.echo(f"promoted to {doc['host']}:{doc['volume']}, snapshot {doc['id'][:12]}")


@click.command()
@click.argument("ref", metavar="SNAPSHOT")
@click.option("--console", "pattern", metavar="TEXT", help="Boot it and wait for TEXT on the serial console.")
@click.option(
    "--port", type=click.IntRange(1, 65535), help="Boot it and wait for the guest to accept TCP on PORT."
)
@click.option(
    "--database", type=click.Choice(["postgresql", "mariadb"]), help="Start this database on it and query it."
)
@click.option("--timeout", type=click.IntRange(5, 3600), default=300, show_default=True, help="Seconds.")
@click.option("--memory", "memory_mib", type=click.IntRange(64), default=1024, show_default=True, help="MiB.")
@vault_option
@json_option
def drill(
    ref: str,
    pattern: str | None,
    port: int | None,
    database: str | None,
    timeout: int,
    memory_mib: int,
    vault_dir: Path,
    as_json: bool,
) -> None:
    """Prove a snapshot restores: boot it isolated and wait for a probe, or start its database.

    The verdict and the time to ready are recorded on the snapshot (`snapshot show`). Exit status 40
    when the drill fails.
    """
    if sum(x is not None for x in (pattern, port, database)) != 1:
        raise UsageError("give exactly one of --console TEXT, --port N and --database KIND")
    body: dict[str, Any] = {
        "snapshot": ref,
        "kind": database or "boot",
        "timeout_seconds": timeout,
        "memory_mib": memory_mib,
    }
    if pattern is not None:
        body["pattern"] = pattern
    if port is not None:
        body["port"] = port
    job = api_call(vault_dir, "POST", "/drills", json=body)
    deadline = time.monotonic() + timeout + 120
    while job["state"] in ("queued", "running"):
        if time.monotonic() > deadline:
            raise DingyuanError(f"drill job {job['id']} has not finished; see `GET /api/v1/jobs/{job['id']}`")
        time.sleep(1)
        job = api_call(vault_dir, "GET", f"/jobs/{job['id']}")
    if job["state"] != "succeeded":
        raise DingyuanError(f"the drill could not run: {job['error']}")
    verdict = job["details"]["verdict"]
    if as_json:
        emit_json(verdict)
    else:
        result, kind, seconds = verdict["result"].upper(), verdict["kind"], verdict["seconds"]
        click.echo(f"drill {result} ({kind}, {seconds} s): {verdict['detail']}")
    if verdict["result"] != "passed":
        raise VerifyFailed(count=1, snapshots=job["details"]["snapshot"][:12])
