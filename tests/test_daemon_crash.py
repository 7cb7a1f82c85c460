"""SIGKILL mid-batch: the restarted daemon finishes exactly the rest of the batch. Compared with an
uninterrupted run of the same batch: same final global_step, every example trained once (same
samples_seen, same per-step losses, same weights), and the file leaves the inbox once."""

from __future__ import annotations

import pytest

from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import (assert_same_adapter, batch, batch_state, claimed_files, daemon_config, daemon_log, drop,
                            kill_mid_batch, losses, newest_state, on_policy_config, prompt_rows, run_in_process,
                            start_daemon, stop, teacher_model, wait_idle_at)

N_RECORDS, N_STEPS = 160, 40  # micro-batch 4, grad_accum 1


def test_sigkill_mid_batch_then_restart_finishes_the_batch_exactly(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "daemon.yaml", tiny_model_dir, save_steps=4)
    rows = batch(N_RECORDS, seed=7)

    # ---- the uninterrupted reference
    ref_base = tmp_path / "reference"
    drop(ref_base, "stream.jsonl", rows)
    ref = run_in_process(ref_base, cfg)
    assert ref.global_step == N_STEPS

    # ---- the same batch, killed mid-way
    base = tmp_path / "training"
    killed_at = kill_mid_batch(base, cfg, "stream.jsonl", rows, at_step=10)
    assert 8 <= killed_at < N_STEPS, killed_at  # a checkpoint of this batch, and the batch unfinished
    assert len(claimed_files(base, "stream.jsonl")) == 1 and not (base / "inbox" / "stream.jsonl").exists()

    # ---- restart: the batch resumes at its data position
    proc = start_daemon(base, cfg, "second.out")
    try:
        wait_idle_at(base, N_STEPS, proc, "stream.jsonl")
        assert stop(proc, base) == 0
    finally:
        if proc.poll() is None:
            proc.kill()

    log = daemon_log(base)
    assert f"Resuming from checkpoint: checkpoint-{killed_at}" in log
    assert f"continuing at step {killed_at}" in log
    assert log.count("Batch 1 done: stream.jsonl") == 1
    state = newest_state(base)
    assert state["global_step"] == ref.global_step == N_STEPS
    assert state["samples_seen"] == ref.samples_seen == N_RECORDS  # nothing twice, nothing skipped
    assert batch_state(state)["batch_number"] == 1 and len(batch_state(state)["batches"]) == 1
    got, want = losses(state), losses({"log_history": ref.log_history})
    assert sorted(got) == list(range(1, N_STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-4), step
    assert_same_adapter(base, ref_base)
    # the file left once: not in the inbox, not claimed, not rejected
    assert [p.name for d in ("inbox", "inbox/.claimed", "rejected") for p in (base / d).glob("*")] == [".claimed"]


def test_sigkill_mid_batch_of_prompts_only_resumes_to_the_same_weights(tmp_path, tiny_model_dir, tokenizer_dir):
    """A batch of prompts only (on-policy at every step, dense teacher), SIGKILLed mid-way: the
    restart finishes it with the same samples, the same on-policy losses and the same weights as
    an uninterrupted run (sampling seeds come from the global step, the data position is saved)."""
    teacher = teacher_model(tmp_path / "teacher", tokenizer_dir)
    cfg = on_policy_config(tmp_path / "daemon.yaml", tiny_model_dir, teacher, fraction=0.5, save_steps=3)
    rows, n_steps = prompt_rows(40, seed=5), 10
    ref_base = tmp_path / "reference"
    drop(ref_base, "asked.jsonl", rows)
    ref = run_in_process(ref_base, cfg)
    assert (ref.global_step, ref.samples_seen) == (n_steps, 40)

    base = tmp_path / "training"
    killed_at = kill_mid_batch(base, cfg, "asked.jsonl", rows, at_step=4)
    assert 3 <= killed_at < n_steps and claimed_files(base, "asked.jsonl"), killed_at
    state = run_in_process(base, cfg)  # the restart (in this process: the reference's numbers)
    assert f"Resuming from checkpoint: checkpoint-{killed_at}" in daemon_log(base)
    assert (state.global_step, state.samples_seen) == (n_steps, 40)
    got, want = losses(newest_state(base)), losses({"log_history": ref.log_history})
    assert sorted(got) == list(range(1, n_steps + 1)) and all(v > 0 for v in got.values())
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step
    assert_same_adapter(base, ref_base)
    assert not claimed_files(base, "asked.jsonl") and not list((base / "rejected").iterdir())
