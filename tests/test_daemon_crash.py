"""SIGKILL mid-batch: the restarted daemon finishes exactly the rest of the batch. Compared with an
uninterrupted run of the same batch: same final global_step, every example trained once (same
samples_seen, same per-step losses, same weights), and the file leaves the inbox once."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import (batch, batch_state, claimed_files, daemon_config, daemon_log, drop, losses, newest_state,
                            run_in_process, start_daemon, status, stop, wait_idle_at, wait_until)
from kdforge.train import checkpoint as ckpt
from train_helpers import kill9

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
    proc = start_daemon(base, cfg, "first.out")
    drop(base, "stream.jsonl", rows)
    try:
        wait_until(lambda: status(base).get("current_step", 0) >= 10, proc, base, "step 10")
    finally:
        kill9(proc)
    killed_at = ckpt.read_state(ckpt.latest_checkpoint(base / "current_model")).global_step
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
    final = ckpt.latest_checkpoint(base / "current_model") / "adapter_model.safetensors"
    ref_final = ckpt.latest_checkpoint(ref_base / "current_model") / "adapter_model.safetensors"
    a, b = load_file(str(final)), load_file(str(ref_final))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # the file left once: not in the inbox, not claimed, not rejected
    assert [p.name for d in ("inbox", "inbox/.claimed", "rejected") for p in (base / d).glob("*")] == [".claimed"]
