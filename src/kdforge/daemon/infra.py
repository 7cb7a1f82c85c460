"""Failures of the machine, not of the data: a full disk (ENOSPC, EDQUOT, EFBIG past a file size
limit), a read-only or failing disk (EROFS, EIO), no file descriptors (EMFILE, ENFILE), no kernel
memory (ENOMEM, ENOBUFS). A batch that meets one is not rejected (its data is fine): the daemon
keeps it claimed and waits; a command that meets one at start says so in one line.

torch.save hides the OSError: its zip writer fails with "unexpected pos N vs M" or "file write
failed" (the cause an iostream error), and safetensors with "IoError(Os { code: 28, ... })"; those
texts are read here too. Anything else (a bad line, a non-finite loss, a template error) is the
data's and is none of this module's business.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager

from kdforge.errors import KdforgeError

MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EMFILE,
                            errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# torch's zip writer after a failed write; safetensors' Rust io::Error (its OS error code).
WRITE_FAILED = re.compile(r"unexpected pos \d+ vs \d+|file write failed|PytorchStreamWriter failed writing")
RUST_OS_ERROR = re.compile(r"(?:\bcode: |os error )(\d+)")
FIX = "free disk space (or raise the quota / file size limit, or file descriptors)"


class InfrastructureError(KdforgeError):
    """The machine failed us (disk full, I/O error, no descriptors): nothing is wrong with the
    input; free the resource and run again (exit 1)."""


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def infrastructure_fault(e: BaseException) -> str | None:
    """One line saying what the machine refused (e.g. "No space left on device: .../optimizer.pt")
    when `e` or an exception under it is such a failure; None when it is anything else."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in MACHINE_ERRNOS:
            return os.strerror(x.errno) + (f": {x.filename}" if x.filename else "")
        text = str(x)
        m = RUST_OS_ERROR.search(text)
        if m and int(m.group(1)) in MACHINE_ERRNOS:
            return f"{os.strerror(int(m.group(1)))} (writing {type(x).__name__}: {text.splitlines()[0][:200]})"
        if WRITE_FAILED.search(text):
            return f"a checkpoint file could not be written ({text.splitlines()[0][:200]}): the disk is full or failing"
        if isinstance(x, FileNotFoundError) and "No usable temporary directory" in text:
            return "no temporary directory can be written (tempfile: the disk is full?)"  # an import (torch) needs one
    return None


def as_infrastructure_error(e: BaseException, doing: str) -> InfrastructureError | None:
    """`e` as one clear InfrastructureError while `doing` (e.g. "starting the daemon on BASE"),
    or None when it is not the machine's failure."""
    why = infrastructure_fault(e)
    return None if why is None else InfrastructureError(f"{doing}: {why}; {FIX}, then run it again")


@contextmanager
def machine_errors(doing: str):
    """Turn the machine's failures inside the block into one InfrastructureError line (exit 1,
    no traceback chain); everything else passes through as it was."""
    try:
        yield
    except KdforgeError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the machine's
        ours = as_infrastructure_error(e, doing)
        if ours is None:
            raise
        raise ours from None
