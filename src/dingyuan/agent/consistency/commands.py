"""Running the snapshot tools (lvcreate, diskshadow, vssadmin): one function, replaceable.

Providers that drive command-line tools take a ``run`` callable; tests pass one that answers
from recorded outputs, so the command sequences are checked where the tools do not exist.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

from ...errors import CommandFailed

#: runs argv and returns its standard output; raises CommandFailed on a non-zero exit
Runner = Callable[[Sequence[str]], str]

COMMAND_TIMEOUT = 120.0


def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise CommandFailed(command=argv[0], detail="the command is not installed") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(command=" ".join(argv), detail=f"no answer after {timeout:g} s") from None
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise CommandFailed(command=" ".join(argv), detail=f"status {done.returncode}: {detail}")
    return done.stdout
