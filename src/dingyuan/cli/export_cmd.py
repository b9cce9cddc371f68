"""dingyuan export start|list|stop and dingyuan clone create|list|snapshot|promote|delete: they
ask the running vault (its API), which serves the exports and keeps the clones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ..errors import UsageError
from ..exports.iscsi.chap import Credentials
from ..recovery.vm import ipxe_script
from .common import emit_json, human_bytes, json_option, out_console
from .remote import api_call, vault_option


def _table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    out_console.print(table, highlight=False)


def _chap(text: str | None) -> dict[str, str] | None:
    """``USER:SECRET`` as the API takes it (checked there, and by the Credentials type)."""
    if text is None:
        return None
    credentials = Credentials.parse(text)
    return {"user": credentials.user, "secret": credentials.secret}


def start_export(
    vault_dir: Path,
    ref: str,
    writable: bool,
    allow: tuple[str, ...],
    *,
    protocol: str = "nbd",
    chap: str | None = None,
    mutual_chap: str | None = None,
) -> dict[str, Any]:
    """Export a clone (by name or id) or else a snapshot; the API's answer, and ``new_clone``."""
    body: dict[str, Any] = {
        "writable": writable,
        "allowed_clients": list(allow) or None,
        "protocol": protocol,
        "chap": _chap(chap),
        "mutual_chap": _chap(mutual_chap),
    }
    clones = {c["name"]: c for c in api_call(vault_dir, "GET", "/clones")}
    if ref in clones or any(c["id"].startswith(ref) for c in clones.values()):
        body["clone"] = ref
    else:
        body["snapshot"] = ref
    doc: dict[str, Any] = api_call(vault_dir, "POST", "/exports", json=body)
    doc["new_clone"] = writable and "snapshot" in body  # the vault made a clone for it
    return doc


@click.group()
def export() -> None:
    """Serve snapshots and clones as block devices (NBD, iSCSI) from the running vault."""


@export.command("start")
@click.argument("ref", metavar="SNAPSHOT|CLONE")
@click.option(
    "--writable",
    is_flag=True,
    help="Serve a clone (a new one for a snapshot): writes never reach a snapshot.",
)
@click.option(
    "--allow",
    multiple=True,
    metavar="NETWORK",
    help="Admit clients from this address or network only (repeatable).",
)
@click.option(
    "--protocol",
    type=click.Choice(["nbd", "iscsi"]),
    default="nbd",
    show_default=True,
    help="nbd for Linux, qemu and libnbd clients; iscsi for Windows, VMware ESXi and iPXE.",
)
@click.option(
    "--chap",
    metavar="USER:SECRET",
    help="iSCSI: initiators must log in with CHAP as USER with SECRET (at least 12 characters).",
)
@click.option(
    "--mutual-chap",
    metavar="USER:SECRET",
    help="iSCSI: the target's own CHAP credentials, for initiators that authenticate the target.",
)
@click.option(
    "--ipxe",
    "ipxe_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="iSCSI: also write an iPXE script that boots a server from the export (sanboot).",
)
@click.option(
    "--ipxe-server",
    metavar="HOST",
    help="The portal address the booting server reaches the vault at [default: the export's portal].",
)
@vault_option
@json_option
def export_start(
    ref: str,
    writable: bool,
    allow: tuple[str, ...],
    protocol: str,
    chap: str | None,
    mutual_chap: str | None,
    ipxe_file: Path | None,
    ipxe_server: str | None,
    vault_dir: Path,
    as_json: bool,
) -> None:
    """Export a snapshot (read-only) or a clone, and print its nbd:// or iscsi:// URI.

    SNAPSHOT is an id, a unique id prefix or VOLUME@latest; CLONE a clone's name or id. The NBD
    export name in the URI works as an access token: share it only with the clients that need it.
    Over iSCSI, the target (its IQN) is LUN 0 at the printed portal; protect it with --chap.
    """
    if ipxe_file is not None and protocol != "iscsi":
        raise UsageError("--ipxe needs --protocol iscsi: iPXE has no NBD client")
    if ipxe_server is not None and ipxe_file is None:
        raise UsageError("--ipxe-server names the portal in the --ipxe script: give --ipxe FILE too")
    if ipxe_server is not None:
        ipxe_script(ipxe_server, "iqn.2026-11.org.dingyuan:check")  # refuse a bad host before exporting
    doc = start_export(vault_dir, ref, writable, allow, protocol=protocol, chap=chap, mutual_chap=mutual_chap)
    if ipxe_file is not None:
        host, _, port = doc["portal"].rpartition(":")
        script = ipxe_script(ipxe_server or host, doc["name"], port=int(port), lun=0, name=doc["target"][:12])
        ipxe_file.write_text(script)
    if as_json:
        emit_json(doc)
        return
    click.echo(doc["uri"])
    if doc["protocol"] == "iscsi":
        chap_note = f", CHAP user {doc['chap_user']}" if doc.get("chap_user") else ""
        click.echo(f"iSCSI target {doc['name']} at portal {doc['portal']}, LUN 0{chap_note}", err=True)
        if ipxe_file is not None:
            click.echo(f"iPXE script written to {ipxe_file}", err=True)
    what = (
        f"clone {doc['target'][:12]} (writable)"
        if doc["kind"] == "clone"
        else f"snapshot {doc['target'][:12]} (read-only)"
    )
    click.echo(f"export {doc['id']}: {what}; stop it with `dingyuan export stop {doc['id']}`", err=True)


@export.command("list")
@vault_option
@json_option
def export_list(vault_dir: Path, as_json: bool) -> None:
    """List the vault's exports."""
    docs = api_call(vault_dir, "GET", "/exports")
    if as_json:
        emit_json(docs)
        return
    _table(
        ("id", "protocol", "kind", "target", "mode", "clients", "uri"),
        [
            (
                str(d["id"]),
                d["protocol"],
                d["kind"],
                d["target"][:12],
                "rw" if d["writable"] else "ro",
                ",".join(d["allowed_clients"] or ["any"]),
                d["uri"],
            )
            for d in docs
        ],
    )


@export.command("stop")
@click.argument("export_ids", metavar="ID...", nargs=-1, required=True, type=int)
@vault_option
def export_stop(export_ids: tuple[int, ...], vault_dir: Path) -> None:
    """Stop exports (their clients are disconnected; a clone stays)."""
    for i in export_ids:
        api_call(vault_dir, "DELETE", f"/exports/{i}")
        click.echo(f"stopped export {i}")


@click.group()
def clone() -> None:
    """Writable copy-on-write volumes born from snapshots; a snapshot itself is never written."""


@clone.command("create")
@click.argument("snapshot")
@click.option("--name", help="The clone's name [default: VOLUME-SNAPSHOT-N].")
@vault_option
@json_option
def clone_create(snapshot: str, name: str | None, vault_dir: Path, as_json: bool) -> None:
    """Make a clone of SNAPSHOT (an id, a unique prefix or VOLUME@latest)."""
    doc = api_call(vault_dir, "POST", "/clones", json={"snapshot": snapshot, "name": name})
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"clone {doc['name']} ({doc['id'][:12]}) of snapshot {doc['snapshot'][:12]}")


@clone.command("list")
@vault_option
@json_option
def clone_list(vault_dir: Path, as_json: bool) -> None:
    """List the clones."""
    docs = api_call(vault_dir, "GET", "/clones")
    if as_json:
        emit_json(docs)
        return
    _table(
        ("name", "id", "snapshot", "host", "volume", "size", "created (UTC)", "exports"),
        [
            (
                d["name"],
                d["id"][:12],
                d["snapshot"][:12],
                d["host"],
                d["volume"],
                human_bytes(d["size"]),
                d["created"][:19],
                ",".join(map(str, d["exports"])),
            )
            for d in docs
        ],
    )


@clone.command("snapshot")
@click.argument("ref", metavar="CLONE")
@vault_option
@json_option
def clone_snapshot(ref: str, vault_dir: Path, as_json: bool) -> None:
    """Take a snapshot of a clone's current contents (its volume is the clone's name)."""
    doc = api_call(vault_dir, "POST", f"/clones/{ref}/snapshot")
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"snapshot {doc['id'][:12]} of {doc['host']}:{doc['volume']}")


@clone.command("promote")
@click.argument("ref", metavar="CLONE")
@click.option("--volume", required=True, help="The new volume's name.")
@click.option("--host", help="The new volume's host [default: the snapshot's host].")
@vault_option
@json_option
def clone_promote(ref: str, volume: str, host: str | None, vault_dir: Path, as_json: bool) -> None:
    """Make a clone a volume of its own: snapshot it under VOLUME, then delete the clone."""
    doc = api_call(vault_dir, "POST", f"/clones/{ref}/promote", json={"volume": volume, "host": host})
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"promoted to {doc['host']}:{doc['volume']}, snapshot {doc['id'][:12]}")


@clone.command("delete")
@click.argument("refs", metavar="CLONE...", nargs=-1, required=True)
@vault_option
def clone_delete(refs: tuple[str, ...], vault_dir: Path) -> None:
    """Delete clones and what was written to them (refused while exported)."""
    for ref in refs:
        api_call(vault_dir, "DELETE", f"/clones/{ref}")
        click.echo(f"deleted clone {ref}")
