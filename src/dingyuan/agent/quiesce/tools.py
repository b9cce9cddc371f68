"""Running a database's command-line client (``sqlplus``, ``sqlcmd``) for a plugin step.

Plugins that drive a client take a ``run`` callable of the same shape as the consistency
providers' (:data:`dingyuan.agent.consistency.commands.Runner`: argv in, standard output out,
:class:`~dingyuan.errors.CommandFailed` on failure), so tests answer from recorded outputs where
the servers do not exist. The real one, :func:`run_bounded`, runs the client in a session of its
own and kills the whole process group at the step's timeout, like the script plugin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Sequence

from ...errors import CommandFailed

#: runs argv and returns its output; raises CommandFailed on a non-zero exit or a timeout
Runner = Callable[[Sequence[str]], str]

#: characters of a failed command's output kept in the error
OUTPUT_TAIL = 2000


def run_bounded(argv: Sequence[str], timeout: float) -> str:
    """Run ``argv`` (no shell, no input) with its standard error merged into its output; the
    process group is killed after ``timeout`` seconds."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        raise CommandFailed(command=argv[0], detail=f"cannot run it: {e}") from None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, _ = proc.communicate()
        raise CommandFailed(command=argv[0], detail=f"killed after {timeout:g} s{output_tail(out)}") from None
    except BaseException:
        kill_group(proc)
        proc.wait()
        raise
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise CommandFailed(command=argv[0], detail=f"status {proc.returncode}{output_tail(out)}")
    return text


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group a command was started in (``start_new_session=True``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def output_tail(out: bytes | None) -> str:
    """The end of a command's output, for an error message (empty if it printed nothing)."""
    text = (out or b"").decode(errors="replace").strip()
    return f": {text[-OUTPUT_TAIL:]}" if text else ""
