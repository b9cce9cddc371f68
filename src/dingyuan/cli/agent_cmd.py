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
