"""On- and off-policy steps log apart (issue 22): an on-policy step trains the divergence alone on
the student's own tokens, an off-policy step (1 - kd_weight) CE + kd_weight KD on the teacher's
text; one `loss` key for both drew a sawtooth and made `kdforge verify`'s loss-jump check fail at
every switch (and never when the history started on-policy)."""

from __future__ import annotations

import json

import yaml

from conftest import cli_here
from kdforge.daemon.verify import jump_checks
from train_helpers import metrics


def _mixed(off: list[float], on: list[float], first_on: bool) -> list[dict]:
    """log_history alternating the two kinds of step (on-policy first if `first_on`)."""
    out, step = [], 1
    for a, b in zip(off, on):
        for kind in ((True, False) if first_on else (False, True)):
            out.append({"step": step, "loss_on_policy": b} if kind else {"step": step, "loss": a})
            step += 1
    return out


def test_verify_compares_on_policy_with_on_policy_and_off_with_off():
    # off-policy loss falls 6 -> 3, on-policy KD 0.6 -> 0.3: alternating steps, no batch is a jump
    smooth = _mixed([6.0, 5.0, 4.0, 3.0, 3.0, 2.9], [0.6, 0.5, 0.4, 0.3, 0.3, 0.29], first_on=False)
    assert all(ok for ok, _ in jump_checks(smooth, [(6, "batch 2")])), jump_checks(smooth, [(6, "batch 2")])
    # the off-policy loss climbs back to 5.9 after the boundary: a failure, though the history starts on-policy
    jumped = _mixed([6.0, 5.0, 4.0, 3.0, 5.9, 5.5], [0.6, 0.5, 0.4, 0.3, 0.3, 0.29], first_on=True)
    checks = jump_checks(jumped, [(8, "batch 2")])
    assert any(not ok and "batch 2 at step 8" in d and "off-policy" in d for ok, d in checks), checks
    # and an on-policy curve that jumps back fails on its own
    on_jump = _mixed([6.0, 5.0, 4.0, 3.0, 3.0, 2.9], [0.6, 0.5, 0.4, 0.3, 0.59, 0.5], first_on=False)
    checks = jump_checks(on_jump, [(8, "batch 2")])
    assert [ok for ok, _ in checks] == [True, False] and "on-policy" in checks[1][1], checks


def test_on_and_off_policy_steps_log_apart_with_no_sawtooth(tmp_path, tokenizer_dir, tiny_model_dir, data_file):
    """Half the steps on-policy (dense teacher): metrics.jsonl and TensorBoard's `loss` hold the
    off-policy steps only, `loss_on_policy` (and kd/ce_on_policy) the on-policy ones."""
    from test_report_to import tensorboard_steps

    out = tmp_path / "mixed"
    cfg = {"model": {"preset": "toy", "max_seq_len": 128},
           "io": {"tokenizer_path": str(tokenizer_dir), "train_shards": [str(data_file)], "output_dir": str(out)},
           "teacher": {"path": str(tiny_model_dir)}, "on_policy": {"fraction": 0.5, "max_new_tokens": 4},
           "loss": {"kind": "rkl", "kd_weight": 0.5},
           "train": {"micro_batch_size": 2, "grad_accum": 1, "seq_lengths": [64], "max_steps": 8, "lr": 3e-3,
                     "warmup_steps": 1, "save_steps": 100, "seed": 0, "report_to": ["tensorboard"]}}
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = cli_here("train", "--config", path)
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(out)
    on = sorted(s for s in m if m[s]["on_policy"])
    off = sorted(s for s in m if not m[s]["on_policy"])
    assert on and off and sorted(on + off) == list(range(1, 9))
    for s in on:
        assert {"loss_on_policy", "kd_on_policy", "ce_on_policy"} <= m[s].keys() and not {"loss", "kd", "ce"} & m[s].keys()
    for s in off:
        assert {"loss", "kd", "ce"} <= m[s].keys() and "loss_on_policy" not in m[s]
    tb = tensorboard_steps(out / "runs")
    assert sorted(tb["loss"]) == off and sorted(tb["loss_on_policy"]) == on
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == off
    assert [h["step"] for h in state["log_history"] if "loss_on_policy" in h] == on
