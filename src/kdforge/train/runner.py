"""`kdforge train`: config -> session -> data -> resume -> the loop -> checkpoints.

The run is assembled by `train/session.py` (device, models, optimizer, distributed wrapping,
signals) and named on disk by `train/checkpoint.py`; this file is the entry point's story: lock
the output dir, build the session, read the data, resume, train, report. Under `torchrun` it runs
DDP (gloo on CPU, NCCL on GPU), or FSDP2 with `train.fsdp: true`. SIGINT/SIGTERM finish the
current step, save, and exit 130.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kdforge.config import Config
from kdforge.config_checks import check_config
from kdforge.errors import ConfigError, Interrupted, UsageError
from kdforge.train import checkpoint as ckpt
from kdforge.train.checkpoint import TrainState
from kdforge.train.data_stream import DataStream, check_fingerprint, curriculum
from kdforge.train.loop import Hooks, evaluate_loss, train_steps
from kdforge.train.on_policy import OnPolicy
from kdforge.train.reporters import Reporters, check_installed
from kdforge.train.schedule import train_schedule
from kdforge.train.session import Session, build_session


def steps_per_epoch(n_examples: int, micro: int, accum: int, world: int) -> int:
    return max(1, -(-n_examples // (micro * accum * world)))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume in (None, "", "none", "no"):
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(output_dir)
    p = Path(resume)
    if not ckpt.is_complete(p):
        found = ", ".join(c.name for c in ckpt.list_checkpoints(output_dir)) or "none"
        raise UsageError(f"--resume {p}: not a complete checkpoint folder (complete ones in "
                         f"{output_dir}: {found}); use --resume auto to take the newest")
    return p


def start_checkpoint(resume: str | None, out: Path) -> Path | None:
    """The checkpoint a run starts from (None: a fresh run), or UsageError: a fresh run into a dir
    that holds checkpoints, or a --resume that names no complete checkpoint."""
    start = resolve_resume(resume, out)
    if start is None and ckpt.list_checkpoints(out):
        raise UsageError(f"{out} already holds checkpoints ({ckpt.latest_checkpoint(out).name}); "
                         "continue with --resume auto, or choose a new --output-dir")
    return start


@dataclass
class TrainResult:
    state: TrainState
    output_dir: Path
    reason: str
    last_checkpoint: Path | None


@dataclass
class _Data:
    train: object  # KDDataset
    eval: object | None
    per_epoch: int  # optimizer steps per epoch
    total: int  # optimizer steps of the whole run
    stream: DataStream
    fingerprint: list[dict]  # the training files' {file, size, sha256}, hashed once


# ============================================================================ the run

def run_training(cfg: Config, resume: str | None = "auto", log=print,
                 stop_after: int | None = None) -> TrainResult:
    """Train per `cfg`; returns the final state. Raises ConfigError (2), Interrupted (130).

    `stop_after` ends the run early at that global step (saved), as if interrupted there: the
    schedule still spans the configured total, so a later resume continues the same curve."""
    problems = check_config(cfg, for_run=True)
    if problems:
        raise ConfigError(problems)
    out, t = Path(cfg.io.output_dir), cfg.train
    check_installed(t.report_to)  # before any model loads: a missing tracker package is exit 2 at once
    # One writer per output dir (rank 0 writes for all ranks); taken before any model loads.
    lock = ckpt.OutputDirLock(out).acquire() if int(os.environ.get("RANK", "0")) == 0 else None
    session, in_step, reporters = None, False, Reporters()
    try:
        if lock is not None:  # rank 0, holding the dir: torn saves and an interrupted re-save put right
            ckpt.cleanup_partial(out)  # before anyone lists; a run that cannot start is refused before any
            start_checkpoint(resume, out)  # model loads (minutes for a large one), not after
        session = build_session(cfg)
        rank = session.rank
        session.barrier()
        data = _load_data(cfg, session, log)
        session.set_schedule(train_schedule(t, data.total))

        # ---------------------------------------------------------------- resume
        state = _resume(session, resume, out, data.stream, log, data.fingerprint)
        metrics_path = out / "metrics.jsonl"
        if rank == 0:
            _truncate_metrics(metrics_path, state.global_step)
        reporters = Reporters.open(t.report_to, out, rank=rank, config=cfg.model_dump(mode="json"),
                                   start_step=state.global_step)

        # ---------------------------------------------------------------- train
        progress = _Progress(data.total, state.global_step, log) if rank == 0 else None
        hooks = Hooks(on_log=_metrics_writer(metrics_path, progress, reporters, log) if rank == 0 else None,
                      save=lambda st: _save(session, out, st, log), evaluate=_evaluator(session, data),
                      should_stop=session.stop)
        on_policy = OnPolicy.from_session(session, log)
        n_params, n_train = session.parameter_counts()
        if rank == 0:
            log(f"train: {len(data.train)} examples, {data.total} steps ({data.per_epoch}/epoch), global batch "
                f"{t.micro_batch_size}x{t.grad_accum}x{session.world}, params {n_params:,} ({n_train:,} "
                f"trainable), loss {cfg.loss.kind}, device {session.device}{', bf16' if session.amp_dtype else ''}")
            if on_policy:
                log(on_policy.describe())
        try:
            until = min(data.total, stop_after) if stop_after else data.total
            reason = train_steps(session.objective, session.optimizer, session.scheduler, data.stream, state,
                                 session.loop, until_step=until, seq_len_at=curriculum(t.seq_lengths, data.total),
                                 hooks=hooks, device=session.device, amp_dtype=session.amp_dtype,
                                 on_policy=on_policy)
            in_step = True  # every rank returns from the loop at the same step
        finally:
            if progress:
                progress.close()
            if on_policy:
                on_policy.close()
    finally:
        reporters.close()  # ends the tracker runs (a resume continues them), whatever stopped the run
        if session is not None:
            session.close(in_step)  # every rank leaves the process group, finished or not
        if lock:
            lock.release()

    # ---------------------------------------------------------------- report
    last = ckpt.latest_checkpoint(out)
    if reason == "stopped":
        raise Interrupted(f"stopped by signal at step {state.global_step}; saved {last}; "
                          f"resume with --resume auto")
    if rank == 0:
        log(f"done: step {state.global_step}, last checkpoint {last}")
    return TrainResult(state, out, reason, last)


def _load_data(cfg: Config, session: Session, log) -> _Data:
    """The training (and eval) data on the session's tokenizer, read through the token store (built
    here when missing: every rank asks, one builds, the others wait and map it), and how many steps
    it makes."""
    from kdforge.data.dataset import KDDataset

    t = cfg.train
    # Every step on-policy: the data gives prompts only, its stored top-k (if any) is never used.
    with_topk = session.with_topk and cfg.on_policy.fraction < 1
    optional = bool(cfg.teacher.url)  # teacher.url scores the records that carry no top-k
    max_len = max(t.seq_lengths)
    settings = session.store_settings()
    train_ds = KDDataset(cfg.io.train_shards, tokenizer=session.tokenizer, max_seq_length=max_len,
                         with_topk=with_topk, topk_optional=optional, progress=None if session.rank == 0 else False,
                         settings=settings)
    fingerprint = train_ds.fingerprints  # hashed once, by the store: its key and the checkpoint's
    if session.rank == 0:
        _log_store(train_ds.store_info, log)
        if train_ds.carried.note():
            log(train_ds.carried.note())
    if train_ds.misaligned and session.rank == 0:
        log(f"note: {len(train_ds.misaligned)} of {len(train_ds)} samples' teacher logprobs do not align "
            f"with their tokens (first: {train_ds.misaligned[0]}); they train with CE only")
    eval_ds = (KDDataset(cfg.io.eval_shards, tokenizer=session.tokenizer, max_seq_length=max_len,
                         with_topk=with_topk, topk_optional=optional, progress=False, settings=settings)
               if cfg.io.eval_shards else None)
    stream = DataStream(train_ds, t.micro_batch_size, t.seed, packing=t.packing,
                        max_epochs=None if t.max_steps else t.epochs)
    # Packed, a micro-batch holds as many examples as fill its rows: count them as the stream will.
    micro = stream.micro_batches_per_epoch(max_len) if t.packing else -(-len(train_ds) // t.micro_batch_size)
    per_epoch = steps_per_epoch(micro, 1, t.grad_accum, session.world)
    total = t.max_steps or max(1, int(round(t.epochs * per_epoch)))
    return _Data(train_ds, eval_ds, per_epoch, total, stream, fingerprint)


def _log_store(info, log) -> None:
    if info is None:
        return
    if info.note:
        log(f"note: {info.note}")
    what = f"built in {info.seconds:.1f} s" if info.built else "reused"
    log(f"data: token store {info.path} {what} ({info.tokens:,} tokens)")


def _resume(session: Session, resume: str | None, out: Path, stream: DataStream, log,
            fingerprint: list[dict]) -> TrainState:
    """The state to start from: a fresh one, or the checkpoint `--resume` names, loaded into the
    session and the stream. Refuses to mix with existing checkpoints or with changed data."""
    start = start_checkpoint(resume, out)
    state = TrainState()
    if start is not None:
        check_fingerprint(ckpt.read_state(start).data_fingerprint, fingerprint, start)  # before loading
        state = session.resume(start)
        if state.data_position:
            stream.restore(state.data_position)
        log(f"Resuming from checkpoint: {start.name} (global_step {state.global_step})")
    state.data_fingerprint = fingerprint
    return state


def _save(session: Session, out: Path, state: TrainState, log) -> None:
    path = session.save(out, state, session.cfg.train.save_total_limit)
    if path is not None:
        log(f"saved {path.name}")


def _evaluator(session: Session, data: _Data):
    t = session.cfg.train
    if data.eval is None or not t.eval_steps:
        return None
    return lambda: evaluate_loss(session.objective, lambda: DataStream(data.eval, t.micro_batch_size, 0, name="eval"),
                                 max(t.seq_lengths), t.eval_batches, session.device, session.amp_dtype)


def _metrics_writer(path: Path, progress: "_Progress", reporters: Reporters, log):
    """Rank 0's on_log: one JSON line per record in metrics.jsonl, the same record to the
    train.report_to trackers, and the progress line."""
    def on_log(rec: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({**rec, "time": time.time()}) + "\n")
        reporters.log(rec["step"], rec)
        if "loss" in rec or "loss_on_policy" in rec:  # a training step (on- or off-policy)
            progress.update(rec)
        else:
            log(f"step {rec['step']}: " + " ".join(f"{k}={v}" for k, v in rec.items() if k != "step"))
    return on_log


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the metrics file is one clean curve."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
    from kdforge.atomic import atomic_write_text
    atomic_write_text(path, "".join(k + "\n" for k in keep))


class _Progress:
    """A rich progress line on a terminal (step, loss, tokens/s, ETA); plain log lines otherwise."""

    def __init__(self, total: int, start: int, log):
        self.total, self.log = total, log
        self.t0, self.start = time.perf_counter(), start
        self.bar = None
        if sys.stderr.isatty() and not os.environ.get("CI"):  # CI logs keep plain lines
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, rec: dict) -> None:
        loss, kind = (rec["loss"], "") if "loss" in rec else (rec["loss_on_policy"], " (on-policy)")
        info = f"loss {loss:.4f}{kind} lr {rec['lr']:.2e} {rec.get('tokens_per_s', 0):,.0f} tok/s"
        if self.bar:
            self.bar.update(self.task, completed=rec["step"], info=info)
            return
        done = rec["step"] - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - rec["step"])
        self.log(f"step {rec['step']}/{self.total} {info} eta {eta:.0f}s")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
