"""dingyuan backup | restore."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from ..errors import UsageError
from ..repository.backup import backup as run_backup
from ..repository.manifest import CONSISTENCY_LEVELS, Snapshot
from ..repository.repo import Repository
from ..repository.restore import restore as run_restore
from .common import emit_json, human_bytes, json_option, open_repo, parse_size, progress_bar, repo_options


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"label {pair!r} must look like key=value")
        out[key] = value
    return out


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--volume", required=True, help="Volume name (one protected disk of a host).")
@click.option("--host", default=None, help="Host name [default: this machine's].")
@click.option(
    "--chunk-size", default=None, help="Chunk size, power of two 4K..4M [default 64K, or the volume's]."
)
@click.option(
    "--label", "labels", multiple=True, metavar="KEY=VALUE", help="Label the snapshot (repeatable)."
)
@click.option("--consistency", type=click.Choice(CONSISTENCY_LEVELS), default="crash", show_default=True)
@repo_options
@json_option
def backup(
    source: str,
    volume: str,
    host: str | None,
    chunk_size: str | None,
    labels: tuple[str, ...],
    consistency: str,
    repo_path: str | None,
    passphrase_file: Path | None,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Back up SOURCE (a disk-image file or block device) as a new snapshot of a volume.

    The first backup of a volume reads everything; later ones hash every chunk and store only
    chunks the repository lacks.
    """
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    with progress_bar(f"backup {volume}", not as_json) as progress:
        result = run_backup(
            repo,
            source,
            volume,
            host=host or socket.gethostname(),
            chunk_size=parse_size(chunk_size) if chunk_size else None,
            labels=_labels(labels),
            consistency=consistency,
            progress=progress,
        )
    snap = result.snapshot
    if as_json:
        emit_json(snap.summary())
        return
    rate = result.bytes_scanned / max(result.seconds, 1e-9)
    click.echo(
        f"snapshot {snap.id[:12]} of {snap.host}:{snap.volume} saved "
        f"({human_bytes(snap.size)} volume, {result.chunks_new} new chunks, "
        f"{human_bytes(result.bytes_new)} new data, {human_bytes(result.bytes_stored)} stored, "
        f"{result.seconds:.1f} s, {human_bytes(rate)}/s)"
    )


@click.command()
@click.argument("snapshot")
@click.argument("target", type=click.Path(dir_okay=False))
@click.option(
    "--delta",
    is_flag=True,
    help="TARGET exists and holds an older or damaged copy: read and hash it, fetch and write only "
    "the chunks that differ.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted restore of SNAPSHOT to TARGET after what its journal says is on "
    "disk (without a journal: --delta).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Start over even if TARGET holds an interrupted restore of another snapshot.",
)
@click.option(
    "--no-fsync",
    is_flag=True,
    help="Leave the written data in the page cache instead of flushing it to disk at the end "
    "(no journal is kept: an interrupted restore cannot resume, only redo with --delta).",
)
@click.option(
    "--live",
    is_flag=True,
    help="Serve TARGET over NBD or iSCSI at once while the copy runs (reads of what is not copied "
    "yet come from the snapshot, writes are kept); runs until Ctrl-C, and resumes when run again.",
)
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    metavar="HOST:PORT",
    help="Where --live serves (port 0: a free one).",
)
@click.option(
    "--protocol",
    type=click.Choice(["nbd", "iscsi"]),
    default="nbd",
    show_default=True,
    help="How --live serves TARGET: iscsi for Windows, ESXi and iPXE.",
)
@repo_options
@json_option
def restore(
    snapshot: str,
    target: str,
    delta: bool,
    resume: bool,
    force: bool,
    no_fsync: bool,
    live: bool,
    listen: str,
    protocol: str,
    repo_path: str | None,
    passphrase_file: Path | None,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Restore SNAPSHOT (id, unique id prefix or VOLUME@latest) to TARGET (file or block device).

    Every chunk is verified against its id before it is written; holes stay holes in files. A
    regular-file TARGET is made the snapshot's size; a block device must be at least that large.
    While it runs, a journal (TARGET.dyrestore beside a file; in the cache directory for a
    device) records what is on disk, so that an interrupted restore continues with --resume.
    """
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    snap = repo.resolve(snapshot)
    if live:
        if delta or resume or no_fsync:
            raise UsageError(
                "--live resumes by itself and always flushes: drop --delta, --resume, --no-fsync"
            )
        _live_restore(repo, snap, target, listen, protocol)
        return
    with progress_bar(f"restore {snap.id[:12]}", not as_json) as progress:
        stats = run_restore(
            repo, snap, target, progress=progress, fsync=not no_fsync, delta=delta, resume=resume, force=force
        )
    if as_json:
        emit_json({"snapshot": snap.id, "target": target, "size": snap.size, **stats.as_dict()})
        return
    flushed = "not flushed (--no-fsync)" if no_fsync else "flushed to disk"
    resumed = f", resumed at {human_bytes(stats.resumed_at)}" if stats.resumed_at else ""
    compared = (
        f"{stats.chunks_differing} of {stats.chunks_compared} chunks differed, "
        if stats.mode == "delta"
        else ""
    )
    click.echo(
        f"restored snapshot {snap.id[:12]} ({human_bytes(snap.size)}) to {target}{resumed}, verified, "
        f"{flushed} ({stats.mode}: {compared}{stats.chunks_fetched} chunks fetched, "
        f"{human_bytes(stats.bytes_fetched)} read from packs, {human_bytes(stats.bytes_written)} written, "
        f"{human_bytes(stats.bytes_zeroed)} zeroed, {stats.seconds:.1f} s)"
    )


def _live_restore(repo: Repository, snap: Snapshot, target: str, listen: str, protocol: str) -> None:
    """Serve a live restore of ``snap`` to ``target`` over NBD or iSCSI until SIGINT or SIGTERM."""
    import hashlib
    import signal
    import threading

    from ..exports.iscsi import IQN_PREFIX
    from ..exports.iscsi.server import ThreadedIscsiServer
    from ..exports.nbd.server import ThreadedNbdServer
    from ..repository.live import LiveRestore
    from ..vault.server import parse_listen

    host, port = parse_listen(listen)
    key = hashlib.sha256(os.path.realpath(target).encode()).hexdigest()[:32]
    state = repo.cache.path.parent / "live" / key
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    device = LiveRestore(repo, snap, target, state)
    try:
        server = (ThreadedIscsiServer if protocol == "iscsi" else ThreadedNbdServer)(host=host, port=port)
        with server:
            shown = f"[{host}]" if ":" in host else host
            if isinstance(server, ThreadedIscsiServer):
                name = f"{IQN_PREFIX}:live-{snap.id[:12]}"
                server.add(name, device)
                click.echo(f"iscsi://{shown}:{server.port}/{name}/0")
            else:
                name = snap.id[:12]
                server.add(name, device)
                click.echo(f"nbd://{shown}:{server.port}/{name}")
            click.echo(
                f"serving {target} while it is restored from snapshot {snap.id[:12]}; Ctrl-C stops "
                "(run the same command again to continue)",
                err=True,
            )
            while not stop.is_set() and not device.wait(1.0):  # wait() raises the copier's error
                pass
            if device.complete and not stop.is_set():
                click.echo(f"restore complete: {target} is whole; still serving it until Ctrl-C", err=True)
                stop.wait()
    finally:
        device.close()
    state_word = "complete" if device.complete else f"{human_bytes(device.restored_bytes)} restored so far"
    click.echo(f"stopped: {target} {state_word}")
