"""What a hostile reality does to a training output dir: two runs on it, a crash between the
renames of a re-save, a data file edited in place, a raised max_steps, the resolved config."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml

from conftest import cli_here
from kdforge.config import load_config
from kdforge.model import ModelCfg, build_student
from kdforge.train import checkpoint as ckpt
from kdforge.train.checkpoint import TrainState
from kdforge.train.schedule import LRMultiplier, make_scheduler
from train_helpers import metrics, popen_train, train_config, wait_for


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, tokenizer_dir, data_file):
    """The second run's start-up cleanup would delete the first's in-progress .tmp checkpoint."""
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=100000, save_steps=100000)
    out = tmp_path / "o"
    first = popen_train(cfg)
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 1), \
            first.communicate()[0]
        r = cli_here("train", "--config", cfg, "--resume", "auto", "train.max_steps=3")  # here: the lock is the other's
        assert r.returncode == 2, r.stdout + r.stderr
        assert str(out) in r.stderr and f"pid {first.pid}" in r.stderr, r.stderr
        assert first.poll() is None, "the first run goes on"
    finally:
        os.kill(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130
    # the lock dies with its holder: the next run takes the dir
    r = cli_here("train", "--config", cfg, "--resume", "auto",
                f"train.max_steps={ckpt.read_state(ckpt.latest_checkpoint(out)).global_step + 1}")
    assert r.returncode == 0, r.stdout + r.stderr


def _tiny(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_student(ModelCfg(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=None,
                                   ffn_dim=32, max_seq_len=32), len(tok), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return tok, model, opt, make_scheduler(opt, "constant", 0, None)


def test_a_crash_between_the_renames_of_a_resave_keeps_the_checkpoint(tmp_path, tokenizer_dir, monkeypatch):
    """Re-saving a step (every daemon consolidation does) must never leave a moment without a
    complete checkpoint-N: kill it between its renames, and the next start still finds it."""
    tok, model, opt, sched = _tiny(tokenizer_dir)
    state = TrainState(global_step=5)
    ckpt.save_checkpoint(tmp_path, state, model, opt, sched, tok)
    renames = []
    real_replace, real_rename = os.replace, os.rename

    def crashing(real):
        def move(src, dst, *a, **kw):
            renames.append((src, dst))
            if len(renames) == 2:
                raise KeyboardInterrupt("killed between the renames")
            return real(src, dst, *a, **kw)
        return move

    monkeypatch.setattr(os, "replace", crashing(real_replace))
    monkeypatch.setattr(os, "rename", crashing(real_rename))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, TrainState(global_step=5, extra={"new": True}), model, opt, sched, tok)
    monkeypatch.undo()
    assert len(renames) == 2
    # a reader before any cleanup already sees a complete step 5
    assert ckpt.latest_checkpoint(tmp_path) is not None
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path)).global_step == 5
    ckpt.cleanup_partial(tmp_path)  # what the next start does
    assert ckpt.is_complete(tmp_path / "checkpoint-5"), sorted(p.name for p in tmp_path.iterdir())
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "the leftovers are gone"


def test_a_data_file_edited_in_place_is_refused_on_resume(tmp_path, tokenizer_dir, data_file):
    """Same number of lines, other content: resuming would continue on other data."""
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=8, save_steps=4)
    assert cli_here("train", "--config", cfg, "train.max_steps=4").returncode == 0
    lines = data_file.read_text().splitlines()
    rec = json.loads(lines[3])
    rec["teacher_text"] = rec["teacher_text"][::-1]
    lines[3] = json.dumps(rec)
    original = data_file.read_text()
    data_file.write_text("\n".join(lines) + "\n")
    r = cli_here("train", "--config", cfg, "--resume", "auto")
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(data_file) in r.stderr and "--output-dir" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A checkpoint written before fingerprints existed still resumes (on the unchanged data).
    data_file.write_text(original)
    st_path = tmp_path / "o" / "checkpoint-4" / "trainer_state.json"
    st = json.loads(st_path.read_text())
    st.pop("data_fingerprint", None)
    st_path.write_text(json.dumps(st))
    r = cli_here("train", "--config", cfg, "--resume", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "o")).data_fingerprint


def test_resume_with_a_raised_max_steps_reshapes_every_param_groups_schedule(tmp_path, tokenizer_dir, data_file):
    """Group 0 (matrices) and group 1 (norms, biases) both follow the new cosine after a resume."""
    from kdforge.train.runner import run_training

    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=6, save_steps=3,
                       lr=1e-2, warmup_steps=1, schedule="cosine")
    run_training(load_config([cfg]), resume="none", log=lambda m: None)
    run_training(load_config([cfg], ["train.max_steps=20"]), resume="auto", log=lambda m: None, stop_after=9)
    want = 1e-2 * LRMultiplier("cosine", 1, 20, min_ratio=0.1)(9)
    osd = torch.load(tmp_path / "o" / "checkpoint-9" / "optimizer.pt", weights_only=True)
    assert len(osd["param_groups"]) == 2
    assert [g["lr"] for g in osd["param_groups"]] == pytest.approx([want, want], rel=1e-9)
    # and the lr logged at the first resumed step is already the new schedule's
    old_lr7 = 1e-2 * LRMultiplier("cosine", 1, 6, min_ratio=0.1)(6)
    assert metrics(tmp_path / "o")[7]["lr"] == pytest.approx(1e-2 * LRMultiplier("cosine", 1, 20)(6))
    assert metrics(tmp_path / "o")[7]["lr"] != pytest.approx(old_lr7)


def test_checkpoint_holds_the_resolved_config_and_config_validate_reads_it(tmp_path, tokenizer_dir, data_file):
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=2, save_steps=2, warmup_steps=1)
    assert cli_here("train", "--config", cfg).returncode == 0
    saved = yaml.safe_load((tmp_path / "o" / "checkpoint-2" / "kdforge.yaml").read_text())
    assert saved == load_config([cfg]).model_dump(mode="json")  # every default filled in
    assert saved["train"]["weight_decay"] == 0.0 and "daemon" in saved and saved["model"]["lora"] is None
    r = cli_here("config", "validate", tmp_path / "o" / "checkpoint-2" / "kdforge.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli_here("train", "--config", tmp_path / "o" / "checkpoint-2" / "kdforge.yaml", "--resume", "auto",
                "train.max_steps=3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Resuming from checkpoint: checkpoint-2" in r.stdout


def test_lora_without_model_path_is_refused_by_config_validate_too(tmp_path, tokenizer_dir, data_file):
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o")
    for cmd in (("config", "validate", cfg, "--set", "model.lora={r: 4}"),
                ("train", "--config", cfg, "model.lora={r: 4}")):
        r = cli_here(*cmd)
        assert r.returncode == 2 and "model.lora" in r.stderr and "model.path" in r.stderr, (cmd, r.stderr)
