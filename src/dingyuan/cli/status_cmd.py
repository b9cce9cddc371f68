"""dingyuan status: every volume's newest snapshot, RPO, next run and last error.

Exit status 0 when no volume's RPO is breached, 3 when one is (after printing the table or the
JSON), so a monitoring check can run ``dingyuan status --json``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from ..errors import RpoBreached
from .common import emit_json, json_option, out_console
from .vault_cmd import vault_dir_option

RPO_TEXT = {"met": "met", "breached": "[bold red]BREACHED[/]", "pending": "pending", "unprotected": "-"}


def human_duration(seconds: float) -> str:
    """A short duration: 45s, 12m, 3h05m, 2d04h."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _next_run(next_run: datetime | None, running: bool, now: datetime) -> str:
    if running:
        return "running"
    if next_run is None:
        return "-"
    if next_run <= now:
        return "due now"
    return f"in {human_duration((next_run - now).total_seconds())} ({next_run:%Y-%m-%d %H:%M} UTC)"


@click.command()
@vault_dir_option
@json_option
def status(vault_dir: Path, as_json: bool) -> None:
    """Show every volume's protection: newest snapshot, RPO met or BREACHED, next run, last error.

    Reads the vault's catalog. Exit status 3 when any volume's RPO is breached.
    """
    from sqlalchemy.orm import Session

    from ..catalog.db import open_catalog
    from ..catalog.models import utcnow
    from ..vault.config import load_vault
    from ..vault.status import volume_status

    cfg = load_vault(vault_dir)
    engine = open_catalog(cfg.catalog_url)
    now = utcnow()
    try:
        with Session(engine) as session:
            volumes = volume_status(session, now)
    finally:
        engine.dispose()

    if as_json:
        emit_json([v.as_json() for v in volumes])
    elif not volumes:
        click.echo("no volumes yet: enroll an agent and give its volumes a policy")
    else:
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("host", "volume", "policy", "last snapshot", "RPO", "next run", "last error"):
            table.add_column(col, overflow="fold")
        for v in volumes:
            age = "never" if v.age_seconds is None else f"{human_duration(v.age_seconds)} ago"
            table.add_row(
                v.host,
                v.volume,
                v.policy or "-",
                age,
                RPO_TEXT[v.rpo],
                _next_run(v.next_run, v.running, now),
                v.last_error or "",
            )
        out_console.print(table, highlight=False)

    breached = [f"{v.host}:{v.volume}" for v in volumes if v.breached]
    if breached:
        raise RpoBreached(count=len(breached), volumes=", ".join(breached))
