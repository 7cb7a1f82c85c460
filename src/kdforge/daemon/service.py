"""The continuous-training daemon: one model, kept loaded, learning from every batch that lands
in `inbox/`.

Setup: lock the base dir, load the tokenizer and the model once, from the newest complete
checkpoint if there is one. Loop: finish a batch left claimed (`inbox/.claimed/`) by a crash, else claim the
oldest settled file; each batch resumes from the newest checkpoint (`Resuming from checkpoint:
checkpoint-N`: global_step, optimizer and scheduler carry over) and trains its own file from its
first example (or, after a crash, from the data position the checkpoint saved: nothing twice,
nothing skipped); checkpoints every `save_steps` and at its end, rotation to `save_total_limit`;
only then does the file leave, and only if it still holds the bytes that were trained (one batch,
start to finish or rollback, is a `ClaimedBatch`: claimed_batch.py). Between
steps and batches: the daily snapshot, consolidation. `.stop`, SIGTERM or SIGINT: finish the step,
save, status `stopped`, return 0.

One file never stops the queue (SPEC "Inbox hygiene"): entries that are no batch are rejected or
named in the log (inbox.py); a batch that fails while loading or training, whatever the exception,
is rolled back to the checkpoint it started from (weights, optimizer, scheduler, RNG, global_step
and the BatchState) and moved to rejected/ with its reason. The daemon's bookkeeping is a
`BatchState` (batch_state.py) saved in every checkpoint.

The run itself (tokenizer, student, teacher, objective, optimizer, open-ended schedule) is a
`Session` (train/session.py), built as `kdforge train` builds its own: `resume` loads a checkpoint,
`save` writes one, `rebuild` puts a new student on a consolidated base. With `daemon.eval_file`
the student is scored on held-out data after every batch and consolidation (heldout.py).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch

from kdforge.config import Config
from kdforge.config_checks import check_config
from kdforge.daemon import consolidate
from kdforge.daemon.batch_state import BatchState
from kdforge.daemon.claimed_batch import ClaimedBatch
from kdforge.daemon.dailylog import DailyLog
from kdforge.daemon.heldout import HeldOut, describe, lowest, status_fields
from kdforge.daemon.infra import InfrastructureError, infrastructure_fault
from kdforge.daemon.inbox import BaseDirLock, batch_files, claim, next_ready, reject, scan, shown
from kdforge.daemon.layout import Layout
from kdforge.daemon.snapshot import list_snapshots, snapshot_due, take_snapshot, time_reached
from kdforge.daemon.status import StatusFile
from kdforge.errors import ConfigError, DataError, KdforgeError
from kdforge.train import checkpoint as ckpt
from kdforge.train.checkpoint import TrainState
from kdforge.train.reporters import Reporters, check_installed
from kdforge.train.schedule import LRMultiplier
from kdforge.train.session import Session, StopFlag, build_session, store_settings

QUEUE_RESCAN_S = 1.0  # how often the inbox is recounted for the status while training
MACHINE_RETRY_MAX_S = 60.0  # longest wait between tries after a full disk (the wait doubles from poll_interval)
UNKNOWN = ("?", -1)  # in_memory after a failed batch: equal to no checkpoint, and not the fresh base either


def _data_faults() -> tuple[type[BaseException], ...]:
    """Failures a batch's data causes without a bug of ours: a non-finite loss, a chat template
    that refuses the messages (Llama/Mistral `raise_exception`), one example too big for memory."""
    from jinja2 import TemplateError

    return (FloatingPointError, TemplateError, MemoryError, torch.OutOfMemoryError)


DATA_FAULTS = _data_faults()


class Daemon:
    """`kdforge daemon`. `now` is the clock for log file names, snapshots and daily
    consolidation (tests pass a fake one); `echo` also prints each log line."""

    def __init__(self, base_dir: str | Path, cfg: Config, *, now: Callable[[], datetime] = datetime.now,
                 echo: Callable[[str], None] | None = None, handle_signals: bool = True,
                 progress: Callable[[dict], None] | None = None):
        self.paths = Layout(Path(base_dir).resolve())
        self.cfg, self.daemon_cfg, self.train_cfg = cfg, cfg.daemon, cfg.train
        self.now = now
        self.handle_signals = handle_signals
        self.progress = progress  # called with the status after every step (the foreground's progress bar)
        self.log = DailyLog(self.paths.logs, now, echo)
        self.status = StatusFile(self.paths.status_file, now)
        self.stop_flag = StopFlag()
        self.seq_len = self.train_cfg.seq_lengths[-1]
        self.session: Session | None = None  # the loaded run: model, optimizer, scheduler (built in _setup)
        self.heldout: HeldOut | None = None  # daemon.eval_file, loaded once
        self.reporters = Reporters()  # train.report_to: one run per base dir, continued on every start
        self.state = TrainState()
        self.batch = BatchState()  # the daemon's bookkeeping, saved in every checkpoint's trainer_state.json
        self.in_memory: tuple[str, int] | None = None  # (checkpoint name, step) the loaded state equals
        self._named: set[str] = set()  # inbox entries already named in the log as no batch
        self._stop_logged = False
        self._told_full = False
        self._queue_checked = 0.0
        self._machine_failures = 0  # tries in a row the machine refused (the wait doubles with each)
        self._waits: dict[str, str] = {}  # what waits for the machine ("batch", "snapshot") -> its last_error
        self._snapshot_failures, self._snapshot_retry_at = 0, 0.0  # a refused snapshot: tries, next try (monotonic)
        self._once = False

    # ============================================================================ run

    def run(self, once: bool = False, lock: BaseDirLock | None = None) -> int:
        """Serve until `.stop` or a signal (or, with `once`, until the inbox is empty). Returns 0.
        `lock`: the base dir lock, if the caller already holds it."""
        own_lock = lock is None
        lock = lock or BaseDirLock(self.paths.lock_file).acquire()  # a second daemon is refused here
        self.paths.make()
        self.paths.stop_file.unlink(missing_ok=True)
        if self.handle_signals:
            self.stop_flag.install()
        self._once = once
        try:
            self.log.info(f"daemon started: pid {os.getpid()}, base dir {self.paths.base}")
            self.status.update(status="starting")
            self._setup()
            while not self.stop_requested():
                self._housekeeping()
                path, wait = self._next_batch()
                if path is not None:
                    self._train_batch(path)
                    continue
                if once and wait is None:  # nothing left, nothing still settling
                    break
                self._idle(wait)
            self.status.update(status="stopped", current_file=None)
            self.log.info(f"daemon stopped at global_step {self.state.global_step} "
                          f"(last checkpoint {self.status.data['last_checkpoint']})")
            return 0
        except KeyboardInterrupt:
            self.log.warning("aborted by a second signal: the step in progress was not saved")
            self.status.update(status="stopped")
            raise
        except BaseException as e:
            machine = infrastructure_fault(e)
            if machine is not None and not isinstance(e, InfrastructureError):
                e = InfrastructureError(f"daemon on {self.paths.base}: {machine}; free disk space (or descriptors), "
                                        "then start it again: it goes on from its newest checkpoint")
            ours = isinstance(e, KdforgeError)  # the message says it all: no traceback
            try:  # a full disk may refuse these too: the error below still reaches the caller, alone
                self._log_quietly(self.log.error, f"daemon failed: {e}", None if ours else e, echo=not ours)
                self.status.update(status="error", last_error=f"{type(e).__name__}: {e}")
            except OSError:
                pass
            if machine is not None:
                raise e from None
            raise
        finally:
            self.reporters.close()
            self.stop_flag.uninstall()
            if own_lock:
                lock.release()

    def _log_quietly(self, write, message: str, exc: BaseException | None = None, echo: bool = False) -> None:
        """Into the day's log only (not echoed): for an error the caller prints itself, once,
        on stderr (the CLI prints every KdforgeError it is raised)."""
        shown_too, self.log.echo = self.log.echo, (self.log.echo if echo else None)
        try:
            write(message, exc)
        finally:
            self.log.echo = shown_too

    def stop_requested(self) -> bool:
        """Whether `.stop` or a signal asked the daemon to stop (logged, and the status set, once)."""
        why = (f"signal {signal.Signals(self.stop_flag.signum).name}" if self.stop_flag()
               else ".stop file" if self.paths.stop_file.exists() else None)
        if why and not self._stop_logged:
            self._stop_logged = True
            self.log.info(f"stop requested ({why}): finishing the current step, saving, exiting")
            self.status.update(status="stopping")
        return why is not None

    def _at_rest(self) -> str:
        """The status between batches: `waiting` while something waits for the machine, else `idle`."""
        return "waiting" if self._waits else "idle"

    def _idle(self, wait: float | None) -> None:
        self.status.update(status=self._at_rest(), current_file=None,
                           batch_queue_size=len(batch_files(self.paths.inbox)))
        deadline = time.monotonic() + min(self.daemon_cfg.poll_interval, wait if wait is not None else math.inf)
        while time.monotonic() < deadline and not self.stop_requested():
            time.sleep(0.05)

    # ============================================================================ setup

    def _setup(self) -> None:
        from kdforge.data.dataset import load_tokenizer

        problems = check_config(self.cfg, for_run=True, job="daemon")
        if problems:
            raise ConfigError(problems)
        check_installed(self.train_cfg.report_to)  # before any model loads
        ckpt.cleanup_partial(self.paths.checkpoints)
        newest = ckpt.latest_checkpoint(self.paths.checkpoints)
        configured = self.configured_base()
        tok_from = self.cfg.io.tokenizer_path or (newest if newest and (newest / "tokenizer_config.json").is_file()
                                                  else configured)
        tokenizer = load_tokenizer(str(tok_from))
        if self.daemon_cfg.eval_file:  # before any model: a bad file stops the start at once
            self.heldout = HeldOut(self.daemon_cfg.eval_file, tokenizer, self.seq_len, self.daemon_cfg.eval_greedy,
                                   settings=store_settings(self.cfg))
            if note := self.heldout.note():
                self.log.info(note)
        if newest is None:
            self.open_session(configured, tokenizer)
            self.log.info(f"no checkpoint in {self.paths.checkpoints}: the first batch starts from "
                          f"{configured} at step 0")
        else:
            self.open_session(self._saved_base(newest), tokenizer)
            self.load_checkpoint(newest)
            base = self.batch.base_model
            if self.batch.generation == 0 and base != configured:
                self.log.warning(f"daemon.base_model is {configured} but {newest.name} was trained on {base}: "
                                 f"continuing on {base} (move current_model/ away to start over)")
            self.log.info(f"loaded {newest.name} (global_step {self.state.global_step}, "
                          f"batch {self.batch.batch_number}, base {base})")
        self._warm_up()
        # Opened at the loaded checkpoint's step: a restart continues the same curves from there.
        self.reporters = Reporters.open(self.train_cfg.report_to, self.paths.base,
                                        config=self.cfg.model_dump(mode="json"), start_step=self.state.global_step)
        left = batch_files(self.paths.claimed)
        if left:
            self.log.info(f"unfinished batch(es) in inbox/.claimed/: {', '.join(shown(p.name) for p in left)}")
        self.status.update(status="idle", current_step=self.state.global_step, base_model=self.session.base_model,
                           generation=self.batch.generation, batch_number=self.batch.batch_number,
                           last_checkpoint=newest.name if newest else None)
        self._log_ready()

    def _log_ready(self) -> None:
        s, dc = self.session, self.daemon_cfg
        held = f", held-out eval on {len(self.heldout)} records of {self.heldout.path}" if self.heldout else ""
        self.log.info(f"model ready on {s.device}: {'LoRA' if self.cfg.model.lora else 'full'} training, "
                      f"{s.parameter_counts()[1]:,} trainable parameters, save_steps {dc.save_steps}, "
                      f"save_total_limit {dc.save_total_limit}, lr {self.train_cfg.lr} ({dc.schedule}){held}")

    def _warm_up(self) -> None:
        """One forward/backward on a dummy example and one chat-template render, so that the
        first batch's first step does not also pay for first-call setup (allocator, kernels,
        template compile). Weights, optimizer and RNG are left exactly as they were."""
        s = self.session
        if getattr(s.tokenizer, "chat_template", None):
            s.tokenizer.apply_chat_template([{"role": "user", "content": "warm up"}],
                                            add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([s.tokenizer("warm up the model", add_special_tokens=False)["input_ids"] or [0]],
                           device=s.device)
        with self._rng_untouched():
            s.model.train()
            s.model(input_ids=ids, labels=ids).loss.backward()
        s.model.zero_grad(set_to_none=True)

    def _rng_untouched(self):
        """A block whose random draws leave the training RNG as it was (resume stays bitwise)."""
        device = self.session.device
        return torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else [])

    def configured_base(self) -> str:
        """The base model folder the config names (daemon.base_model, else model.path), resolved."""
        base = self.daemon_cfg.base_model or self.cfg.model.path
        if not base:
            raise ConfigError([("daemon.base_model", "set the base model folder the daemon trains")])
        return str(Path(base).resolve())

    def _saved_base(self, path: Path) -> str:
        """The base folder checkpoint `path` was trained on."""
        return BatchState.from_extra(ckpt.read_state(path).extra).base_model or self.configured_base()

    def _schedule(self) -> LRMultiplier:
        """Open-ended: total_steps None, so neither kind ever decays."""
        warmup = self.train_cfg.warmup_steps if self.daemon_cfg.schedule == "wsd" else 0
        return LRMultiplier(self.daemon_cfg.schedule, warmup, None)

    def open_session(self, base: str, tokenizer) -> None:
        """A fresh run on `base` at step 0 (seeded as every start is): student, optimizer, schedule."""
        self.session = None  # free the old student before the new one loads
        self.session = build_session(self.cfg, model_path=base, tokenizer=tokenizer, schedule=self._schedule(),
                                     save_steps=self.daemon_cfg.save_steps, install_signals=False)
        self.state = TrainState()
        self.batch = BatchState(base_model=base)
        self.in_memory = None
        self._show_heldout()

    def load_checkpoint(self, path: Path, new_student: bool = False) -> None:
        """Weights, optimizer, scheduler, RNG and state from `path`, on the base it names (a new
        student if that differs from the loaded one, or if `new_student`: the loaded one is spent)."""
        base = self._saved_base(path)
        self.session.rebuild(base_model=base if new_student or base != self.session.base_model else None)
        self.state = self.session.resume(path)  # step count from the checkpoint, shape from the config
        self.batch = BatchState.from_extra(self.state.extra)
        self.in_memory = (path.name, self.state.global_step)
        self._show_heldout()

    # ============================================================================ the inbox

    def _next_batch(self) -> tuple[Path | None, float | None]:
        """A batch left claimed by a crash, else the oldest settled inbox file, claimed."""
        left = batch_files(self.paths.claimed)
        if left:
            return left[0], None
        self._tidy_inbox()
        path, wait = next_ready(self.paths.inbox, self.daemon_cfg.settle_seconds)
        if path is None:
            return None, wait
        claimed = claim(path, self.paths.claimed)
        return (claimed, None) if claimed else (None, 0.05)  # lost a race for it: look again soon

    def _tidy_inbox(self) -> None:
        """SPEC "Inbox hygiene": every inbox entry that is no batch is named in the log (once per
        start); what can be moved goes to rejected/ with its reason; temp-file names wait."""
        for p, why in scan(self.paths.inbox).others:
            name = shown(p.name)
            if why == "temp-file name":
                self._name_once(p, f"{name} in inbox/ is no batch (a temp-file name): left alone until "
                                   "it is renamed to NAME.jsonl")
                continue
            try:
                self._reject(p, f"{name}: a {why}, not a batch: only regular files named *.jsonl (lower "
                                "case) directly in inbox/ are trained; drop the data as such a file")
            except OSError as e:
                self._name_once(p, f"{name} in inbox/ ({why}) cannot be moved to rejected/ "
                                   f"({e.strerror}); skipped: remove it")

    def _name_once(self, path: Path, message: str) -> None:
        if path.name not in self._named:
            self._named.add(path.name)
            self.log.warning(message)

    def queue_size(self, force: bool = False) -> int:
        """Batches waiting in inbox/, recounted at most every QUEUE_RESCAN_S unless `force`."""
        if force or time.monotonic() - self._queue_checked > QUEUE_RESCAN_S:
            self._queue_checked = time.monotonic()
            self.status.data["batch_queue_size"] = len(batch_files(self.paths.inbox))
        return self.status.data["batch_queue_size"]

    def _reject(self, path: Path, reason: str, name: str | None = None) -> None:
        dest = reject(path, self.paths.rejected, reason, name)
        first = reason.splitlines()[0] if reason.strip() else ""
        self.log.warning(f"rejected {shown(name or path.name)} -> {shown(str(dest))} "
                         f"(reason in {shown(dest.name)}.reason): {first}")

    # ============================================================================ one batch

    def _train_batch(self, path: Path) -> None:
        """Train one claimed file. Whatever goes wrong with it (its data, or a bug its data
        triggers), the batch is rolled back to the checkpoint it started from and rejected with
        the reason: one file never stops the queue."""
        batch = ClaimedBatch(self, path)
        try:
            finished = batch.train()
        except Exception as e:  # noqa: BLE001 - see the docstring; a bug of ours still logs its traceback
            machine = infrastructure_fault(e)
            if machine is not None:  # a full disk, no descriptors: the data is fine, keep it
                self._machine_refused(batch.name, machine)
            elif isinstance(e, KdforgeError) and not isinstance(e, DataError):
                raise  # the config or the base dir, not this file: the daemon cannot go on
            elif isinstance(e, DataError):
                self._fail(batch, str(e), None)
            else:
                self._fail(batch, f"{type(e).__name__}: {e}", e)
        else:
            self._machine_failures = 0
            self._wait_over("batch")
            # Outside the try: once the file has left the inbox its batch is saved for good, so
            # nothing after it (consolidation) may roll that batch back or reject a file that is gone.
            if finished:
                self._after_batch()

    def _machine_refused(self, name: str, why: str) -> None:
        """The machine failed the batch (disk full, I/O error, no descriptors): not the file's
        fault, so it stays claimed and nothing is rolled back or deleted. The status says
        `waiting` and why, and names only a checkpoint that is on disk; after a wait (doubling
        from poll_interval up to a minute) the batch is tried again from the newest checkpoint,
        which is loaded again (memory holds the steps the failed save lost). `--once`: stop (exit 1)."""
        newest = ckpt.latest_checkpoint(self.paths.checkpoints)
        self.in_memory = UNKNOWN
        self._machine_failures += 1
        wait = self._retry_wait(self._machine_failures)
        since = newest.name if newest else "the fresh base"
        reason = (f"{why} (the machine's fault, not the data's: {shown(name)} stays in inbox/.claimed/ and "
                  f"trains again from {since})")
        if self._once:
            raise InfrastructureError(f"{shown(name)}: {reason}; free disk space (or descriptors), then run again")
        self._note(self.log.error, f"cannot go on with {shown(name)}: {reason}; retrying in {wait:.1f}s")
        self._waits["batch"] = f"waiting: {reason}"
        try:
            saved = ckpt.read_state(newest) if newest else TrainState()  # what the next try starts from
            self.reporters.rewind(saved.global_step)  # the lost steps leave the curves
            self.status.update(status="waiting", current_file=None, last_error=self._waits["batch"],
                               last_checkpoint=newest.name if newest else None, current_step=saved.global_step,
                               batch_number=BatchState.from_extra(saved.extra).batch_number)
        except OSError:
            pass  # the status cannot be written either: the log line (or stdout) says it
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self.stop_requested():
            time.sleep(0.05)
        if not self.stop_requested():
            self._note(self.log.info, f"retrying {shown(name)} from {since}")

    def _retry_wait(self, failures: int) -> float:
        """Seconds to wait after `failures` refusals in a row: doubling from poll_interval, at most a minute."""
        return min(MACHINE_RETRY_MAX_S, self.daemon_cfg.poll_interval * 2 ** min(failures, 16))

    def _wait_over(self, what: str) -> None:
        """`what` ("batch", "snapshot") was written after waiting for the machine: its `waiting: ...`
        leaves last_error (which names what still waits, if anything) for last_wait, with the time."""
        reason = self._waits.pop(what, None)
        if reason is None:
            return
        self.log.info(f"wait over: the {what} the machine refused is written")
        ended = self.now().isoformat(timespec="seconds")
        still = next(reversed(self._waits.values()), None)
        self.status.update(last_error=still, last_wait=f"waited until {ended}: {reason.removeprefix('waiting: ')}")

    def _note(self, write, message: str) -> None:
        """A log line that a full disk cannot turn into a second failure: printed when it cannot be written."""
        try:
            write(message)
        except OSError:
            if self.log.echo:
                self.log.echo(message)

    def _fail(self, batch: ClaimedBatch, reason: str, exc: Exception | None) -> None:
        """Roll the failed batch back (if it trained past its start) and move its file to rejected/."""
        name = batch.name
        if exc is not None:
            ours = not isinstance(exc, DATA_FAULTS)  # e.g. an AttributeError: a bug the data triggered
            (self.log.error if ours else self.log.warning)(f"batch {shown(name)} failed in training: {reason}", exc)
        rolled = batch.owns_loaded_state()
        if rolled:
            batch.roll_back()
        back = (f"\nRolled back: the model, optimizer, scheduler and RNG are as before this batch "
                f"(global_step {self.state.global_step})." if rolled else "")
        self._reject(batch.path, reason + back, name)
        self._wait_over("batch")  # it waited for the disk, then its data failed: done with either way
        newest = ckpt.latest_checkpoint(self.paths.checkpoints)  # the batch's own are gone: never name one
        self.status.update(status=self._at_rest(), current_file=None, current_step=self.state.global_step,
                           last_checkpoint=newest.name if newest else None)

    def save(self, state: TrainState) -> None:
        """A checkpoint of the loaded state with the BatchState in it; the status and log name it."""
        t0 = time.perf_counter()
        state.extra = self.batch.into_extra(state.extra)
        path = self.session.save(self.paths.checkpoints, state, self.daemon_cfg.save_total_limit)
        self.in_memory = (path.name, state.global_step)
        self.log.info(f"Saved checkpoint: {path.name} ({time.perf_counter() - t0:.2f}s)")
        self.status.update(last_checkpoint=path.name)
        self._snapshot_if_due()

    def evaluate(self, after: str) -> None:
        """Score the held-out data (daemon.eval_file) into log_history, the status and the log."""
        if self.heldout is None:
            return
        s, b = self.session, self.batch
        with self._rng_untouched():
            rec = self.heldout.score(s.model, s.teacher, s.device, self.state.global_step, after)
        self.state.log_history.append(rec)
        self.reporters.log(rec["step"], rec)
        b.heldout_first = b.heldout_first or rec
        b.heldout_best = lowest(b.heldout_best, rec)
        self.log.info(describe(rec, b.heldout_first) + f", {rec['eval_seconds']:.1f}s")
        self._show_heldout()

    def _show_heldout(self) -> None:
        if self.heldout is not None:
            self.status.update(**status_fields(self.state.log_history, self.batch.heldout_first))

    def _after_batch(self) -> None:
        self.status.update(status=self._at_rest(), current_file=None, batch_queue_size=self.queue_size(force=True))
        every = self.daemon_cfg.consolidate_every_batches
        if every and self.batch.batch_number % every == 0:
            self._consolidate(f"every {every} batch(es)")

    # ============================================================================ snapshots, consolidation

    def _housekeeping(self) -> None:
        self._snapshot_if_due()
        now = self.now()
        if (self.daemon_cfg.consolidate_daily and time_reached(now, self.daemon_cfg.snapshot_time)
                and self.batch.consolidated_on != f"{now:%Y%m%d}"):
            self._consolidate("daily")

    def _snapshot_if_due(self) -> None:
        now = self.now()
        day = snapshot_due(now, self.daemon_cfg.snapshot_time, self.paths.snapshots)
        newest = ckpt.latest_checkpoint(self.paths.checkpoints)
        if day is None or newest is None or time.monotonic() < self._snapshot_retry_at:
            return
        try:
            path = take_snapshot(newest, self.paths.snapshots, day, self.daemon_cfg.snapshot_keep, now)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is the machine's
            why = infrastructure_fault(e)
            if why is None:
                raise
            self._snapshot_refused(f"snapshot {day} of {newest.name}", why)
            return
        self._snapshot_failures, self._snapshot_retry_at = 0, 0.0
        self.log.info(f"snapshot {path.name}: {newest.name} -> {path}")
        self.status.update(last_snapshot=path.name)
        self._wait_over("snapshot")

    def _snapshot_refused(self, what: str, why: str) -> None:
        """The disk refused the day's snapshot (take_snapshot left nothing of it): the daemon goes on
        training, the status says `waiting` and why, and the snapshot is tried again after a wait
        that doubles from poll_interval up to a minute (at the next start, with `--once`)."""
        self._snapshot_failures += 1
        wait = self._retry_wait(self._snapshot_failures)
        self._snapshot_retry_at = time.monotonic() + wait
        self._waits["snapshot"] = (f"waiting: {what} could not be written in {self.paths.snapshots}: {why} "
                                   f"(the machine's fault: nothing of it was kept, the checkpoints are untouched)")
        try:
            self.status.update(last_error=self._waits["snapshot"])
        except OSError:
            pass  # the status cannot be written either: the log line (or stdout) says it
        self._note(self.log.error, f"{self._waits['snapshot'].removeprefix('waiting: ')}; retrying in {wait:.1f}s")

    def _consolidate(self, why: str) -> None:
        """Merge the adapter into a new base (bases/gen-K), continue with a fresh adapter on it;
        global_step, the scheduler position and the loss curve go on unbroken."""
        b, step = self.batch, self.state.global_step
        if not ckpt.is_peft(self.session.model):
            if not self._told_full:
                self.log.info("consolidation skipped: full training has no adapter to merge")
                self._told_full = True
            return
        if b.consolidated_step == step or step == 0:
            b.consolidated_on = f"{self.now():%Y%m%d}"
            return  # nothing trained since the last merge
        self.status.update(status="consolidating")
        gen = b.generation + 1
        out = self.paths.bases / f"gen-{gen:04d}"
        old_base, t0 = self.session.base_model, time.perf_counter()
        try:
            diff = self._merge_into(out, gen)
        except Exception as e:  # noqa: BLE001 - fall back to the previous base, which is untouched
            self.log.error(f"consolidation failed ({e}); continuing on {old_base}", e)
            shutil.rmtree(out, ignore_errors=True)
            self.load_checkpoint(ckpt.latest_checkpoint(self.paths.checkpoints), new_student=True)
            self.status.update(status=self._at_rest())
            return
        b.base_model, b.generation, b.consolidated_step = str(out), gen, step
        b.consolidated_on = f"{self.now():%Y%m%d}"
        b.consolidations.append({"generation": gen, "step": step, "base_model": str(out)})
        self.evaluate(f"consolidation {gen}")
        self.save(self.state)  # replaces checkpoint-{step}: same step, new base, fresh adapter
        holders = ckpt.list_checkpoints(self.paths.checkpoints) + list_snapshots(self.paths.snapshots)
        gone = consolidate.prune_bases(self.paths.bases, {str(out)}, holders)
        self.log.info(f"Consolidated ({why}): adapter merged into {out} at global_step {step} "
                      f"(max |logit diff| {diff:.2e}, {time.perf_counter() - t0:.1f}s); previous base {old_base} "
                      f"kept while checkpoints name it" + (f"; removed {', '.join(g.name for g in gone)}" if gone else ""))
        self.status.update(status=self._at_rest(), base_model=str(out), generation=gen)

    def _merge_into(self, out: Path, gen: int) -> float:
        """Write base + adapter merged into `out`, load it with a fresh adapter and a fresh
        optimizer (Adam moments belonged to the old adapter; the lr schedule goes on), and check
        that it computes what base + adapter did. The max |logit diff|; raises if it differs."""
        s = self.session
        probe = consolidate.probe_ids(s.model.get_input_embeddings().num_embeddings, s.device)
        ref = consolidate.logits(s.model, probe)
        out.parent.mkdir(parents=True, exist_ok=True)
        consolidate.merge_into_folder(s.model, out, s.tokenizer)  # the PEFT wrapper is spent after this
        torch.manual_seed(self.train_cfg.seed + gen)  # the new adapter's initialisation
        s.rebuild(base_model=str(out))
        ok, diff = consolidate.same_outputs(ref, consolidate.logits(s.model, probe))
        if not ok:
            raise RuntimeError(f"merged model's logits differ by {diff:.3g} from base + adapter")
        return diff
