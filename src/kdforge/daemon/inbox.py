"""The inbox: which files are ready, claiming one atomically, and where a file goes afterwards.

A file is *ready* when it is a `*.jsonl` file with no temp-file name (hidden, `.tmp`, `.part`) and
it has not been modified for `settle_seconds` (its mtime changes with every write, so a file still
being copied in is left alone). Files are taken oldest first (mtime, then name). Claiming is one
`rename` into `inbox/.claimed/`: of two processes that try, exactly one succeeds. The base directory
is also locked (flock) by the running daemon, so a second daemon is refused before it loads
anything.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import time
from pathlib import Path

from kdforge.atomic import atomic_write_text, fsync_dir
from kdforge.errors import UsageError

TEMP_SUFFIXES = {".tmp", ".part", ".partial", ".crdownload", ".swp"}


def is_batch_name(name: str) -> bool:
    """`*.jsonl`, not hidden, no temp-file suffix anywhere in the name (`x.part.jsonl` waits too)."""
    if name.startswith(".") or not name.endswith(".jsonl"):
        return False
    return not any(s.lower() in TEMP_SUFFIXES for s in Path(name).suffixes)


def batch_files(folder: Path) -> list[Path]:
    """Batch files in `folder`, oldest first."""
    found = []
    for p in folder.glob("*.jsonl"):
        if not is_batch_name(p.name):
            continue
        try:
            st = p.stat()
        except FileNotFoundError:  # taken or removed while we looked
            continue
        found.append((st.st_mtime_ns, p.name, p))
    return [p for _, _, p in sorted(found)]


def seconds_since_modified(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def next_ready(inbox: Path, settle_seconds: float) -> tuple[Path | None, float | None]:
    """(the oldest settled batch file, None) or (None, seconds until the next one may settle)."""
    wait = None
    for p in batch_files(inbox):
        age = seconds_since_modified(p)
        if age is None:
            continue
        if age >= settle_seconds:
            return p, None
        left = settle_seconds - age
        wait = left if wait is None else min(wait, left)
    return None, wait


def claim(path: Path, processing: Path) -> Path | None:
    """Move `path` into the claimed folder (atomic: one filesystem). None if another process took it."""
    processing.mkdir(parents=True, exist_ok=True)
    dest = processing / path.name
    if dest.exists():  # a file of that name is still being trained: leave the new one waiting
        return None
    try:
        os.rename(path, dest)
    except FileNotFoundError:
        return None
    fsync_dir(processing)
    fsync_dir(path.parent)
    return dest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def free_name(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem.2.suffix, ... if taken: never overwrite a kept file."""
    dest = folder / name
    n = 1
    while dest.exists() or dest.with_name(dest.name + ".reason").exists():
        n += 1
        stem, dot, suf = name.rpartition(".")
        dest = folder / (f"{stem}.{n}.{suf}" if dot else f"{name}.{n}")
    return dest


def move_to(path: Path, folder: Path) -> Path:
    """Move `path` into `folder` under a free name; whole or not at all, even across filesystems."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = free_name(folder, path.name)
    try:
        os.rename(path, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = folder / f".{dest.name}.{os.getpid()}.tmp"
        shutil.copy2(path, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        path.unlink()
    fsync_dir(folder)
    return dest


def reject(path: Path, rejected: Path, reason: str) -> Path:
    """Move an unusable batch to `rejected/` with `NAME.reason` beside it (written first)."""
    rejected.mkdir(parents=True, exist_ok=True)
    dest = free_name(rejected, path.name)
    atomic_write_text(dest.with_name(dest.name + ".reason"), reason.rstrip() + "\n")
    os.rename(path, dest)  # inside the base dir: one filesystem
    fsync_dir(rejected)
    return dest


class BaseDirLock:
    """An exclusive flock on BASE/.daemon.lock for the life of the process (the kernel drops it
    when the process dies, even by SIGKILL, so a stale lock never blocks a restart)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> "BaseDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            base = self.path.parent
            raise UsageError(f"another kdforge daemon (pid {holder}) is already running on {base}; "
                             f"stop it first (touch {base / '.stop'}) or use another --base-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
