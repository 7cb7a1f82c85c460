"""`kdforge daemon` end to end, real processes on a tiny model: the seed guide's Option A (three
batches, one after another) and Option B (an existing model gets a new batch), bad and half-written
files, a second daemon, SIGTERM and `.stop`, `kdforge status` and `kdforge verify`."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
import torch

from conftest import cli_here
from daemon_helpers import (RECORDS_PER_BATCH, STEPS_PER_BATCH, batch, batch_state, claimed_files, daemon_config,
                            daemon_log, drop, losses, newest_state, start_daemon, status, stop, wait_idle_at, wait_until)
from kdforge.daemon.verify import jump_checks
from kdforge.train import checkpoint as ckpt

SEED_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")


def observe(base) -> dict:
    folders = ckpt.list_checkpoints(base / "current_model")
    return {"checkpoints": [p.name for p in folders],
            "steps": [ckpt.read_state(p).global_step for p in folders],
            "seed_files": all((p / f).is_file() for p in folders for f in SEED_FILES),
            "state": newest_state(base), "log": daemon_log(base),
            "inbox": sorted(p.name for p in (base / "inbox").iterdir())}


@pytest.fixture(scope="module")
def option_a(tmp_path_factory, tiny_model_dir):
    """One daemon: batch 1; a garbage file and batch 2 (with two bad lines); batch 3 written slowly
    in place; a second daemon tried meanwhile; then SIGTERM. What it saw after each batch."""
    tmp = tmp_path_factory.mktemp("option_a")
    base = tmp / "training"
    cfg = daemon_config(tmp / "daemon.yaml", tiny_model_dir)
    obs: dict = {"base": base, "config": cfg, "after": {}}
    base.mkdir()
    (base / ".stop").touch()  # left from an earlier stop: removed on start, not obeyed
    proc = start_daemon(base, cfg)
    try:
        wait_until(lambda: status(base).get("status") == "idle", proc, base, "the model to load")
        obs["second"] = cli_here("daemon", "--base-dir", base, "--config", cfg)  # refused: the lock is the other's
        drop(base, "notes.jsonl.part", batch(8, seed=99))  # a temp name: never a batch

        drop(base, "test_batch_1.jsonl", batch(seed=1))
        wait_idle_at(base, STEPS_PER_BATCH, proc, "test_batch_1.jsonl")
        obs["after"][1] = observe(base)

        drop(base, "garbage.jsonl", lines=["not json at all", '{"foo": 1}', '{"prompt": "no answer"}'])
        rows = [json.dumps(r) for r in batch(seed=2)]
        rows.insert(5, "{broken json")  # line 6
        rows.insert(20, '{"instruction": "an instruction without output"}')  # line 21
        obs["batch2_lines"] = rows
        drop(base, "test_batch_2.jsonl", lines=rows)
        wait_idle_at(base, 2 * STEPS_PER_BATCH, proc, "test_batch_2.jsonl")
        obs["after"][2] = observe(base)

        # Batch 3 is written in place, a few lines every 0.15 s: never still for settle_seconds (0.5).
        path, early = base / "inbox" / "test_batch_3.jsonl", []
        with open(path, "w") as f:
            for i, r in enumerate(batch(seed=3)):
                f.write(json.dumps(r) + "\n")
                if i % 6 == 5:
                    f.flush()
                    time.sleep(0.15)
                    if not path.exists() or status(base).get("current_file") == path.name:
                        early.append(i)
        obs["taken_early"] = early
        wait_idle_at(base, 3 * STEPS_PER_BATCH, proc, "test_batch_3.jsonl")
        obs["after"][3] = observe(base)

        proc.send_signal(signal.SIGTERM)
        obs["rc"] = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    obs["status"] = status(base)
    obs["log"] = daemon_log(base)
    obs["part_left"] = (base / "inbox" / "notes.jsonl.part").is_file()
    obs["verify_with_part"] = cli_here("verify", "--base-dir", base)
    (base / "inbox" / "notes.jsonl.part").unlink()  # the user finishes with it: now the inbox is empty
    obs["verify"] = cli_here("verify", "--base-dir", base)
    obs["status_text"] = cli_here("status", "--base-dir", base)
    obs["status_json"] = cli_here("status", "--base-dir", base, "--json")
    return obs


def test_option_a_global_step_is_cumulative(option_a):
    for k in (1, 2, 3):
        seen = option_a["after"][k]
        assert seen["state"]["global_step"] == k * STEPS_PER_BATCH  # 12 -> 24 -> 36, never reset
        assert seen["steps"][-1] == k * STEPS_PER_BATCH
        assert 1 <= len(seen["checkpoints"]) <= 3, seen["checkpoints"]
        assert seen["steps"] == sorted(set(seen["steps"]))
        assert seen["seed_files"], f"a checkpoint lacks one of {SEED_FILES}: {seen['checkpoints']}"
        assert f"test_batch_{k}.jsonl" not in seen["inbox"]
    assert option_a["after"][3]["checkpoints"] == ["checkpoint-30", "checkpoint-35", "checkpoint-36"]


def test_option_a_resumes_from_the_newest_checkpoint(option_a):
    log = option_a["after"][3]["log"]
    assert "Resuming from checkpoint: checkpoint-12" in log
    assert "Resuming from checkpoint: checkpoint-24" in log
    assert log.index("Resuming from checkpoint: checkpoint-12") < log.index("Batch 2 start: test_batch_2.jsonl")


def test_option_a_trains_every_new_example_and_the_loss_carries_over(option_a):
    state = option_a["after"][3]["state"]
    # The Trainer pitfall would fast-forward 12 steps into each new file; ours trains all of it.
    assert state["samples_seen"] == 3 * RECORDS_PER_BATCH
    assert [b["start_step"] for b in batch_state(state)["batches"]] == [0, 12, 24]
    loss = losses(state)
    assert sorted(loss) == list(range(1, 37))
    initial = loss[1]
    for first_of_batch in (13, 25):
        assert loss[first_of_batch] < 0.8 * initial, (first_of_batch, loss[first_of_batch], initial)
        assert loss[first_of_batch] < initial - 0.5 * (initial - loss[first_of_batch - 1])
    # Adam's step count and the scheduler's position span all three batches: state was loaded, not reset.
    newest = ckpt.latest_checkpoint(option_a["base"] / "current_model")
    opt = torch.load(newest / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {36}
    assert torch.load(newest / "scheduler.pt", weights_only=False)["last_epoch"] == 36


def test_unusable_file_is_rejected_and_bad_lines_are_reported(option_a):
    base = option_a["base"]
    kept = base / "rejected" / "garbage.jsonl"
    assert kept.read_text().splitlines()[0] == "not json at all"  # moved whole, not deleted
    reason = (base / "rejected" / "garbage.jsonl.reason").read_text()
    assert "no usable line" in reason and "garbage.jsonl:1" in reason and "garbage.jsonl:3" in reason
    log = option_a["log"]
    assert "test_batch_2.jsonl:6: invalid JSON" in log and "test_batch_2.jsonl:21:" in log
    # the good 48 lines of batch 2 trained; the daemon went on after the rejection
    assert option_a["after"][2]["state"]["samples_seen"] == 2 * RECORDS_PER_BATCH


def test_a_file_still_being_written_is_not_taken(option_a):
    assert option_a["taken_early"] == []
    assert option_a["after"][3]["state"]["samples_seen"] == 3 * RECORDS_PER_BATCH  # all of it, once
    assert option_a["part_left"]  # a temp name waits for its rename, named in the log once
    assert option_a["log"].count("notes.jsonl.part in inbox/ is no batch (a temp-file name)") == 1
    p = option_a["verify_with_part"]  # and verify does not call an inbox empty that holds it
    assert p.returncode == 1 and "[FAIL] inbox empty" in p.stdout and "notes.jsonl.part (temp-file name)" in p.stdout


def test_a_second_daemon_on_the_same_base_dir_is_refused(option_a):
    p = option_a["second"]
    assert p.returncode == 2, p.stderr
    assert "another kdforge daemon" in p.stderr and "already running" in p.stderr


def test_sigterm_exits_zero_with_status_stopped(option_a):
    assert option_a["rc"] == 0
    assert option_a["status"]["status"] == "stopped"
    assert "stop requested (signal SIGTERM)" in option_a["log"]
    assert ".stop file" not in option_a["log"] and not (option_a["base"] / ".stop").exists()


def test_verify_passes_and_writes_its_report_and_plot(option_a):
    base, p = option_a["base"], option_a["verify"]
    assert p.returncode == 0, p.stdout + p.stderr
    report = (base / "verification_report.txt").read_text()
    assert "checkpoint-36: global_step=36" in report and "RESULT: all checks passed" in report
    assert (base / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_command(option_a):
    text, js = option_a["status_text"], option_a["status_json"]
    assert text.returncode == 0 and "stopped" in text.stdout and "global step:      36" in text.stdout
    data = json.loads(js.stdout)
    for field in ("status", "current_step", "total_steps", "batch_number", "batch_queue_size", "current_file",
                  "loss", "last_checkpoint", "updated_at", "learning_rate", "tokens_per_s", "pid"):
        assert field in data, field
    assert (data["status"], data["current_step"], data["batch_number"]) == ("stopped", 36, 3)
    assert data["last_checkpoint"] == "checkpoint-36" and data["daemon_running"] is False


def test_verify_fails_and_names_the_failing_checks(option_a, tmp_path):
    base = tmp_path / "broken"
    shutil.copytree(option_a["base"], base)
    (base / "current_model" / "checkpoint-35" / "optimizer.pt").unlink()
    drop(base, "late.jsonl", batch(4))
    with open(next((base / "logs").glob("daemon_*.log")), "a") as f:
        f.write("2026-01-01 00:00:00 ERROR   daemon failed: something broke\n")
    p = cli_here("verify", "--base-dir", base)
    assert p.returncode == 1
    assert "[FAIL] each checkpoint has weights" in p.stdout and "checkpoint-35 lacks optimizer.pt" in p.stdout
    assert "[FAIL] no ERROR lines" in p.stdout and "[FAIL] inbox empty" in p.stdout
    assert "3 check(s) failed" in p.stdout


def test_loss_jump_check_flags_a_reset():
    history = [{"step": s, "loss": v} for s, v in enumerate([6.0, 5.0, 4.0, 3.0, 5.9, 4.0], 1)]
    (ok, detail), = jump_checks(history, [(4, "batch 2")])
    assert not ok and "batch 2 at step 4" in detail
    (ok, _), = jump_checks(history[:4] + [{"step": 5, "loss": 3.1}], [(4, "batch 2")])
    assert ok


# ---------------------------------------------------------------------------- Option B, .stop

@pytest.fixture(scope="module")
def option_b(option_a, tmp_path_factory):
    """A fresh daemon on Option A's trained dir (step 36): one new batch, then a long one cut by .stop."""
    base = tmp_path_factory.mktemp("option_b") / "training"
    shutil.copytree(option_a["base"], base)
    start_step = newest_state(base)["global_step"]
    obs: dict = {"base": base, "start": start_step}
    proc = start_daemon(base, option_a["config"])
    try:
        drop(base, "verification_test.jsonl", batch(seed=4))
        wait_idle_at(base, start_step + STEPS_PER_BATCH, proc, "verification_test.jsonl")
        obs["state"] = newest_state(base)
        drop(base, "long.jsonl", batch(400, seed=5))  # 100 steps
        mid = start_step + STEPS_PER_BATCH + 3
        wait_until(lambda: status(base).get("current_step", 0) >= mid, proc, base, f"step {mid}")
        obs["rc"] = stop(proc, base)
    finally:
        if proc.poll() is None:
            proc.kill()
    obs["status"] = status(base)
    obs["log"] = daemon_log(base)
    obs["stopped_state"] = newest_state(base)
    return obs


def test_option_b_existing_model_continues(option_b):
    n = option_b["start"]
    assert n == 3 * STEPS_PER_BATCH
    assert option_b["state"]["global_step"] == n + STEPS_PER_BATCH
    assert f"Resuming from checkpoint: checkpoint-{n}" in option_b["log"]
    assert not (option_b["base"] / "inbox" / "verification_test.jsonl").exists()


def test_stop_file_saves_a_checkpoint_and_exits_zero(option_b):
    assert option_b["rc"] == 0
    st, state = option_b["status"], option_b["stopped_state"]
    assert st["status"] == "stopped"
    step = state["global_step"]
    assert 4 * STEPS_PER_BATCH < step < 4 * STEPS_PER_BATCH + 100  # mid-batch
    assert st["current_step"] == step and st["last_checkpoint"] == f"checkpoint-{step}"
    assert batch_state(state)["batch_file"] == "long.jsonl" and batch_state(state)["batch_done"] is False
    assert "stop requested (.stop file)" in option_b["log"]
    # the unfinished batch stays claimed in inbox/.claimed/ for the next start
    assert [p.is_file() for p in claimed_files(option_b["base"], "long.jsonl")] == [True]
