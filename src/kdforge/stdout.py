"""Log lines on stdout that survive stdout's reader going away.

`kdforge train ... | tee log`, then Ctrl-C: the terminal sends SIGINT to tee as well, so the pipe
breaks while the run is finishing its step, and the next print raises BrokenPipeError before the
checkpoint is written (click then exits 1 in silence). A broken stdout is no reason to lose work:
the printer below points fd 1 at /dev/null (so no later flush, not even the interpreter's at exit,
fails again) and sends the remaining lines to stderr, where a terminal usually still is.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable


def _to_stderr(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr is gone too: nothing left to tell


def line_printer() -> Callable[[str], None]:
    """A `print(line, flush=True)` to stdout that never raises on a closed stdout: after the
    first EPIPE it says so once and prints to stderr instead."""
    broken = False

    def echo(line: str) -> None:
        nonlocal broken
        if not broken:
            try:
                print(line, flush=True)
                return
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                broken = True
                _silence_stdout()
                _to_stderr("note: stdout was closed (broken pipe); log lines go to stderr from here")
        _to_stderr(line)

    return echo


def _silence_stdout() -> None:
    """fd 1 onto /dev/null: what is still buffered for stdout (and every later write) goes nowhere,
    instead of raising again at the next flush or at exit ("Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # no real fd 1 (an in-process caller's StringIO): nothing to silence
