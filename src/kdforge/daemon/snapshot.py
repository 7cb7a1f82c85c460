"""Daily snapshots: at the configured time of day, copy the newest checkpoint to
`snapshots/YYYYMMDD/` (weights and state, whole or not at all) and keep the newest N.

A snapshot is due once the daemon's clock has passed today's snapshot time and today has none,
so a daemon that was down (or busy training) at 03:00 takes the day's snapshot as soon as it
can, like anacron, instead of skipping the day. A copy the disk refuses (full, failing) raises
the OSError with its errno and the file it was writing, and leaves nothing behind: the daemon
waits and tries again (service.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from kdforge.atomic import fsync_dir
from kdforge.train.checkpoint import fsync_tree, read_state

DAY_RE = re.compile(r"^\d{8}$")


def time_reached(now: datetime, hhmm: str) -> bool:
    """Has today's clock passed HH:MM?"""
    hh, mm = (int(x) for x in hhmm.split(":"))
    return (now.hour, now.minute) >= (hh, mm)


def snapshot_due(now: datetime, snapshot_time: str, snapshots: Path) -> str | None:
    """The day (YYYYMMDD) whose snapshot is due now, or None."""
    if not time_reached(now, snapshot_time):
        return None
    day = f"{now:%Y%m%d}"
    return None if (snapshots / day).exists() else day


def list_snapshots(snapshots: Path) -> list[Path]:
    """Complete snapshots, oldest first."""
    if not snapshots.is_dir():
        return []
    return sorted(p for p in snapshots.iterdir() if p.is_dir() and DAY_RE.match(p.name))


def _copy_tree(src: Path, dst: Path) -> None:
    """`src` copied into the new folder `dst`, stopping at the first failure with an OSError that keeps
    its errno and names the file written (shutil.copytree folds every failure into one shutil.Error
    text, which no caller can tell a full disk by; sendfile's error names the source)."""
    dst.mkdir()
    for item in sorted(src.iterdir()):
        target = dst / item.name
        if item.is_dir():
            _copy_tree(item, target)
            continue
        try:
            shutil.copy2(item, target)
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(target)) from e


def take_snapshot(checkpoint: Path, snapshots: Path, day: str, keep: int, now: datetime) -> Path:
    """Copy `checkpoint` to snapshots/day (temp folder, then rename); keep the newest `keep`."""
    snapshots.mkdir(parents=True, exist_ok=True)
    for stale in snapshots.glob(".tmp-*"):  # a copy cut short by a crash
        shutil.rmtree(stale, ignore_errors=True)
    final = snapshots / day
    tmp = snapshots / f".tmp-{day}-{os.getpid()}"
    moved = False
    try:
        _copy_tree(checkpoint, tmp)
        info = {"checkpoint": checkpoint.name, "global_step": read_state(checkpoint).global_step,
                "taken_at": now.isoformat(timespec="seconds")}
        (tmp / "snapshot.json").write_text(json.dumps(info, indent=2) + "\n")
        fsync_tree(tmp)
        os.replace(tmp, final)
        moved = True
        fsync_dir(snapshots)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved:  # renamed, but the rename is not known to be on disk: not a snapshot to rely on
            shutil.rmtree(final, ignore_errors=True)
        raise
    for old in list_snapshots(snapshots)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final
