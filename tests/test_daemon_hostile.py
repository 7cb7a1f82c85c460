"""Hostile inbox entries and data that breaks training (issue 8, "The daemon"): one entry never stops
the queue, nothing outside the base dir is read, a batch that fails is rolled back to the last good
checkpoint and rejected with its reason, names are escaped in the log. Real tiny models, real
daemons (in this process, or a `kdforge daemon` process where a hang must be seen)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli_env
from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import (batch, batch_state, daemon_config, daemon_log, drop, losses, newest_state,
                            run_in_process, start_daemon, status, stop, wait_until)
from kdforge.daemon import verify as verify_mod
from kdforge.daemon.inbox import claim
from kdforge.train import checkpoint as ckpt


def reason_of(base, name: str) -> str:
    return (base / "rejected" / f"{name}.reason").read_text()


def run_once_process(base, cfg, timeout=60) -> subprocess.CompletedProcess:
    """`kdforge daemon --once` as a process: a hang shows as a timeout, not a stuck test run."""
    return subprocess.run([sys.executable, "-m", "kdforge", "daemon", "--base-dir", str(base), "--config",
                           str(cfg), "--once"], env=cli_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- entries that are not files

def test_a_directory_a_symlink_out_and_a_big_file_are_rejected_and_the_queue_goes_on(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, max_batch_bytes=20_000)
    base = tmp_path / "training"
    (base / "inbox" / "dir.jsonl").mkdir(parents=True)
    secret = drop(tmp_path / "elsewhere", "secret.jsonl", batch(8, seed=9))
    before = secret.read_bytes()
    os.symlink(secret, base / "inbox" / "x.jsonl")
    big = drop(tmp_path / "staging", "big.jsonl", batch(400, seed=3))
    assert big.stat().st_size > 20_000
    os.replace(big, base / "inbox" / "big.jsonl")
    drop(base, "good.jsonl", batch(seed=1))
    state = run_in_process(base, cfg)
    assert (state.global_step, state.samples_seen) == (12, 48)  # only good.jsonl: nothing from outside
    assert (base / "rejected" / "dir.jsonl").is_dir() and "directory" in reason_of(base, "dir.jsonl")
    assert (base / "rejected" / "x.jsonl").is_symlink() and "symlink" in reason_of(base, "x.jsonl")
    assert "max_batch_bytes" in reason_of(base, "big.jsonl") and (base / "rejected" / "big.jsonl").is_file()
    assert secret.read_bytes() == before  # the outside file is where it was, untouched
    assert list((base / "inbox").iterdir()) == [base / "inbox" / ".claimed"]


def test_a_fifo_is_never_opened(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    (base / "inbox").mkdir(parents=True)
    os.mkfifo(base / "inbox" / "pipe.jsonl")
    drop(base, "good.jsonl", batch(8, seed=1))
    p = run_once_process(base, cfg)  # today: blocks in open() forever -> TimeoutExpired
    assert p.returncode == 0, p.stdout + p.stderr
    assert newest_state(base)["global_step"] == 2
    assert "FIFO" in reason_of(base, "pipe.jsonl")


def test_non_batch_names_are_named_once_and_verify_does_not_pass_inbox_empty(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    inbox = base / "inbox"
    inbox.mkdir(parents=True)
    os.symlink(tmp_path / "nowhere.jsonl", inbox / "dangling.jsonl")
    for name in ("UPPER.JSONL", "..dotdot.jsonl", "x.part.jsonl"):
        (inbox / name).write_text(json.dumps(batch(1)[0]) + "\n")
    drop(base, "good.jsonl", batch(8, seed=1))
    run_in_process(base, cfg)
    run_in_process(base, cfg)  # a second start names what is left again, once
    log = daemon_log(base)
    for name in ("dangling.jsonl", "UPPER.JSONL", "..dotdot.jsonl", "x.part.jsonl"):
        assert name in log, name
    assert log.count("x.part.jsonl") == 2, log  # once per daemon start, not once per scan
    assert "symlink" in reason_of(base, "dangling.jsonl") and "UPPER.JSONL" in reason_of(base, "UPPER.JSONL")
    result = verify_mod.verify(base)
    inbox_check = next(c for c in result.checks if c.name.startswith("inbox empty"))
    assert not inbox_check.ok and "..dotdot.jsonl" in inbox_check.detail and "x.part.jsonl" in inbox_check.detail


def test_a_name_with_a_newline_cannot_forge_a_log_line(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    evil = "x\n2026-01-01 00:00:00 ERROR   forged\r.jsonl"
    drop(base, evil, lines=["not json"])
    drop(base, "good.jsonl", batch(8, seed=1))
    run_in_process(base, cfg)
    log = daemon_log(base)
    assert not [line for line in log.splitlines() if verify_mod.ERROR_LINE.match(line)], log
    assert "forged" in log and "\\n2026" in log  # named, escaped
    assert (base / "rejected" / evil).is_file()
    assert next(c for c in verify_mod.verify(base).checks if c.name.startswith("no ERROR")).ok


# ---------------------------------------------------------------------------- claims

def test_a_file_dropped_again_is_a_new_batch_even_after_a_kill_before_its_first_checkpoint(tmp_path,
                                                                                          tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    rows = batch(seed=1)
    drop(base, "b.jsonl", rows)
    run_in_process(base, cfg)
    drop(base, "b.jsonl", rows)  # same name, same content: new data as far as the user is concerned
    run_in_process(base, cfg)
    assert (newest_state(base)["global_step"], newest_state(base)["samples_seen"]) == (24, 96)
    # claimed, then killed before its first checkpoint: the claim is left, the checkpoint names the
    # previous batch of the same name and content; it is still a new batch
    assert claim(drop(base, "b.jsonl", rows), base / "inbox" / ".claimed") is not None
    run_in_process(base, cfg)
    assert "already trained" not in daemon_log(base)
    state = newest_state(base)
    assert (state["global_step"], state["samples_seen"], batch_state(state)["batch_number"]) == (36, 144, 3)


def test_a_writer_that_pauses_past_the_settle_time_loses_no_line(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0.3, save_steps=100)
    base = tmp_path / "training"
    proc = start_daemon(base, cfg)
    try:
        wait_until(lambda: status(base).get("status") == "idle", proc, base, "the model to load")
        rows = [json.dumps(r) for r in batch(160, seed=2)]
        path = base / "inbox" / "slow.jsonl"
        with open(path, "w") as f:
            f.write("".join(r + "\n" for r in rows[:120]))
            f.flush()
            wait_until(lambda: status(base).get("current_file") == "slow.jsonl", proc, base, "the claim")
            f.write("".join(r + "\n" for r in rows[120:]))  # the rest, into the claimed file
        wait_until(lambda: (base / "rejected" / "slow.jsonl.reason").exists(), proc, base, "the rejection")
        assert stop(proc, base) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (base / "rejected" / "slow.jsonl").read_text().splitlines() == rows  # every line kept
    assert "changed" in reason_of(base, "slow.jsonl")


# ---------------------------------------------------------------------------- data that breaks training

def aligned_logprobs(tokenizer_dir, text: str, logprob: float = -0.1) -> list[dict]:
    """teacher_logprobs that align 1:1 with the student tokenizer's tokens of `text`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pieces = [tok.decode([i]) for i in tok(text, add_special_tokens=False)["input_ids"]]
    return [{"token": p, "logprob": logprob, "top": [{"token": p, "logprob": logprob}]} for p in pieces]


def kd_rows(tokenizer_dir, n: int, seed: int) -> list[dict]:
    return [{**r, "teacher_logprobs": aligned_logprobs(tokenizer_dir, r["teacher_text"])}
            for r in batch(n, seed=seed)]


def adapter(base):
    return load_file(str(ckpt.latest_checkpoint(base / "current_model") / "adapter_model.safetensors"))


def test_logprobs_that_are_not_objects_reject_the_batch(tmp_path, tiny_model_dir, tokenizer_dir):
    """`teacher_logprobs: [1, 2]` with a KL loss: an AttributeError in dataset.py once, a bad line
    now; either way the file is rejected with its reason and the next one trains."""
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, loss={"kind": "fkl"})
    base = tmp_path / "training"
    drop(base, "a_bad.jsonl", [{**r, "teacher_logprobs": [1, 2]} for r in batch(8, seed=5)])
    os.utime(base / "inbox" / "a_bad.jsonl", (time.time() - 100, time.time() - 100))
    drop(base, "b_good.jsonl", kd_rows(tokenizer_dir, 8, seed=4))
    state = run_in_process(base, cfg)
    assert (state.global_step, state.samples_seen) == (2, 8)
    assert "a_bad.jsonl" in reason_of(base, "a_bad.jsonl")


def test_a_batch_changed_after_its_claim_is_rolled_back_exactly(tmp_path, tiny_model_dir, tokenizer_dir):
    """A batch cut short by .stop after two of its checkpoints, whose claimed file then changes: the
    next start rolls everything it trained back (weights, optimizer, scheduler, RNG, global_step,
    even with its start checkpoint rotated out by save_total_limit 1), keeps the file whole in
    rejected/, and the next batch trains exactly as if the changed one had never come."""
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, save_steps=2, save_total_limit=1,
                        loss={"kind": "fkl", "kd_weight": 0.5})
    prior, good = kd_rows(tokenizer_dir, 8, seed=3), kd_rows(tokenizer_dir, 16, seed=4)
    ref = tmp_path / "reference"
    drop(ref, "a_prior.jsonl", prior)
    run_in_process(ref, cfg)
    drop(ref, "c_good.jsonl", good)
    run_in_process(ref, cfg)

    base = tmp_path / "training"
    drop(base, "a_prior.jsonl", prior)
    run_in_process(base, cfg)
    drop(base, "b_long.jsonl", kd_rows(tokenizer_dir, 40, seed=5))

    def stop_after_two_saves(line: str) -> None:
        if "Saved checkpoint: checkpoint-6" in line:
            (base / ".stop").touch()

    from datetime import datetime

    from kdforge.config import load_config
    from kdforge.daemon.service import Daemon
    Daemon(base, load_config([cfg]), echo=stop_after_two_saves, handle_signals=False).run(once=True)
    assert newest_state(base)["global_step"] == 6
    (claimed,) = (base / "inbox" / ".claimed").iterdir()
    with open(claimed, "a") as f:
        f.write(json.dumps(kd_rows(tokenizer_dir, 1, seed=6)[0]) + "\n")
    lines = claimed.read_text().splitlines()
    drop(base, "c_good.jsonl", good)
    run_in_process(base, cfg, now=datetime.now)
    assert (base / "rejected" / "b_long.jsonl").read_text().splitlines() == lines  # kept whole
    assert "changed" in reason_of(base, "b_long.jsonl") and "rolled back" in daemon_log(base)
    got, want = newest_state(base), newest_state(ref)
    assert (got["global_step"], got["samples_seen"]) == (want["global_step"], want["samples_seen"]) == (6, 24)
    assert losses(got) == losses(want)  # the same numbers, step for step
    a, b = adapter(base), adapter(ref)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_chat_template_that_raises_rejects_the_batch(tmp_path, tiny_model_dir):
    tok = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, tok)
    (tok / "chat_template.jinja").write_text("{% for m in messages %}{% if m['role'] == 'system' %}"
                             "{{ raise_exception('System role not supported') }}{% endif %}"
                             "{% if m['content'] == 'crash' %}{{ 1 // (m['content'] | length - 5) }}{% endif %}"
                             "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: ")
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, io={"tokenizer_path": str(tok)})
    base = tmp_path / "training"
    drop(base, "a_sys.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello."}]}])
    drop(base, "b_bug.jsonl", [{"prompt": "crash", "completion": "a ZeroDivisionError in the template"}])
    os.utime(base / "inbox" / "a_sys.jsonl", (time.time() - 100, time.time() - 100))
    os.utime(base / "inbox" / "b_bug.jsonl", (time.time() - 99, time.time() - 99))
    drop(base, "c_good.jsonl", batch(8, seed=1))
    state = run_in_process(base, cfg)
    assert state.global_step == 2
    assert "System role not supported" in reason_of(base, "a_sys.jsonl")
    assert "ZeroDivisionError" in reason_of(base, "b_bug.jsonl")
    log = daemon_log(base)
    # the template's refusal is the data's fault: a warning; an exception nobody meant shows as an
    # ERROR with its traceback, so a bug of ours stays visible (verify flags it)
    assert "WARNING batch a_sys.jsonl failed in training: TemplateError" in log.replace("  ", " ")
    assert "ERROR   batch b_bug.jsonl failed in training: ZeroDivisionError" in log and "Traceback" in log


def test_a_file_of_many_bad_lines_is_named_in_bounded_space(tmp_path, tiny_model_dir):
    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0)
    base = tmp_path / "training"
    drop(base, "noisy.jsonl", lines=[json.dumps(batch(1)[0])] + ["not json"] * 30)
    drop(base, "allbad.jsonl", lines=["not json"] * 30)
    run_in_process(base, cfg)
    log = daemon_log(base)
    assert log.count("skipped bad line noisy.jsonl:") == 20 and "and 10 more bad lines" in log
    reason = reason_of(base, "allbad.jsonl")
    assert reason.count("allbad.jsonl:") == 20 and "and 10 more bad lines" in reason
