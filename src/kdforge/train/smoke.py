"""`kdforge smoke`: the seed's `make smoke_training`, end to end on toy parts in seconds.

Toy data -> toy tokenizer -> toy model -> 5 steps -> checkpoint -> resume -> 10 steps, then check
that the resumed run continued (global_step 10, loss finite, every checkpoint file present).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from kdforge.config import from_dict
from kdforge.data.tokenizer import train_tokenizer
from kdforge.data.toy import toy_records
from kdforge.errors import KdforgeError
from kdforge.train import checkpoint as ckpt
from kdforge.train.runner import run_training


def smoke_config(work: Path, max_steps: int) -> dict:
    return {
        "model": {"preset": "toy"},
        "io": {"tokenizer_path": str(work / "tokenizer"), "train_shards": [str(work / "toy.jsonl")],
               "eval_shards": [str(work / "toy_eval.jsonl")], "output_dir": str(work / "checkpoints")},
        "loss": {"kind": "ce"},
        "train": {"micro_batch_size": 4, "grad_accum": 2, "seq_lengths": [64], "max_steps": max_steps,
                  "lr": 3e-3, "warmup_steps": 2, "save_steps": 5, "save_total_limit": 3,
                  "eval_steps": 5, "eval_batches": 2, "seed": 0},
    }


def run_smoke(workdir: str | Path | None = None, log=print) -> dict:
    """Run the smoke test in `workdir` (kept), or in a temp dir removed when it passes (kept, and
    named in the error, when it fails: its files are the evidence)."""
    if workdir:
        return _smoke(Path(workdir), log)
    work = Path(tempfile.mkdtemp(prefix="kdforge-smoke-"))
    try:
        result = _smoke(work, log)
    except BaseException:
        log(f"smoke: kept {work} (the failed run's files)")
        raise
    shutil.rmtree(work, ignore_errors=True)
    log(f"smoke: removed the temp dir {work} (--workdir DIR keeps the data, tokenizer and checkpoints)")
    return result


def _smoke(work: Path, log) -> dict:
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    rows = toy_records(200, seed=0)
    (work / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:160]))
    (work / "toy_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[160:]))
    texts = [t for r in rows for t in (r["prompt"], r["teacher_text"])]
    train_tokenizer(texts, 384, work / "tokenizer", min_frequency=1)
    log(f"smoke: toy data (200 records), tokenizer and config in {work}")

    first = run_training(from_dict(smoke_config(work, 10), "smoke"), resume="none", log=log,
                         stop_after=5)
    if first.state.global_step != 5:
        raise KdforgeError(f"smoke: expected to stop at step 5, got {first.state.global_step}")
    log("smoke: stopped at step 5; resuming")
    second = run_training(from_dict(smoke_config(work, 10), "smoke"), resume="auto", log=log)
    st = second.state
    last = ckpt.latest_checkpoint(work / "checkpoints")
    problems = []
    if st.global_step != 10:
        problems.append(f"global_step {st.global_step} != 10")
    if last is None or ckpt.read_state(last).global_step != 10:
        problems.append("no checkpoint-10")
    losses = [h["loss"] for h in st.log_history if "loss" in h]
    if not losses or losses[-1] >= losses[0]:
        problems.append(f"loss did not decrease ({losses[:1]} -> {losses[-1:]})")
    if problems:
        raise KdforgeError("smoke failed: " + "; ".join(problems))
    result = {"workdir": str(work), "global_step": st.global_step, "first_loss": losses[0],
              "last_loss": losses[-1], "checkpoint": str(last), "seconds": round(time.perf_counter() - t0, 1)}
    log(f"smoke ok: 10 steps (5 + resume 5), loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"{result['seconds']}s, checkpoints in {work / 'checkpoints'}")
    return result
