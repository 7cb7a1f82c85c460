"""What the daemon waited for, and the end of the wait: once a full disk has room again and the
batch (or the day's snapshot) it waited for is saved, `last_error` no longer says `waiting: ...`;
the wait moves to `last_wait` with the time it ended. The disk fills for real, as in
test_daemon_disk_full.py: the daemon is a `kdforge daemon` process under RLIMIT_FSIZE, lifted
with prlimit while it waits; nothing of kdforge is mocked."""

from __future__ import annotations

import re
import resource
from datetime import datetime

from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import (FakeClock, batch, daemon_config, daemon_log, drop, output, run_in_process, status,
                            wait_until)
from kdforge.train import checkpoint as ckpt
from test_daemon_disk_full import CHECKPOINT_WONT_FIT, RECORDS, STEPS, kdforge


def lift_file_limit(pid: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def test_a_batch_saved_after_a_full_disk_clears_the_waiting_error(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    drop(base, "ßeptember_九月.jsonl", batch(RECORDS, seed=3))
    with open(tmp_path / "training.daemon.out", "w") as out:
        p = kdforge(["daemon", "--base-dir", base, "--config", cfg], out, CHECKPOINT_WONT_FIT)
        try:
            wait_until(lambda: status(base).get("status") == "waiting", p, base, "status waiting")
            waited = status(base)["last_error"]
            assert waited.startswith("waiting: ") and "ßeptember_九月.jsonl" in waited, waited

            lift_file_limit(p.pid)
            wait_until(lambda: status(base).get("status") == "idle" and status(base).get("batch_number") == 1,
                       p, base, "the batch trained")
            s = status(base)
            assert s["last_error"] is None, s  # was still "waiting: ..." after the batch was saved
            assert s["last_wait"].startswith("waited until ") and waited[len("waiting: "):] in s["last_wait"], s
            assert s["current_step"] == STEPS and s["last_checkpoint"] == f"checkpoint-{STEPS}", s
            (base / ".stop").touch()
            assert p.wait(timeout=120) == 0, output(base)
        finally:
            if p.poll() is None:
                p.kill()
    assert status(base)["last_error"] is None and status(base)["status"] == "stopped"
    assert "wait over" in daemon_log(base), daemon_log(base)


def test_status_shows_the_last_wait_beside_the_last_error():
    import os

    from kdforge.daemon.status import render

    shown = render({"status": "idle", "pid": os.getpid(), "last_error": None,
                    "last_wait": "waited until 2026-12-06T01:30:00: No space left on device: /données/snapshots"})
    assert "last wait:        waited until 2026-12-06T01:30:00: No space left on device: /données/snapshots" in shown
    assert "last error" not in shown


def snapshot_folders(base) -> list[str]:
    """Every entry of snapshots/: complete days and temp copies alike."""
    folder = base / "snapshots"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_snapshot_on_a_full_disk_waits_keeps_nothing_partial_and_is_taken_later(tmp_path, tiny_model_dir):
    """The checkpoint is on disk (trained in this process, before the snapshot time); the daemon that
    starts past the snapshot time cannot copy its optimizer.pt: it waits instead of stopping."""
    base = tmp_path / "training"
    drop(base, "før_snapshot.jsonl", batch(RECORDS, seed=4))
    run_in_process(base, daemon_config(tmp_path / "early.yaml", tiny_model_dir, settle_seconds=0,
                                       snapshot_time="03:00"), FakeClock(datetime(2025, 1, 1, 2, 0)))
    assert ckpt.latest_checkpoint(base / "current_model").name == f"checkpoint-{STEPS}" and not snapshot_folders(base)

    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, snapshot_time="00:00")
    with open(tmp_path / "training.daemon.out", "w") as out:
        p = kdforge(["daemon", "--base-dir", base, "--config", cfg], out, CHECKPOINT_WONT_FIT)
        try:
            wait_until(lambda: status(base).get("status") == "waiting", p, base, "status waiting")
            s = status(base)
            assert s["last_error"].startswith("waiting: snapshot ") and "File too large" in s["last_error"], s
            assert str(base / "snapshots") in s["last_error"] and s["last_snapshot"] is None, s
            assert snapshot_folders(base) == [], snapshot_folders(base)  # no partial copy, no day folder
            wait_until(lambda: daemon_log(base).count("retrying in") >= 2, p, base, "a second try")
            assert p.poll() is None and snapshot_folders(base) == [], (snapshot_folders(base), output(base))

            lift_file_limit(p.pid)
            wait_until(lambda: status(base).get("last_snapshot") is not None and status(base)["status"] == "idle",
                       p, base, "the snapshot taken")
            s = status(base)
            assert s["last_error"] is None and "File too large" in s["last_wait"], s
            (day,) = snapshot_folders(base)
            assert re.fullmatch(r"\d{8}", day) and s["last_snapshot"] == day
            snap = base / "snapshots" / day
            assert ckpt.is_complete(snap) and ckpt.read_state(snap).global_step == STEPS
            (base / ".stop").touch()
            assert p.wait(timeout=120) == 0, output(base)
        finally:
            if p.poll() is None:
                p.kill()
    assert "daemon failed" not in daemon_log(base) and "Traceback" not in output(base), output(base)


def test_a_snapshot_refused_at_a_batch_save_keeps_the_batch(tmp_path, tiny_model_dir):
    """The day's snapshot is taken right after a batch's checkpoint: when the disk refuses it there,
    the batch (saved) is neither failed nor rejected; the snapshot waits and is taken on a later try.
    This process's own file size limit is lowered between the two, from the daemon's log echo."""
    from kdforge.config import load_config
    from kdforge.daemon.service import Daemon

    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, snapshot_time="03:00")
    base = tmp_path / "training"
    drop(base, "snapshot_à_midi.jsonl", batch(RECORDS, seed=5))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    seen = []

    def disk(line: str) -> None:
        seen.append(line)
        if f"Saved checkpoint: checkpoint-{STEPS}" in line:
            resource.setrlimit(resource.RLIMIT_FSIZE, (CHECKPOINT_WONT_FIT, hard))  # full from here
        elif "retrying in" in line:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
            seen.append(("waiting", dict(status(base))))
        elif "wait over" in line or "rejected" in line or "failed" in line:  # done, or failed: stop either way
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            (base / ".stop").touch()

    try:
        d = Daemon(base, load_config([cfg]), now=FakeClock(datetime(2025, 6, 1, 12, 0)), echo=disk,
                   handle_signals=False)
        assert d.run() == 0
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    (waiting,) = [x[1] for x in seen if isinstance(x, tuple)]
    assert waiting["last_error"].startswith("waiting: snapshot 20250601 of checkpoint-5"), waiting
    assert "File too large" in waiting["last_error"], waiting
    assert not list((base / "rejected").glob("*")) and not list((base / "inbox").rglob("*.jsonl"))
    assert snapshot_folders(base) == ["20250601"] and ckpt.read_state(base / "snapshots" / "20250601").global_step == STEPS
    s = status(base)
    assert (s["status"], s["last_error"], s["last_snapshot"], s["batch_number"]) == ("stopped", None, "20250601", 1), s
    assert "File too large" in s["last_wait"] and "failed" not in daemon_log(base), daemon_log(base)
