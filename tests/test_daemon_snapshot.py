"""Snapshots and consolidation, driven by a fake clock or a config that triggers them at once. The
daemon runs in this process (`run(once=True)`) on the real tiny model: every pass is a fresh Daemon
that loads its state from disk, as a restarted process would."""

from __future__ import annotations

import json
from datetime import datetime

import torch

from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import (FakeClock, batch, batch_state, daemon_config, daemon_log, drop, losses, newest_state,
                            run_in_process)
from kdforge.daemon import consolidate
from kdforge.daemon.verify import verify
from kdforge.train import checkpoint as ckpt


def test_snapshot_at_the_configured_time_and_a_log_file_a_day(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, snapshot_time="03:00", snapshot_keep=1,
                        settle_seconds=0)
    base, clock = tmp_path / "training", FakeClock(datetime(2025, 1, 1, 2, 59))
    drop(base, "b1.jsonl", batch(seed=1))
    run_in_process(base, cfg, clock)
    assert not list((base / "snapshots").iterdir())  # 02:59: not yet
    assert (base / "logs" / "daemon_20250101.log").is_file()

    clock.when = datetime(2025, 1, 1, 3, 0)
    run_in_process(base, cfg, clock)  # idle daemon at 03:00
    snap = base / "snapshots" / "20250101"
    assert ckpt.is_complete(snap) and ckpt.read_state(snap).global_step == 12
    assert json.loads((snap / "snapshot.json").read_text())["checkpoint"] == "checkpoint-12"

    clock.when = datetime(2025, 1, 2, 3, 30)
    drop(base, "b2.jsonl", batch(seed=2))
    run_in_process(base, cfg, clock)
    assert [p.name for p in (base / "snapshots").iterdir()] == ["20250102"]  # snapshot_keep 1
    day2 = (base / "logs" / "daemon_20250102.log").read_text()
    assert "Batch 2 start: b2.jsonl" in day2 and "snapshot 20250102" in day2
    assert "b2.jsonl" not in (base / "logs" / "daemon_20250101.log").read_text()


def test_consolidation_keeps_outputs_and_the_loss_curve(tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, save_steps=100, snapshot_time="00:00",
                        consolidate_every_batches=1, settle_seconds=0)
    base, clock = tmp_path / "training", FakeClock(datetime(2025, 3, 1, 12, 0))
    drop(base, "b1.jsonl", batch(seed=1))
    drop(base, "b2.jsonl", batch(seed=2))
    run_in_process(base, cfg, clock)

    # The day's snapshot was taken at batch 1's end, before its adapter was merged.
    snap = base / "snapshots" / "20250301"
    pre = ckpt.read_state(snap)
    assert pre.global_step == 12 and pre.extra["daemon"]["generation"] == 0
    gen1, gen2 = base / "bases" / "gen-0001", base / "bases" / "gen-0002"
    assert (gen1 / "config.json").is_file() and (gen2 / "config.json").is_file()

    # merged weights == base + adapter: the new base alone gives the logits base + adapter gave
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(snap))
        merged = AutoModelForCausalLM.from_pretrained(gen1)
        want, got = before(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (want - got).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert (want - AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits).abs().max() > 1e-2

    state = newest_state(base)
    assert state["global_step"] == 24 and batch_state(state)["generation"] == 2
    assert batch_state(state)["base_model"] == str(gen2.resolve())
    loss = losses(state)
    assert sorted(loss) == list(range(1, 25))
    assert loss[13] < loss[1] - 0.5 * (loss[1] - loss[12])  # no jump after the merge at step 12
    newest = ckpt.latest_checkpoint(base / "current_model")
    assert torch.load(newest / "scheduler.pt", weights_only=False)["last_epoch"] == 24  # schedule unbroken
    assert "Consolidated (every 1 batch(es)): adapter merged into" in daemon_log(base)

    # A restart loads the consolidated base named by the newest checkpoint and goes on.
    drop(base, "b3.jsonl", batch(seed=3))
    cfg3 = daemon_config(tmp_path / "d3.yaml", tiny_model_dir, save_steps=100, snapshot_time="00:00",
                         settle_seconds=0)
    run_in_process(base, cfg3, clock)
    state = newest_state(base)
    assert state["global_step"] == 36 and batch_state(state)["base_model"] == str(gen2.resolve())
    loss = losses(state)
    assert loss[25] < loss[1] - 0.5 * (loss[1] - loss[24])
    result = verify(base)
    assert result.ok, result.report
    assert "consolidation 2 at step 24" in result.report


def test_a_consolidation_that_does_not_verify_keeps_the_previous_base(tmp_path, tiny_model_dir, monkeypatch):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, save_steps=100, consolidate_every_batches=1,
                        settle_seconds=0)
    base = tmp_path / "training"
    monkeypatch.setattr(consolidate, "REL_TOL", -1.0)  # no merged model can pass: the check must refuse it
    drop(base, "b1.jsonl", batch(seed=1))
    drop(base, "b2.jsonl", batch(seed=2))
    run_in_process(base, cfg)
    state = newest_state(base)
    assert state["global_step"] == 24 and batch_state(state)["generation"] == 0
    assert batch_state(state)["base_model"] == str(tiny_model_dir.resolve())
    assert not list((base / "bases").glob("gen-*"))
    assert "consolidation failed" in daemon_log(base)
    loss = losses(state)
    assert loss[13] < loss[1] - 0.5 * (loss[1] - loss[12])  # back on the old base + adapter, no jump
