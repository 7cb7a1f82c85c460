"""The `training` part: the seed's toy smoke test, then the configured student (or its shrunk
copy, see machine.py) on the generated samples: 5 steps, a checkpoint with every file, and a run
killed with SIGKILL and resumed to the same step.

The 5-step run is `run_training` in-process; the killed run and its resume are real `kdforge
train` processes (a kill must hit a real process). All of it writes under the scratch dir: the
user's config is copied with `io.*` pointed at the samples and the scratch output dir.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kdforge.config import from_dict
from kdforge.errors import KdforgeError
from kdforge.preflight.machine import SHRUNK_MAX_ACCUM, Student
from kdforge.preflight.report import Item, failed, passed, skipped, warned
from kdforge.train import checkpoint as ckpt

STEPS = 5
KILL_TIMEOUT = 600.0  # seconds to wait for the run to be killed to save its first checkpoint
TOKENIZER_FILES = ("tokenizer_config.json",)  # every saved HF tokenizer writes this one


def scratch_training_config(merged: dict, samples: Path, out_dir: Path, student: Student,
                            save_steps: int) -> dict:
    """The user's config for 5 steps on the samples, writing only to `out_dir`."""
    data = copy.deepcopy(merged)
    io = data.setdefault("io", {})
    io.update(train_shards=[str(samples)], eval_shards=[], output_dir=str(out_dir))
    t = data.setdefault("train", {})
    seq = t.get("seq_lengths", [512])
    seq = [seq] if isinstance(seq, int) else list(seq)[:STEPS]
    if student.changed:
        seq = [min(s, student.setup.seq_len) for s in seq]
        t["micro_batch_size"] = student.setup.micro_batch
        t["fsdp"] = False  # shrunk to fit one device of this machine
        t["grad_accum"] = min(int(t.get("grad_accum") or 1), SHRUNK_MAX_ACCUM)
    if student.numbers is not None:
        data["model"] = dict(student.numbers)
    elif student.smaller:  # the model.path model itself, in the setup that fits
        model = data.setdefault("model", {})
        if student.setup.lora is not None and not model.get("lora"):
            model["lora"] = {"r": student.setup.lora.r, "alpha": 2 * student.setup.lora.r}
        if student.setup.gradient_checkpointing:
            t["gradient_checkpointing"] = True
    t.update(max_steps=STEPS, epochs=None, seq_lengths=seq, save_steps=save_steps, eval_steps=None,
             warmup_steps=min(int(t.get("warmup_steps") or 0), 1))
    if "report_to" in t:
        t["report_to"] = []  # a 5-step check has no business in the user's dashboards
    if isinstance(data.get("on_policy"), dict):
        data["on_policy"]["fraction"] = 0.0  # on-policy steps would pay the teacher outside this budget
    data.pop("daemon", None)
    return data


def check_smoke(work: Path) -> Item:
    from kdforge.train.smoke import run_smoke

    lines: list[str] = []
    try:
        r = run_smoke(work, log=lines.append)
    except KdforgeError as e:
        return failed("smoke", f"kdforge smoke failed: {e}", "the install is broken: reinstall kdforge "
                      "(pip install -e .) and run kdforge smoke to see the error")
    return passed("smoke", f"kdforge smoke: toy data, tokenizer and model, 5 steps, checkpoint, resume to step "
                  f"{r['global_step']}; loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} in {r['seconds']}s",
                  **{k: r[k] for k in ("global_step", "first_loss", "last_loss", "seconds")})


def _missing_files(folder: Path) -> list[str]:
    names = {p.name for p in folder.iterdir()}
    want = list(ckpt.REQUIRED) + [ckpt.RNG, ckpt.CONFIG] + list(TOKENIZER_FILES)
    if ckpt.ADAPTER_WEIGHTS in names:
        want += [ckpt.ADAPTER_WEIGHTS, "adapter_config.json"]
    else:
        want += [ckpt.MODEL_WEIGHTS, "config.json"]
    return [n for n in want if n not in names]


def _losses(state) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]


def check_training(merged: dict, samples: Path, work: Path, student: Student) -> tuple[Item, dict]:
    """The 5-step run in-process; returns the item and {step: loss} for the resume check."""
    from kdforge.train.runner import run_training

    if student.skip:
        return warned("training", student.skip, student.skip_fix), {}
    out = work / "run"
    data = scratch_training_config(merged, samples, out, student, save_steps=STEPS)
    lines: list[str] = []
    t0 = time.perf_counter()
    try:
        res = run_training(from_dict(data, "preflight training config"), resume="none", log=lines.append)
    except KdforgeError as e:
        return failed("training", f"kdforge train failed on the generated samples: {e}",
                      "fix what the message names in the config, then re-run kdforge preflight --only training"), {}
    seconds = time.perf_counter() - t0
    (work / "train.log").write_text("\n".join(lines) + "\n")
    losses = _losses(res.state)
    last = res.last_checkpoint
    which = student.note or "the configured student"
    nums = dict(steps=res.state.global_step, losses=losses, seconds=round(seconds, 1),
                checkpoint=str(last) if last else None, shrunk=student.note is not None)
    if res.state.global_step != STEPS or not losses:
        return failed("training", f"stopped at step {res.state.global_step} of {STEPS} ({res.reason})",
                      f"see {work / 'train.log'}", **nums), {}
    first, final = losses[0][1], losses[-1][1]
    if not all(math.isfinite(v) for _, v in losses):
        return failed("training", f"loss is not finite: {[v for _, v in losses]}",
                      "lower train.lr, or check the data (kdforge data validate)", **nums), {}
    missing = _missing_files(last) if last else ["the whole checkpoint"]
    evidence = (f"{which}: {len(losses)} logged steps to step {res.state.global_step} "
                f"in {seconds:.1f}s, loss {first:.4f} -> {final:.4f}; {last.name if last else 'no checkpoint'}"
                + (" has every file" if not missing else f" lacks {', '.join(missing)}"))
    if missing:
        return failed("training", evidence, "a checkpoint without these files cannot resume: report this as a "
                      "kdforge bug", **nums), dict(losses)
    if final >= first:
        return warned("training", evidence + " (loss did not fall in 5 steps)",
                      "check train.lr and train.schedule: 5 steps on the same samples should lower it", **nums), \
            dict(losses)
    return passed("training", evidence, **nums), dict(losses)


def check_resume(merged: dict, samples: Path, work: Path, student: Student, reference: dict) -> Item:
    """A real `kdforge train` killed with SIGKILL after its first checkpoint, then resumed with
    `--resume auto` to step 5: same final step, same loss as the uninterrupted run."""
    if student.skip:
        return skipped("resume", "not run: training cannot run here (see the training item)")
    out = work / "killed"
    data = scratch_training_config(merged, samples, out, student, save_steps=1)
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "resume_config.yaml"
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "kdforge", "train", "--config", str(cfg_path)]
    with open(work / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + KILL_TIMEOUT
        while proc.poll() is None and not ckpt.list_checkpoints(out) and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    saved = ckpt.latest_checkpoint(out)
    if rc != -signal.SIGKILL:
        tail = (work / "killed.log").read_text(errors="replace")[-500:]
        return failed("resume", f"the run to be killed ended by itself (exit {rc}) before it could be killed"
                      + (f": {tail}" if rc else ""), f"see {work / 'killed.log'}")
    if saved is None:
        return failed("resume", "killed before any checkpoint was complete", f"see {work / 'killed.log'}")
    killed_at = ckpt.read_state(saved).global_step
    with open(work / "resumed.log", "wb") as log:
        rc = subprocess.run(cmd + ["--resume", "auto"], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    text = (work / "resumed.log").read_text(errors="replace")
    final = ckpt.latest_checkpoint(out)
    state = ckpt.read_state(final) if final else None
    step = state.global_step if state else None
    resumed_line = f"Resuming from checkpoint: {saved.name}" in text
    loss_after = dict(_losses(state)).get(STEPS) if state else None
    ref = reference.get(STEPS)
    same_loss = loss_after is not None and ref is not None and math.isclose(loss_after, ref, rel_tol=1e-3, abs_tol=1e-4)
    evidence = (f"kdforge train SIGKILLed after {saved.name}; kdforge train --resume auto (exit {rc}) "
                f"{'resumed from ' + saved.name if resumed_line else 'did not say it resumed'} and reached step {step}"
                + (f"; loss at step {STEPS}: {loss_after:.4f} resumed vs {ref:.4f} uninterrupted" if
                   loss_after is not None and ref is not None else ""))
    nums = dict(killed_at=killed_at, final_step=step, loss_resumed=loss_after, loss_uninterrupted=ref)
    if rc != 0 or step != STEPS or not resumed_line:
        return failed("resume", evidence, f"see {work / 'resumed.log'}", **nums)
    if ref is not None and not same_loss:
        return warned("resume", evidence + " (the curves differ)",
                      "a resumed run should reproduce the uninterrupted loss: report this with the scratch dir",
                      **nums)
    return passed("resume", evidence, **nums)
