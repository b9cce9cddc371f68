"""dingyuan snapshot list|show|diff|delete|lock."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click
from rich.table import Table

from ..errors import UsageError
from ..repository.manifest import fmt_time, utcnow
from .common import emit_json, human_bytes, json_option, open_repo, out_console, parse_duration, repo_options


@click.group()
def snapshot() -> None:
    """List, inspect, compare, delete and retention-lock snapshots."""


@snapshot.command("list")
@click.option("--volume", default=None, help="Only this volume.")
@click.option("--host", default=None, help="Only this host.")
@repo_options
@json_option
def list_(
    volume: str | None,
    host: str | None,
    repo_path: str | None,
    passphrase_file: Path | None,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """List snapshots, oldest first."""
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    snaps = [
        s
        for s in repo.snapshots()
        if (volume is None or s.volume == volume) and (host is None or s.host == host)
    ]
    if as_json:
        emit_json([s.summary() for s in snaps])
        return
    table = Table(box=None)
    for col in ("id", "time (UTC)", "host", "volume", "size", "consistency", "locked until", "labels"):
        table.add_column(col)
    now = utcnow()
    for s in snaps:
        table.add_row(
            s.id[:12],
            s.time.strftime("%Y-%m-%d %H:%M:%S"),
            s.host,
            s.volume,
            human_bytes(s.size),
            s.consistency,
            s.retention_until.strftime("%Y-%m-%d %H:%M") if s.locked_at(now) and s.retention_until else "",
            ",".join(f"{k}={v}" for k, v in s.labels.items()),
        )
    out_console.print(table)
    out_console.print(f"{len(snaps)} snapshot(s)")


@snapshot.command()
@click.argument("ref")
@repo_options
@json_option
def show(
    ref: str, repo_path: str | None, passphrase_file: Path | None, cache_dir: Path | None, as_json: bool
) -> None:
    """Show one snapshot's metadata."""
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    s = repo.resolve(ref)
    doc = s.summary() | {"root": s.root.hex(), "height": s.height, "fanout": s.fanout, "source": s.source}
    if as_json:
        emit_json(doc)
        return
    for key in sorted(doc):
        click.echo(f"{key:16} {doc[key]}")


@snapshot.command()
@click.argument("first")
@click.argument("second")
@repo_options
@json_option
def diff(
    first: str,
    second: str,
    repo_path: str | None,
    passphrase_file: Path | None,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Byte ranges that differ between two snapshots (unchanged subtrees are skipped)."""
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    a, b = repo.resolve(first), repo.resolve(second)
    ranges = repo.diff(a, b)
    changed = sum(n for _, n in ranges)
    if as_json:
        emit_json({"from": a.id, "to": b.id, "changed_bytes": changed, "ranges": ranges})
        return
    for off, n in ranges:
        click.echo(f"{off:>16} {n:>12}")
    click.echo(f"{len(ranges)} changed range(s), {human_bytes(changed)}")


@snapshot.command()
@click.argument("refs", nargs=-1, required=True)
@repo_options
def delete(
    refs: tuple[str, ...], repo_path: str | None, passphrase_file: Path | None, cache_dir: Path | None
) -> None:
    """Delete snapshots (their data is freed by 'dingyuan gc'). Locked snapshots are refused."""
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    snaps = [repo.resolve(r) for r in refs]
    for s in snaps:
        repo.delete_snapshot(s)
        click.echo(f"deleted snapshot {s.id[:12]}")


@snapshot.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--for", "duration", default=None, help="Lock for a duration, e.g. 30d, 12h, 1y.")
@click.option("--until", "until", default=None, help="Lock until an ISO 8601 time (UTC if no zone).")
@repo_options
def lock(
    refs: tuple[str, ...],
    duration: str | None,
    until: str | None,
    repo_path: str | None,
    passphrase_file: Path | None,
    cache_dir: Path | None,
) -> None:
    """Retention-lock snapshots: nobody can delete or forget them before the lock expires.

    A lock can be extended, never shortened.
    """
    if (duration is None) == (until is None):
        raise UsageError("give exactly one of --for or --until")
    if duration is not None:
        expiry = utcnow() + parse_duration(duration)
    else:
        assert until is not None
        try:
            expiry = datetime.fromisoformat(until)
        except ValueError:
            raise UsageError(f"cannot read time {until!r}: use ISO 8601, e.g. 2027-01-31T00:00") from None
        if expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=UTC)
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    for ref in refs:
        s = repo.resolve(ref)
        if s.retention_until is not None and s.retention_until >= expiry:
            click.echo(f"snapshot {s.id[:12]} is already locked until {fmt_time(s.retention_until)}")
            continue
        s.retention_until = expiry
        repo.update_snapshot(s)
        click.echo(f"snapshot {s.id[:12]} locked until {fmt_time(expiry)}")
