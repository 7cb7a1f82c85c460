"""The inbox: which entries are batches, claiming one atomically, reading it safely, and where an
entry goes afterwards (SPEC "daemon", "Inbox hygiene").

Only a regular `*.jsonl` file directly in `inbox/`, with no temp-file name (hidden, `.tmp`, `.part`
...), is a batch. Every test is on the entry itself (`lstat`): a symlink is never followed, a FIFO
or device never opened. A batch is *ready* when it has not been modified for `settle_seconds`
(its mtime changes with every write, so a file still being copied in is left alone); batches are
taken oldest first (mtime, then name). Claiming is one `rename` into `inbox/.claimed/` under a new
claim id (`ID--NAME`): of two processes that try, exactly one succeeds, and a file dropped again
under the same name is a new claim, never mistaken for the one trained before. A claimed file is
read through one descriptor opened with O_NOFOLLOW|O_NONBLOCK and checked to be a regular file, line
by line, hashing as it goes. The base directory is also locked (flock) by the running daemon, so a
second daemon is refused before it loads anything.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from kdforge.atomic import atomic_write_text, fsync_dir
from kdforge.errors import DataError, UsageError

TEMP_SUFFIXES = {".tmp", ".part", ".partial", ".crdownload", ".swp"}
CLAIM_RE = re.compile(r"([0-9a-f]{16})--(.+)", re.DOTALL)  # a name may hold any character
READ_CHUNK = 1 << 20  # bytes hashed per read


def shown(name: str) -> str:
    """A file name as it may go into a log line or a reason: unchanged when printable (accents,
    CJK and emoji are), else escaped like a Python literal, so a newline in a name can never
    start a forged log line and undecodable bytes never break the log's UTF-8."""
    return name if name.isprintable() else repr(name)[1:-1]


def is_batch_name(name: str) -> bool:
    """`*.jsonl`, not hidden, no temp-file suffix anywhere in the name (`x.part.jsonl` waits too)."""
    if name.startswith(".") or not name.endswith(".jsonl"):
        return False
    return not any(s.lower() in TEMP_SUFFIXES for s in Path(name).suffixes)


def is_temp_name(name: str) -> bool:
    """A name writers use while a file is incomplete: left where it is until renamed."""
    return name.startswith(".") or any(s.lower() in TEMP_SUFFIXES for s in Path(name).suffixes)


def entry_kind(st: os.stat_result) -> str:
    mode = st.st_mode
    return ("regular file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode)
            else "symlink" if stat.S_ISLNK(mode) else "FIFO" if stat.S_ISFIFO(mode)
            else "socket" if stat.S_ISSOCK(mode) else "device")


@dataclass
class Scan:
    """One look at a folder: its batches (oldest first, with their mtimes) and everything else."""

    batches: list[tuple[Path, float]] = field(default_factory=list)
    others: list[tuple[Path, str]] = field(default_factory=list)  # (entry, why it is no batch)


def scan(folder: Path) -> Scan:
    out, found = Scan(), []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return out
    for name in names:
        p = folder / name
        try:
            st = os.lstat(p)
        except FileNotFoundError:  # taken or removed while we looked
            continue
        kind = entry_kind(st)
        if kind == "directory" and name == ".claimed":
            continue
        if kind == "regular file" and is_batch_name(name):
            found.append((st.st_mtime_ns, name, p, st.st_mtime))
        elif kind == "symlink" and not p.exists():
            out.others.append((p, "dangling symlink"))
        else:
            why = (kind if kind != "regular file" else "temp-file name" if is_temp_name(name)
                   else "not a *.jsonl name")
            out.others.append((p, why))
    out.batches = [(p, mtime) for _, _, p, mtime in sorted(found)]
    return out


def batch_files(folder: Path) -> list[Path]:
    """Batch files in `folder`, oldest first."""
    return [p for p, _ in scan(folder).batches]


def next_ready(inbox: Path, settle_seconds: float) -> tuple[Path | None, float | None]:
    """(the oldest settled batch file, None) or (None, seconds until the next one may settle)."""
    wait = None
    for p, mtime in scan(inbox).batches:
        age = time.time() - mtime
        if age >= settle_seconds:
            return p, None
        left = settle_seconds - age
        wait = left if wait is None else min(wait, left)
    return None, wait


def claim(path: Path, claimed: Path) -> Path | None:
    """Move `path` into the claimed folder under a new claim id (atomic: one filesystem). None if
    another process took it first."""
    claimed.mkdir(parents=True, exist_ok=True)
    dest = claimed / claimed_name(uuid.uuid4().hex[:16], path.name)
    try:
        os.rename(path, dest)
    except FileNotFoundError:
        return None
    fsync_dir(claimed)
    fsync_dir(path.parent)
    return dest


def claimed_name(claim_id: str, name: str) -> str:
    return f"{claim_id}--{name}"


def claim_parts(path: Path) -> tuple[str | None, str]:
    """(claim id, the name it was dropped under). No id: claimed by a daemon before claim ids."""
    m = CLAIM_RE.fullmatch(path.name)
    return (m.group(1), m.group(2)) if m else (None, path.name)


# ---------------------------------------------------------------------------- reading a claimed file

@dataclass
class Fingerprint:
    size: int
    sha256: str


class Digest:
    """sha256 and byte count of what was read."""

    def __init__(self):
        self.h, self.size = hashlib.sha256(), 0

    def update(self, data: bytes) -> None:
        self.h.update(data)
        self.size += len(data)

    def result(self) -> Fingerprint:
        return Fingerprint(self.size, self.h.hexdigest())


def open_regular(path: Path, max_bytes: int | None = None) -> int:
    """A read descriptor on `path`, which must be a regular file of at most `max_bytes`.
    O_NOFOLLOW: a symlink put in its place is refused, never followed out of the base dir;
    O_NONBLOCK: a FIFO put in its place cannot block the daemon in open()."""
    from kdforge.daemon.infra import MACHINE_ERRNOS

    name = shown(path.name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno in MACHINE_ERRNOS:  # no descriptors, a failing disk: the machine's, not the file's
            raise
        raise DataError(f"cannot open it ({os.strerror(e.errno)}); drop a regular *.jsonl file", name) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (max_bytes is not None and st.st_size > max_bytes):
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"a {entry_kind(st)}, not a regular file; drop a regular *.jsonl file", name)
        raise DataError(f"{st.st_size:,} bytes, over daemon.max_batch_bytes ({max_bytes:,}); split it into "
                        "smaller files (or raise daemon.max_batch_bytes)", name)
    return fd


def read_lines(path: Path, max_bytes: int, digest: Digest) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped text) for each non-blank line, read once through a checked
    descriptor and fed to `digest` as it goes (never the whole file in memory at once)."""
    fd = open_regular(path, max_bytes)
    with os.fdopen(fd, "rb") as f:
        for i, raw in enumerate(f, 1):
            digest.update(raw)
            if digest.size > max_bytes:  # grew past the cap after the check
                raise DataError(f"grew past daemon.max_batch_bytes ({max_bytes:,}) while read; split it", shown(path.name))
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"line {i} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8",
                                shown(path.name)) from None
            if text:
                yield i, text


def fingerprint(path: Path) -> Fingerprint:
    """Size and sha256 of a claimed file, read the same safe way it was trained."""
    d = Digest()
    with os.fdopen(open_regular(path), "rb") as f:
        for chunk in iter(lambda: f.read(READ_CHUNK), b""):
            d.update(chunk)
    return d.result()


def read_batch(path: Path, name: str, max_bytes: int,
               prompt_only: bool = False) -> tuple[list, list[DataError], Fingerprint]:
    """The records of a claimed batch file (named `name` in messages), its bad lines, and the
    fingerprint of exactly the bytes read. `prompt_only`: prompt-only lines are records too
    (`records.parse_record`)."""
    from kdforge.data.records import parse_lines

    d = Digest()
    records, problems = parse_lines(read_lines(path, max_bytes, d), name, strict=False, prompt_only=prompt_only)
    for rec in records:
        rec.metadata = {**rec.metadata, "_path": name}
    return records, problems, d.result()


def batch_fingerprint(path: Path, max_bytes: int) -> Fingerprint:
    """The fingerprint `read_batch` would give (the same descriptor checks, size cap and UTF-8
    errors), without parsing a line: whether a batch's kept store holds these very bytes."""
    d = Digest()
    for _ in read_lines(path, max_bytes, d):
        pass
    return d.result()


def free_name(folder: Path, name: str) -> Path:
    """folder/name, or folder/stem.2.suffix, ... if taken: never overwrite a kept file."""
    dest = folder / name
    n = 1
    while os.path.lexists(dest) or os.path.lexists(dest.with_name(dest.name + ".reason")):
        n += 1
        stem, dot, suf = name.rpartition(".")
        dest = folder / (f"{stem}.{n}.{suf}" if dot else f"{name}.{n}")
    return dest


def move_to(path: Path, folder: Path, name: str | None = None) -> Path:
    """Move `path` into `folder` (as `name`, default its own) under a free name; whole or not at
    all, even across filesystems."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = free_name(folder, name or path.name)
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


def reject(path: Path, rejected: Path, reason: str, name: str | None = None) -> Path:
    """Move an unusable entry (of any kind: the rename never follows a link or opens a FIFO) to
    `rejected/NAME` with `NAME.reason` beside it (written first)."""
    rejected.mkdir(parents=True, exist_ok=True)
    dest = free_name(rejected, name or path.name)
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
