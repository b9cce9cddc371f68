"""dingyuan verify | forget | gc."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError, VerifyFailed
from ..repository.gc import gc as run_gc
from ..repository.manifest import utcnow
from ..repository.retention import KeepPolicy, apply_policy
from ..repository.verify import verify as run_verify
from .common import emit_json, human_bytes, json_option, open_repo, out_console, progress_bar, repo_options


@click.command()
@click.option("--read-data", is_flag=True, help="Also read every pack and check every blob.")
@click.option(
    "--subset", type=click.FloatRange(0, 100), default=100.0, help="With --read-data: percent of packs."
)
@repo_options
@json_option
def verify(
    read_data: bool,
    subset: float,
    repo_path: str | None,
    passphrase_file: Path | None,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Check the repository; exit 40 and name the affected snapshots if anything is wrong."""
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    with progress_bar("verify", not as_json, unit="packs") as progress:
        report = run_verify(repo, read_data=read_data, subset=subset, progress=progress)
    if as_json:
        emit_json(report.as_dict())
    else:
        for w in report.warnings:
            click.echo(f"warning: {w}")
        for p in report.problems:
            click.echo(f"problem: {p}")
        click.echo(
            f"checked {report.snapshots} snapshot(s), {report.packs} pack(s)"
            + (f", read {report.packs_read} pack(s) and {report.blobs_read} blob(s)" if read_data else "")
        )
        if report.ok:
            click.echo("no problems found")
    if not report.ok:
        raise VerifyFailed(
            count=len(report.problems),
            snapshots=", ".join(s[:12] for s in sorted(report.affected)) or "none (data intact)",
        )


@click.command()
@click.option("--keep-last", type=click.IntRange(0), default=0)
@click.option("--keep-hourly", type=click.IntRange(0), default=0)
@click.option("--keep-daily", type=click.IntRange(0), default=0)
@click.option("--keep-weekly", type=click.IntRange(0), default=0)
@click.option("--keep-monthly", type=click.IntRange(0), default=0)
@click.option("--keep-yearly", type=click.IntRange(0), default=0)
@click.option("--volume", default=None, help="Only snapshots of this volume.")
@click.option("--host", default=None, help="Only snapshots of this host.")
@click.option("--dry-run", is_flag=True, help="Only show what would be forgotten.")
@click.option("--gc", "then_gc", is_flag=True, help="Run gc afterwards to free the space.")
@repo_options
@json_option
def forget(
    keep_last: int,
    keep_hourly: int,
    keep_daily: int,
    keep_weekly: int,
    keep_monthly: int,
    keep_yearly: int,
    volume: str | None,
    host: str | None,
    dry_run: bool,
    then_gc: bool,
    repo_path: str | None,
    passphrase_file: Path | None,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Forget snapshots a keep-policy does not keep (per host and volume; locked ones are kept)."""
    policy = KeepPolicy(keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly)
    if policy.empty():
        raise UsageError("give at least one --keep-* option (forget never removes every snapshot)")
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    snaps = [
        s
        for s in repo.snapshots()
        if (volume is None or s.volume == volume) and (host is None or s.host == host)
    ]
    decisions = apply_policy(snaps, policy, utcnow(), dict.fromkeys(repo.clone_bases(), "clone-base"))
    removed = []
    for d in decisions:
        if not d.keep:
            if not dry_run:
                repo.delete_snapshot(d.snapshot)
            removed.append(d.snapshot.id)
    result: dict[str, object] = {
        "kept": [{"id": d.snapshot.id, "reasons": d.reasons} for d in decisions if d.keep],
        "forgotten": removed,
        "dry_run": dry_run,
    }
    if then_gc and not dry_run:
        result["gc"] = run_gc(repo).as_dict()
    if as_json:
        emit_json(result)
        return
    for d in decisions:
        verb = "keep" if d.keep else ("would forget" if dry_run else "forget")
        out_console.print(
            f"{verb:12} {d.snapshot.id[:12]} {d.snapshot.host}:{d.snapshot.volume} "
            f"{d.snapshot.time:%Y-%m-%d %H:%M:%S} {','.join(d.reasons)}",
            highlight=False,
        )
    if "gc" in result:
        click.echo(f"gc: {result['gc']}")


@click.command()
@repo_options
@json_option
def gc(repo_path: str | None, passphrase_file: Path | None, cache_dir: Path | None, as_json: bool) -> None:
    """Free the data of deleted snapshots and of interrupted backups."""
    repo = open_repo(repo_path, passphrase_file, cache_dir)
    report = run_gc(repo)
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(
            f"freed {report.blobs_freed} blob(s), {human_bytes(report.bytes_freed)}; "
            f"deleted {report.packs_deleted} pack(s), rewrote {report.packs_rewritten}"
        )
