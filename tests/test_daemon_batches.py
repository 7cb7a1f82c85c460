"""Batches in the daemon, in this process on the real tiny model: every record format, claiming,
and the two crash windows around a batch (before its first checkpoint, after its last)."""

from __future__ import annotations

import json
import shutil
from datetime import datetime

import pytest
import yaml

from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import (batch, batch_state, daemon_config, daemon_log, drop, losses, newest_state, on_policy_config,
                            prompt_rows, run_in_process, teacher_model)
from kdforge.daemon import verify as verify_mod
from kdforge.daemon.batch_state import BatchState
from kdforge.daemon.dailylog import DailyLog
from kdforge.daemon.inbox import claim, claim_parts, is_batch_name, next_ready
from kdforge.train import checkpoint as ckpt

FORMATS = [
    {"prompt": "What is 2 plus 2?", "teacher_text": "2 plus 2 is 4.",
     "messages": [{"role": "user", "content": "What is 2 plus 2?"}]},
    {"prompt": "Sort these words: golf alpha", "completion": "alpha golf"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 plus 3?"},
                  {"role": "assistant", "content": "1 plus 3 is 4."}]},
    {"instruction": "Sort these words", "input": "echo bravo", "output": "bravo echo"},
    {"text": "alpha bravo charlie delta echo"},
]


def test_every_record_format_trains_and_the_file_can_be_archived(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, delete_processed=False)
    base = tmp_path / "training"
    lines = [json.dumps(r) for r in FORMATS * 4]  # 20 records: 5 steps
    drop(base, "mixed.jsonl", lines=lines)
    state = run_in_process(base, cfg)
    assert (state.global_step, state.samples_seen) == (5, 20)
    assert "WARNING" not in daemon_log(base) and not list((base / "rejected").iterdir())
    assert (base / "processed" / "mixed.jsonl").read_text().splitlines() == lines  # kept whole, out of the inbox
    assert not (base / "inbox" / "mixed.jsonl").exists()


def test_recovery_of_a_claimed_batch(tmp_path, tiny_model_dir):
    """Killed after claiming a file but before its first checkpoint: the batch restarts from its
    first example on top of the previous batch. Killed after its final save but before the file
    left: that same claim (its claim id, not its name) leaves, nothing is trained again."""
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    drop(base, "b1.jsonl", batch(seed=1))
    run_in_process(base, cfg)

    claimed = claim(drop(base, "b2.jsonl", batch(seed=2)), base / "inbox" / ".claimed")
    kept = tmp_path / "b2.copy"
    shutil.copy(claimed, kept)
    run_in_process(base, cfg)
    state = newest_state(base)
    assert (state["global_step"], state["samples_seen"], batch_state(state)["batch_number"]) == (24, 96, 2)
    log = daemon_log(base)
    assert "Resuming from checkpoint: checkpoint-12" in log and "global steps 12 -> 24" in log
    assert not claimed.exists()

    claim_id, name = claim_parts(claimed)
    assert batch_state(state)["claim_id"] == claim_id and name == "b2.jsonl"
    shutil.copy(kept, claimed)  # as if the unlink never happened
    run_in_process(base, cfg)
    assert newest_state(base)["global_step"] == 24
    assert "b2.jsonl was already trained (checkpoint-24); file deleted" in daemon_log(base)
    assert not claimed.exists()


def test_an_old_checkpoint_with_string_keys_still_loads(tmp_path, tiny_model_dir):
    """trainer_state.json written before BatchState kept the daemon's facts as flat keys in extra."""
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    drop(base, "b1.jsonl", batch(seed=1))
    run_in_process(base, cfg)
    last = ckpt.latest_checkpoint(base / "current_model")
    state = json.loads((last / "trainer_state.json").read_text())
    flat = {k: v for k, v in state["extra"].pop("daemon").items() if k not in ("claim_id", "batch_bytes")}
    state["extra"].update(flat)
    (last / "trainer_state.json").write_text(json.dumps(state))
    assert BatchState.from_extra(state["extra"]).batch_number == 1
    drop(base, "b2.jsonl", batch(seed=2))
    run_in_process(base, cfg)
    state = newest_state(base)
    assert (state["global_step"], batch_state(state)["batch_number"]) == (24, 2)
    assert "batch_number" not in state["extra"]  # the typed record replaced the flat keys
    assert [b["start_step"] for b in batch_state(state)["batches"]] == [0, 12]


def test_claiming_names_and_settling(tmp_path):
    inbox, claimed = tmp_path / "inbox", tmp_path / "inbox" / ".claimed"
    inbox.mkdir()
    assert is_batch_name("b.jsonl") and not is_batch_name("b.jsonl.part") and not is_batch_name("b.tmp.jsonl")
    assert not is_batch_name(".b.jsonl") and not is_batch_name("b.json")
    f = inbox / "b.jsonl"
    f.write_text("{}\n")
    assert next_ready(inbox, 60)[0] is None and 59 < next_ready(inbox, 60)[1] <= 60  # just written: settling
    assert next_ready(inbox, 0)[0] == f
    first, second = claim(f, claimed), claim(f, claimed)  # two daemons racing for one file
    assert first is not None and second is None
    assert claim_parts(first)[1] == "b.jsonl" and first.parent == claimed
    f.write_text("{}\n")  # dropped again under the same name: a claim of its own
    again = claim(f, claimed)
    assert claim_parts(again)[1] == "b.jsonl" and claim_parts(again)[0] != claim_parts(first)[0]


def test_errors_are_logged_with_their_traceback(tmp_path):
    log = DailyLog(tmp_path, now=lambda: datetime(2025, 5, 6, 7, 8, 9))
    try:
        raise ValueError("bad thing\n2025-05-06 07:08:09 ERROR   forged by a message")
    except ValueError as e:
        log.error("batch failed", e)
    text = (tmp_path / "daemon_20250506.log").read_text()
    assert text.startswith("2025-05-06 07:08:09 ERROR   batch failed\n  Traceback (most recent call last):")
    assert "ValueError: bad thing" in text
    assert [line for line in text.splitlines() if verify_mod.ERROR_LINE.match(line)] == [text.splitlines()[0]]


def test_verify_and_the_checkpoint_writer_agree_on_a_complete_checkpoint(tmp_path, tiny_model_dir):
    """verify keeps its own copy of the checkpoint file names (it runs without torch): check it
    against a real checkpoint, file by file: each file the writer counts as required, verify
    requires too."""
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    drop(base, "b1.jsonl", batch(seed=1))
    run_in_process(base, cfg)
    assert verify_mod.verify(base).ok
    last = ckpt.latest_checkpoint(base / "current_model")
    for f in sorted(last.iterdir()):
        if not f.is_file():
            continue
        copy = tmp_path / "probe" / "current_model" / last.name
        shutil.rmtree(tmp_path / "probe", ignore_errors=True)
        shutil.copytree(last, copy)
        (copy / f.name).unlink()
        writer_needs = not ckpt.is_complete(copy)
        checks = {c.name: c.ok for c in verify_mod.verify(tmp_path / "probe").checks}
        verify_needs = not checks["each checkpoint has weights, optimizer.pt, scheduler.pt, trainer_state.json"]
        assert writer_needs == verify_needs, f.name


def test_the_losses_helper_sees_a_step_logged_twice():
    """A dict of step -> loss would keep the last of two entries for one step: "no step trained
    twice" could never fail. The helper refuses repeated steps instead."""
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "loss": 1.4}]
    with pytest.raises(AssertionError, match=r"more than once.*\[2\]"):
        losses({"log_history": history})
    assert losses({"log_history": history[:2]}) == {1: 2.0, 2: 1.5}


def test_a_failure_after_the_file_left_never_rolls_the_saved_batch_back(tmp_path, tiny_model_dir, monkeypatch):
    """Once a batch is saved and its file has left the inbox, an error in what follows (here the
    consolidation) must not roll that batch back nor try to reject a file that is gone."""
    from kdforge.daemon.service import Daemon

    def broken(self, why):
        raise RuntimeError("consolidation broke")

    monkeypatch.setattr(Daemon, "_consolidate", broken)
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, consolidate_every_batches=1)
    base = tmp_path / "training"
    drop(base, "b1.jsonl", batch(seed=1))
    with pytest.raises(RuntimeError, match="consolidation broke"):
        run_in_process(base, cfg)
    state = newest_state(base)
    assert state["global_step"] == 12  # the batch's own final checkpoint survives
    assert not list((base / "rejected").iterdir()) and "rolled back" not in daemon_log(base)


def test_on_policy_batches_in_the_daemon(tmp_path, tiny_model_dir):
    """on_policy.fraction 1 in the daemon: every step of the batch trains on the student's own
    answers scored by the dense teacher (here the base itself), and the records say so."""
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, loss={"kind": "rkl", "kd_weight": 1.0})
    raw = yaml.safe_load(cfg.read_text())
    raw["teacher"] = {"path": str(tiny_model_dir)}
    raw["on_policy"] = {"fraction": 1.0, "max_new_tokens": 8}
    cfg.write_text(yaml.safe_dump(raw))
    base = tmp_path / "training"
    drop(base, "b1.jsonl", batch(n=16, seed=1))
    state = run_in_process(base, cfg)
    assert state.global_step == 4
    # The student starts equal to its teacher: reverse KL on its own answers is 0 (a CE step is not).
    assert state.log_history[0]["loss_on_policy"] == 0.0
    lines = [ln for ln in daemon_log(base).splitlines() if " step " in ln and " loss " in ln]
    assert len(lines) == 4 and all("on-policy (" in ln for ln in lines), lines


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer_dir):
    return teacher_model(tmp_path_factory.mktemp("teacher"), tokenizer_dir)


def test_a_batch_of_prompts_only_trains_on_policy_at_every_step(tmp_path, tiny_model_dir, teacher_dir):
    """on_policy.fraction 0.25, yet a file of prompt-only lines (non-ASCII, both shapes) trains every
    step on-policy: the student answers, the teacher scores, steps and samples count as for any
    batch. A mixed file after it: the draw decides, and its prompt-only lines give off-policy steps
    no target; every line still counts once."""
    cfg = on_policy_config(tmp_path / "d.yaml", tiny_model_dir, teacher_dir, fraction=0.25)
    base = tmp_path / "training"
    drop(base, "asked.jsonl", prompt_rows(12))
    state = run_in_process(base, cfg)
    assert (state.global_step, state.samples_seen) == (3, 12)
    log = daemon_log(base)
    assert "12 examples, 0 bad lines skipped, prompts only: every step on-policy" in log, log
    steps = [ln for ln in log.splitlines() if " step " in ln and " loss " in ln]
    assert len(steps) == 3 and all("on-policy (" in ln and "(0 answer" not in ln for ln in steps), steps
    on = [h["loss_on_policy"] for h in state.log_history if "loss_on_policy" in h]
    assert on and all(v > 0 for v in on)  # a teacher unlike the student
    assert "WARNING" not in log and not list((base / "rejected").iterdir())
    # The batch's summary reads its own on-policy losses (it said "-> nan": no off-policy "loss" logged)
    (done,) = [ln for ln in log.splitlines() if "Batch 1 done:" in ln]
    assert f"-> {on[-1]:.4f}" in done, done

    drop(base, "mixed.jsonl", prompt_rows(4, seed=1) + batch(8, seed=2))
    state = run_in_process(base, cfg)
    assert (state.global_step, state.samples_seen) == (6, 24)
    assert batch_state(newest_state(base))["batch_number"] == 2 and not list((base / "rejected").iterdir())


def test_prompts_only_without_on_policy_are_rejected_saying_so(tmp_path, tiny_model_dir):
    cfg = on_policy_config(tmp_path / "d.yaml", tiny_model_dir, None)
    base = tmp_path / "training"
    drop(base, "asked.jsonl", prompt_rows(6))
    drop(base, "mixed.jsonl", prompt_rows(2) + batch(8, seed=3))
    state = run_in_process(base, cfg)
    assert (state.global_step, state.samples_seen) == (2, 8)  # the mixed file's answered lines only
    reason = (base / "rejected" / "asked.jsonl.reason").read_text()
    assert "no usable line in asked.jsonl (6 bad)" in reason and reason.count("configure on_policy") == 6, reason
    assert "asked.jsonl:1: a prompt with no answer" in reason
    assert "skipped bad line mixed.jsonl:2: a prompt with no answer" in daemon_log(base)
