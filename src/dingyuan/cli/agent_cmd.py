"""dingyuan agent enroll|run|status: the agent on a protected server."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType

import click

from .common import F, emit_json, json_option


def state_dir_option(f: F) -> F:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="DINGYUAN_AGENT_DIR",
        default=Path("/var/lib/dingyuan-agent"),
        show_default=True,
        help="The agent's state directory [env DINGYUAN_AGENT_DIR].",
    )(f)


@click.group()
def agent() -> None:
    """Enroll this server with a vault and protect its volumes."""


@agent.command()
@state_dir_option
@json_option
@click.option("--hostname", help="Enroll under this name (default: the enrollment token's host).")
@click.argument("url")
@click.argument("token")
def enroll(state_dir: Path, as_json: bool, hostname: str | None, url: str, token: str) -> None:
    """Enroll with the vault at URL (https://HOST:PORT) using a one-time TOKEN from
    'dingyuan vault enroll-token'. The token pins the vault's CA: no certificate to copy."""
    from ..agent.config import enroll as do_enroll

    cfg = do_enroll(url, token, state_dir, hostname)
    info = {
        "host": cfg.host,
        "vault": cfg.url,
        "repository_id": cfg.repository_id,
        "state_dir": str(state_dir),
    }
    if as_json:
        emit_json(info)
    else:
        click.echo(f"enrolled as host {cfg.host} with the vault at {cfg.url}")
        click.echo(f"  state in {state_dir}; start protecting with 'dingyuan agent run'")


@agent.command()
@state_dir_option
@click.option("--poll", type=float, default=2.0, show_default=True, help="Seconds between polls when idle.")
@click.option("-v", "--verbose", is_flag=True, help="Log every upload request.")
def run(state_dir: Path, poll: float, verbose: bool) -> None:
    """Run the agent: back up this host's volumes when the vault's policies say so (a daemon;
    stops on SIGTERM or Ctrl-C after the running request)."""
    from ..agent.daemon import Agent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if verbose:
        logging.getLogger("dingyuan.agent").setLevel(logging.DEBUG)
    daemon = Agent(state_dir, poll=poll)

    def stop(signum: int, frame: FrameType | None) -> None:
        daemon.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    daemon.run_forever()


@agent.command("restore")
@state_dir_option
@click.argument("snapshot", metavar="SNAPSHOT|VOLUME@latest")
@click.argument("target", type=click.Path(dir_okay=False))
@click.option(
    "--delta", is_flag=True, help="TARGET holds an older or damaged copy: fetch only the chunks that differ."
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--workers", type=click.IntRange(1, 32), default=4, show_default=True, help="Requests in flight."
)
def restore(state_dir: Path, snapshot: str, target: str, delta: bool, yes: bool, workers: int) -> None:
    """Restore one of this host's snapshots from the vault to TARGET (a file or a disk), over the
    agent's own credentials; every chunk is checked before it is written."""
    from ..agent.config import AgentConfig
    from ..rescue.cli import restore_from
    from ..rescue.state import State

    cfg = AgentConfig.load(state_dir)
    state = State(url=cfg.url, host=cfg.host, token=cfg.token, ca=(state_dir / "ca.pem").read_text())
    restore_from(state, snapshot, target, delta=delta, yes=yes, workers=workers)
