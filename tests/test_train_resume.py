"""Crash-proof training: SIGKILL mid-run or mid-save, resume, and match an uninterrupted run."""

from __future__ import annotations

import random
import time

import torch

from conftest import cli_here, run_cli
from kdforge.train import checkpoint as ckpt
from train_helpers import kill9, metrics, popen_train, train_config, wait_for, weights

STEPS = 30


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tokenizer_dir, data_file):
    # Uninterrupted reference.
    ref_cfg = train_config(tmp_path, tokenizer_dir, data_file, out="ref", max_steps=STEPS, save_steps=5)
    r = cli_here("train", "--config", ref_cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    ref = tmp_path / "ref"

    # Same run, SIGKILLed once checkpoint-5 exists, then resumed with --resume auto.
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="crash", max_steps=STEPS, save_steps=5)
    out = tmp_path / "crash"
    p = popen_train(cfg)
    assert wait_for(lambda: ckpt.latest_checkpoint(out) is not None), p.communicate()[0]
    kill9(p)
    killed_at = ckpt.read_state(ckpt.latest_checkpoint(out)).global_step
    assert killed_at < STEPS, "the run finished before the kill: the test proved nothing"
    r = run_cli("train", "--config", cfg, "--resume", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Resuming from checkpoint: checkpoint-{killed_at}" in r.stdout

    # Same loss at every step after the resume point, same final weights.
    m_ref, m = metrics(ref), metrics(out)
    assert sorted(m) == list(range(1, STEPS + 1))  # one clean curve, no duplicated steps
    for s in range(1, STEPS + 1):
        assert abs(m[s]["loss"] - m_ref[s]["loss"]) < 1e-5, (s, m[s]["loss"], m_ref[s]["loss"])
    w_ref, w = weights(ref / f"checkpoint-{STEPS}"), weights(out / f"checkpoint-{STEPS}")
    assert w.keys() == w_ref.keys()
    for k in w:
        torch.testing.assert_close(w[k], w_ref[k], atol=1e-5, rtol=0)
    st = ckpt.read_state(out / f"checkpoint-{STEPS}")
    assert st.global_step == STEPS and st.samples_seen == STEPS * 4


def test_sigkill_during_checkpoint_writes_never_leaves_a_wrong_checkpoint(tmp_path, tokenizer_dir, data_file):
    """Save every step and kill at random moments: every checkpoint-N folder that exists is
    complete, a torn save is only a hidden .tmp folder, and --resume auto always continues."""
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=25, save_steps=1,
                       save_total_limit=2)
    out = tmp_path / "o"
    rng = random.Random(0)
    resumed_from = []
    for attempt in range(3):
        before = ckpt.latest_checkpoint(out)
        p = popen_train(cfg)
        # wait until this run has saved at least one new checkpoint, then kill at a random moment
        assert wait_for(lambda: ckpt.latest_checkpoint(out) not in (None, before)), p.communicate()[0]
        time.sleep(rng.uniform(0.0, 0.15))
        kill9(p)
        for d in out.iterdir():
            if d.name.startswith("checkpoint-"):
                assert ckpt.is_complete(d), f"incomplete {d.name} after SIGKILL: {sorted(x.name for x in d.iterdir())}"
        resumed_from.append(ckpt.latest_checkpoint(out).name)
    r = cli_here("train", "--config", cfg, "--resume", "auto")  # this process never ran it: a cold resume
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Resuming from checkpoint: {resumed_from[-1]}" in r.stdout
    assert not list(out.glob(".tmp-*")), "torn saves are cleaned up on the next run"
    assert [c.name for c in ckpt.list_checkpoints(out)] == ["checkpoint-24", "checkpoint-25"]
    assert sorted(metrics(out)) == list(range(1, 26))


def test_resume_skips_incomplete_folders(tmp_path, tokenizer_dir, data_file):
    """A folder named like a newer checkpoint but missing files (another tool's crash, or a
    hand-made copy) is never picked by --resume auto."""
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=10, save_steps=5)
    assert cli_here("train", "--config", cfg, "train.max_steps=5").returncode == 0
    out = tmp_path / "o"
    fake = out / "checkpoint-9"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"torn")
    (out / ".tmp-checkpoint-8-1-1").mkdir()
    assert ckpt.latest_checkpoint(out).name == "checkpoint-5"
    r = cli_here("train", "--config", cfg, "--resume", "auto")  # which folder it picks, not what it restores
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Resuming from checkpoint: checkpoint-5" in r.stdout
    assert ckpt.read_state(ckpt.latest_checkpoint(out)).global_step == 10


def test_sigterm_saves_and_exits_130(tmp_path, tokenizer_dir, data_file):
    import os
    import signal

    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=100000, save_steps=100000)
    out = tmp_path / "o"
    p = popen_train(cfg)
    assert wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3), p.communicate()[0]
    os.kill(p.pid, signal.SIGTERM)
    stdout, _ = p.communicate(timeout=60)
    assert p.returncode == 130, stdout
    last = ckpt.latest_checkpoint(out)
    assert last is not None, stdout
    step = ckpt.read_state(last).global_step
    assert step >= 3 and step == max(metrics(out))
    assert "resume with --resume auto" in stdout


def test_fresh_run_refuses_to_mix_with_existing_checkpoints(tmp_path, tokenizer_dir, data_file):
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=5, save_steps=5)
    assert cli_here("train", "--config", cfg).returncode == 0
    r = cli_here("train", "--config", cfg, "--resume", "none")
    assert r.returncode == 2
    assert "already holds checkpoints" in r.stderr and "--resume auto" in r.stderr
    r = cli_here("train", "--config", cfg, "--resume", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not a complete checkpoint" in r.stderr


def test_empty_data_and_changed_data_are_usage_errors(tmp_path, tokenizer_dir, data_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = cli_here("train", "--config", train_config(tmp_path, tokenizer_dir, empty, out="e"))
    assert r.returncode == 2 and "no usable examples" in r.stderr and "Traceback" not in r.stderr
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=5, save_steps=5)
    assert cli_here("train", "--config", cfg).returncode == 0
    data_file.write_text(data_file.read_text() + data_file.read_text().splitlines()[0] + "\n")
    r = cli_here("train", "--config", cfg, "train.max_steps=8")
    assert r.returncode == 2 and "the data changed since the checkpoint" in r.stderr


def test_resume_with_dropout_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, tokenizer_dir, tiny_model_dir,
                                                                      data_file):
    """LoRA dropout draws from the torch RNG at every step: only a restored RNG state gives the
    same masks after a resume. Constant schedule, so stopping at 5 and resuming to 10 is the same
    run as 10 straight; every loss and every weight must be equal to the bit."""
    lora = ["model.preset=null", f"model.path={tiny_model_dir}",
            "model.lora={r: 4, alpha: 8, dropout: 0.3, target_modules: [q_proj, v_proj, up_proj]}"]
    straight = train_config(tmp_path, tokenizer_dir, data_file, out="straight", max_steps=10, save_steps=5,
                            schedule="constant", lr=1e-2)
    halves = train_config(tmp_path, tokenizer_dir, data_file, out="halves", max_steps=10, save_steps=5,
                          schedule="constant", lr=1e-2)
    assert cli_here("train", "--config", straight, *lora).returncode == 0
    r = cli_here("train", "--config", halves, *lora, "train.max_steps=5")
    assert r.returncode == 0, r.stdout + r.stderr
    # the resume in a new process: in this one, the RNG would go on from step 5 even if it were not restored
    r = run_cli("train", "--config", halves, *lora, "--resume", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Resuming from checkpoint: checkpoint-5" in r.stdout
    m_ref, m = metrics(tmp_path / "straight"), metrics(tmp_path / "halves")
    assert sorted(m) == list(range(1, 11))
    assert [m[s]["loss"] for s in m] == [m_ref[s]["loss"] for s in m]
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "straight" / "checkpoint-10" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "halves" / "checkpoint-10" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
