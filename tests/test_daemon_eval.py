"""The daemon's held-out eval (`daemon.eval_file`) and its run built by `build_session`.

Held-out numbers after every batch in the status file, the checkpoint's log_history (the daemon's
metrics), the daily log, verify's report and plot; a harmful batch (every answer belongs to another
prompt, trained for several epochs) fails verify's forgetting check; an unusable eval file stops the
start with exit 2 naming file:line. And the LR of param group 1 (norms, no weight decay) follows the
daemon's schedule after a restart, not the one its checkpoint was saved with."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from conftest import cli_env, synthetic_records, write_jsonl
from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import STEPS_PER_BATCH, batch, daemon_config, daemon_log, drop, newest_state, run_in_process, status


def orange_pixels(png) -> int:
    """Pixels of the held-out line's colour (matplotlib's tab:orange) in the plot."""
    import matplotlib.image
    import numpy as np

    from kdforge.daemon.verify import HELDOUT_COLOR
    from matplotlib.colors import to_rgb

    img = matplotlib.image.imread(str(png))[..., :3]
    return int((np.abs(img - np.array(to_rgb(HELDOUT_COLOR))).max(axis=-1) < 0.05).sum())


def test_heldout_numbers_after_every_batch_and_a_harmful_batch_fails_the_forgetting_check(tmp_path, tiny_model_dir):
    from kdforge.daemon.status import render
    from kdforge.daemon.verify import verify

    # Held-out records of the same two tasks as the batches, with other numbers and words.
    heldout = write_jsonl(tmp_path / "heldout.jsonl", synthetic_records(24, seed=99))
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, save_steps=100, settle_seconds=0,
                        eval_file=str(heldout))
    base = tmp_path / "training"
    for i in (1, 2, 3):
        drop(base, f"b{i}.jsonl", batch(seed=i))
    run_in_process(base, cfg)

    steps = [STEPS_PER_BATCH * i for i in (1, 2, 3)]
    metrics = [h for h in newest_state(base)["log_history"] if "eval_ce" in h]
    assert [(m["step"], m["after"]) for m in metrics] == [(s, f"batch {i}") for i, s in enumerate(steps, 1)]
    for m in metrics:
        assert m["eval_n"] == 24 and m["eval_perplexity"] == pytest.approx(math.exp(m["eval_ce"]), rel=1e-6)
        assert "eval_exact_match" not in m  # eval_greedy off: no generation after every batch
    assert metrics[-1]["eval_ce"] < metrics[0]["eval_ce"]  # the tasks were learned, held out too
    s = status(base)
    assert [(e["step"], e["ce"]) for e in s["eval_history"]] == [(m["step"], m["eval_ce"]) for m in metrics]
    assert s["eval"]["ce"] == metrics[-1]["eval_ce"] and s["eval"]["change_since_first"] < 0
    assert daemon_log(base).count("held-out eval after batch") == 3
    assert f"held-out ce:      {metrics[-1]['eval_ce']:.4f} after batch 3" in render(s)  # kdforge status

    result = verify(base)
    assert result.ok, result.report
    assert "Held-out eval (daemon.eval_file):" in result.report
    assert f"held-out eval after batch 3 (step {steps[-1]}): ce {metrics[-1]['eval_ce']:.4f}" in result.report
    assert "since batch 1" in result.report and "[PASS] no forgetting" in result.report
    assert orange_pixels(result.plot_path) > 50

    # ---- a harmful batch: each prompt answered with its neighbour's answer (math prompts get word
    # lists and the reverse), eight epochs of it
    rows = batch(seed=4)
    answers = [r["teacher_text"] for r in rows]
    drop(base, "harm.jsonl", [{**r, "teacher_text": a} for r, a in zip(rows, answers[1:] + answers[:1])])
    harmful = daemon_config(tmp_path / "harm.yaml", tiny_model_dir, save_steps=100, settle_seconds=0,
                            eval_file=str(heldout), epochs_per_batch=8)
    run_in_process(base, harmful)
    after = status(base)["eval"]
    assert after["after"] == "batch 4" and after["ce"] > 1.10 * min(m["eval_ce"] for m in metrics)
    result = verify(base)
    assert not result.ok
    assert "[FAIL] no forgetting: held-out ce at most 10% above its lowest" in result.report, result.report
    assert "RESULT: 1 check(s) failed" in result.report


def test_an_unusable_eval_file_stops_the_start_with_exit_2_naming_it(tmp_path, tiny_model_dir):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"prompt": "a", "teacher_text": "b"}\n{"prompt": 3\n')
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, eval_file=str(heldout))
    got = subprocess.run([sys.executable, "-m", "kdforge", "daemon", "--base-dir", str(tmp_path / "base"),
                          "--config", str(cfg), "--once"], env=cli_env(), capture_output=True, text=True,
                         timeout=300)
    assert got.returncode == 2, got.stdout + got.stderr
    assert f"daemon.eval_file: {heldout}:2:" in got.stdout + got.stderr


def test_param_group_1_follows_the_daemon_schedule_after_a_restart(tmp_path, tiny_model_dir):
    """Batch 1 under wsd, still warming up (100 steps); restart with schedule constant: both param
    groups train at train.lr. (Resume once reshaped group 0 only: the norms went on warming up.)"""
    from kdforge.config import load_config
    from kdforge.daemon.service import Daemon

    warm = daemon_config(tmp_path / "warm.yaml", tiny_model_dir, lora=False, save_steps=100, settle_seconds=0,
                         schedule="wsd")
    conf = yaml.safe_load(warm.read_text())
    conf["train"]["warmup_steps"] = 100
    warm.write_text(yaml.safe_dump(conf))
    constant = daemon_config(tmp_path / "constant.yaml", tiny_model_dir, lora=False, save_steps=100,
                             settle_seconds=0, schedule="constant")
    base = tmp_path / "training"
    drop(base, "b1.jsonl", batch(seed=1))
    run_in_process(base, warm)
    assert newest_state(base)["log_history"][-1]["lr"] < 3e-3 * 0.2  # warming up

    drop(base, "b2.jsonl", batch(seed=2))
    d = Daemon(base, load_config([constant]), handle_signals=False)
    assert d.run(once=True) == 0
    groups = d.session.optimizer.param_groups
    assert groups[1]["params"], "full training: norms and biases form group 1"
    assert [g["lr"] for g in groups] == [3e-3, 3e-3]
    assert d.state.global_step == 2 * STEPS_PER_BATCH


def test_a_consolidation_is_scored_too_and_scores_what_base_plus_adapter_scored(tmp_path, tiny_model_dir):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", synthetic_records(12, seed=99))
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, save_steps=100, settle_seconds=0,
                        consolidate_every_batches=1, eval_file=str(heldout))
    base = tmp_path / "training"
    drop(base, "b1.jsonl", batch(seed=1))
    run_in_process(base, cfg)
    metrics = [h for h in newest_state(base)["log_history"] if "eval_ce" in h]
    assert [(m["step"], m["after"]) for m in metrics] == [(STEPS_PER_BATCH, "batch 1"),
                                                          (STEPS_PER_BATCH, "consolidation 1")]
    assert metrics[1]["eval_ce"] == pytest.approx(metrics[0]["eval_ce"], abs=1e-4)  # the merge is exact
    assert status(base)["eval"]["after"] == "consolidation 1"
