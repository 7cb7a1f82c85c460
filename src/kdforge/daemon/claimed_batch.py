"""One batch of the daemon: a claimed inbox file, from its load to its file leaving the inbox.

`ClaimedBatch.train` reads the file once (`load`), finds where to start (`resume_point`: a new
batch, the data position of one a crash or a stop cut short, or a batch saved already whose file
had not left yet), trains it to its end or a stop request, saving every `save_steps` and at the
end, and only then lets the file go (`finish_file`: deleted or archived, and only if it still
holds the bytes that were trained). `roll_back` undoes a failed batch: its checkpoints go, the one
it started from (kept as hard links in `.batch_start/` by `keep_start`) is loaded again.

What stays with the `Daemon` (service.py): the loaded session and its state, saving and
evaluating, the status and the log, and what to do when a batch fails.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from kdforge.daemon.batch_state import BatchState
from kdforge.atomic import atomic_write_text
from kdforge.daemon.inbox import (Fingerprint, batch_fingerprint, claim_parts, fingerprint, move_to, read_batch,
                                  shown)
from kdforge.errors import DataError
from kdforge import checkpoint_layout as layout
from kdforge.checkpoint_layout import TrainState
from kdforge.train.data_stream import DataStream
from kdforge.train.loop import Hooks, train_steps
from kdforge.train.on_policy import OnPolicy

if TYPE_CHECKING:
    from kdforge.daemon.service import Daemon

PROMPT_ONLY_REFUSED = ("a prompt with no answer (a prompt-only line): the daemon trains such lines on-policy only "
                       "(the student answers, the teacher scores): configure on_policy (on_policy.fraction > 0 "
                       "with teacher.path or teacher.url), or add the teacher's answer (teacher_text, completion)")
MAX_LINES_NAMED = 20  # bad lines of one file named in the log and its reason; a million would drown both
INDEX_NAME = "batch-index.json"  # in BASE/.store/: what parsing the batch whose store is kept there found
PARSED = {"n": 0}  # batch files parsed into records in this process: tests count them (a restart maps the store)


def batch_steps(n_examples: int, epochs: float, micro_batch: int, grad_accum: int) -> int:
    """Optimizer steps one batch file takes (the stream draws ceil(epochs * n) examples)."""
    micro_batches = math.ceil(math.ceil(epochs * n_examples) / micro_batch)
    return math.ceil(micro_batches / grad_accum)


class Resume(Enum):
    """How a claimed batch starts, as read from the newest checkpoint."""

    NEW = "new"  # no checkpoint of this claim: a batch of its own begins at the loaded step
    CONTINUE = "continue"  # a checkpoint of this claim, cut short (a crash, a stop): go on from it
    SAVED = "saved"  # this claim was trained and saved already; only its file had not left the inbox


@dataclass(frozen=True)
class ResumePoint:
    how: Resume
    data_position: dict = field(default_factory=dict)  # CONTINUE: where the stream stopped ({}: its start)


@dataclass
class BatchIndex:
    """What parsing a claimed batch found, kept beside its store (BASE/.store/INDEX_NAME) so that a
    restart mid-batch needs neither parse nor tokenise it: the claim's file name and the bytes read,
    whether prompt-only lines were refused (no on_policy), whether any record has an answer, which
    records (in store order) are prompts only, and the bad lines as (line, message). Bytes per
    record, never the records."""

    file: str
    size: int
    sha256: str
    refused: bool
    answered: bool
    n_records: int
    prompt_only: list[int]
    problems: list[tuple[int | None, str]]

    @classmethod
    def of(cls, file: str, fp: Fingerprint, refused: bool, records: list, problems: list) -> "BatchIndex":
        from kdforge.data.store import bare_message

        return cls(file, fp.size, fp.sha256, refused, any(not r.prompt_only for r in records), len(records),
                   [i for i, r in enumerate(records) if r.prompt_only], [(p.line, bare_message(p)) for p in problems])

    @classmethod
    def read(cls, root: Path) -> "BatchIndex | None":
        try:
            raw = json.loads((root / INDEX_NAME).read_text(encoding="utf-8"))
            return cls(**{**raw, "problems": [tuple(p) for p in raw["problems"]]})
        except (OSError, ValueError, TypeError, KeyError):
            return None  # none, or not one this daemon wrote: the batch is parsed

    def write(self, root: Path) -> None:
        atomic_write_text(root / INDEX_NAME, json.dumps(asdict(self), ensure_ascii=False))

    def errors(self, name: str) -> list[DataError]:
        return [DataError(msg, name, line) for line, msg in self.problems]

    def store_fingerprint(self) -> dict:
        """The store's key file entry: named by the claim, as the daemon names it."""
        return {"file": shown(claim_parts(Path(self.file))[1]), "size": self.size, "sha256": self.sha256}


class ClaimedBatch:
    """The claimed file `path` (in inbox/.claimed/), trained by `daemon`'s loaded session."""

    def __init__(self, daemon: "Daemon", path: Path):
        self.daemon = daemon
        self.path = path
        self.claim_id, self.name = claim_parts(path)
        self.stream: DataStream | None = None
        self.start = 0  # the global step this batch began at
        self.first_loss: float | None = None

    def owns_loaded_state(self) -> bool:
        """Whether the loaded state is this claim's (trained past its start): a failure must roll it back."""
        return self.claim_id is not None and self.daemon.batch.claim_id == self.claim_id

    # ============================================================================ train

    def train(self) -> bool:
        """Train the batch; True when it is trained, saved and its file has left the inbox,
        False when a stop request cut it short (it goes on from its checkpoint next time)."""
        d, name, t0 = self.daemon, self.name, time.perf_counter()
        ds, fp = self.load()
        point = self.resume_point(fp)
        st, b = d.state, d.batch
        if point.how is Resume.SAVED:  # died after the final save, before the file left
            how = self.finish_file()
            d.log.info(f"{shown(name)} was already trained ({layout.checkpoint_name(st.global_step)}); file {how}")
            return True
        if point.how is Resume.NEW:
            self.begin(fp)
        self.stream = self._open_stream(ds, point.data_position)
        n_steps = batch_steps(len(ds), d.daemon_cfg.epochs_per_batch, d.train_cfg.micro_batch_size,
                              d.train_cfg.grad_accum)
        self.start, end = b.batch_start_step, b.batch_start_step + n_steps
        where = (f"continuing at step {st.global_step} (example {point.data_position['consumed']} of the batch)"
                 if point.data_position else f"global steps {self.start} -> {end}")
        kind = ", prompts only: every step on-policy" if ds.prompts_only else ""
        d.log.info(f"Batch {b.batch_number} start: {shown(name)} ({len(ds)} examples, "
                   f"{len(ds.problems)} bad lines skipped{kind}), {n_steps} steps, {where}")
        d.status.update(status="training", current_file=shown(name), batch_number=b.batch_number,
                        current_step=st.global_step, total_steps=end, batch_step=st.global_step - self.start,
                        batch_steps=n_steps, batch_queue_size=d.queue_size(force=True))
        self.run_steps(ds.prompts_only)
        if not self.stream.exhausted():
            d.log.info(f"Batch {b.batch_number} interrupted at step {st.global_step}: {shown(name)} stays in "
                       "inbox/.claimed/ and continues from its saved data position on the next start")
            return False
        how = self.finish_file()
        # The batch's last training record (not an eval one), on- or off-policy as its first: a batch of
        # prompts alone logs loss_on_policy only, and "loss" would be an earlier batch's or none.
        last = next((h.get("loss", h.get("loss_on_policy")) for h in reversed(st.log_history)
                     if "loss" in h or "loss_on_policy" in h), float("nan"))
        first = self.first_loss if self.first_loss is not None else float("nan")
        d.log.info(f"Batch {b.batch_number} done: {shown(name)}, global_step {st.global_step}, "
                   f"loss {first:.4f} -> {last:.4f}, {time.perf_counter() - t0:.1f}s; file {how}")
        return True

    def begin(self, fp: Fingerprint) -> None:
        """A new batch at the loaded step: its rollback point kept, its number and file recorded."""
        d = self.daemon
        self.keep_start()
        b, step = d.batch, d.state.global_step
        b.batch_number += 1
        b.batch_file, b.claim_id, b.batch_sha256, b.batch_bytes = self.name, self.claim_id, fp.sha256, fp.size
        b.batch_done, b.batch_start_step = False, step
        b.batches.append({"number": b.batch_number, "file": self.name, "start_step": step})

    def _open_stream(self, ds, position: dict) -> DataStream:
        d = self.daemon
        stream = DataStream(ds, d.train_cfg.micro_batch_size, d.train_cfg.seed + d.batch.batch_number,
                            max_epochs=d.daemon_cfg.epochs_per_batch, name=shown(self.name))
        if position:
            stream.restore(position)
        return stream

    def run_steps(self, prompts_only: bool = False) -> None:
        """Train the stream to its end (or a stop request), saving as configured.
        `prompts_only`: a batch of prompts alone, trained on-policy at every step."""
        d = self.daemon
        s = d.session
        # Built per batch: a consolidation gives the session a new student, which the sampler must use.
        on_policy = OnPolicy.from_session(s, d.log.info, state_dir=d.paths.base / "on_policy",
                                          fraction=1.0 if prompts_only else None)
        try:
            train_steps(s.objective, s.optimizer, s.scheduler, self.stream, d.state, s.loop, until_step=None,
                        seq_len_at=lambda step: d.seq_len, device=s.device, amp_dtype=s.amp_dtype,
                        hooks=Hooks(on_log=self.on_log, on_step=self.on_step, save=self.save,
                                    should_stop=d.stop_requested),
                        on_policy=on_policy)
        finally:
            if on_policy is not None:
                on_policy.close()

    def on_log(self, rec: dict) -> None:
        """A step's metrics record: into the log and the reporters; the batch's first loss kept."""
        loss = rec.get("loss", rec.get("loss_on_policy"))  # an on-policy step logs its own quantity
        self.first_loss = loss if self.first_loss is None else self.first_loss
        policy = (f" on-policy ({rec.get('answer_tokens', 0)} answer tokens scored by the teacher"
                  + (f", ${rec['teacher_usd']:.6f}" if rec.get("teacher_usd") else "") + ")"
                  if rec.get("on_policy") else "")
        self.daemon.log.info(f"step {rec['step']} loss {loss:.4f} lr {rec['lr']:.3g} "
                             f"{rec.get('tokens_per_s', 0):,.0f} tok/s{policy}")
        self.daemon.reporters.log(rec["step"], rec)

    def on_step(self, state: TrainState, rec: dict) -> None:
        """After every optimizer step: the status (and the foreground's progress bar)."""
        d = self.daemon
        d.status.update(current_step=state.global_step, batch_step=state.global_step - self.start,
                        loss=rec.get("loss", rec.get("loss_on_policy")), learning_rate=rec["lr"],
                        tokens_per_s=rec.get("tokens_per_s", d.status.data["tokens_per_s"]),
                        batch_queue_size=d.queue_size())
        if d.progress:
            d.progress(d.status.data)

    def save(self, state: TrainState) -> None:
        """A checkpoint of this batch; the last one (the stream drained) says the batch is done
        and carries its held-out score, so that a rollback takes both back."""
        d = self.daemon
        d.batch.batch_done = self.stream.exhausted()
        if d.batch.batch_done:
            d.evaluate(f"batch {d.batch.batch_number}")
        d.save(state)

    # ============================================================================ load, resume point

    def load(self):
        """The claimed file as a dataset, read once through a checked descriptor, and its
        fingerprint. Prompt-only lines (a prompt, no answer) train on-policy only: without
        `on_policy` they are bad lines that say so. A restart mid-batch finds the batch's store and
        its `BatchIndex` kept by these very bytes and parses nothing: the store is mapped again."""
        from kdforge.data.dataset import KDDataset
        from kdforge.train.on_policy import without_answers

        d, name = self.daemon, self.name
        session, refused = d.session, d.cfg.on_policy.fraction <= 0
        root = d.paths.base / ".store"
        # as kdforge train's; whether prompt-only lines are refused decides which records the store
        # holds, so it is in the key (on_policy switched off in the same BASE must not map the old one)
        settings = {**session.store_settings(prompt_only=True), "prompt_only_refused": refused}
        index, records = self._kept_index(root, refused, settings), []
        if index is None:
            records, problems, fp = read_batch(self.path, shown(name), d.daemon_cfg.max_batch_bytes, prompt_only=True)
            PARSED["n"] += 1
            if refused and any(r.prompt_only for r in records):
                problems = sorted(problems + [DataError(PROMPT_ONLY_REFUSED, shown(name), r.line)
                                              for r in records if r.prompt_only], key=lambda e: e.line or 0)
                records = [r for r in records if not r.prompt_only]
            index = BatchIndex.of(self.path.name, fp, refused, records, problems)
        self._name_problems(index.errors(shown(name)), index.n_records)
        # Kept in BASE/.store/ by the bytes read: a restart mid-batch maps it instead of tokenising again.
        ds = KDDataset(self.path, tokenizer=session.tokenizer, max_seq_length=d.seq_len,
                       with_topk=self._with_topk(index), strict=False, records=records,
                       topk_optional=bool(session.cfg.teacher.url),  # teacher.url scores the rest
                       settings=settings, store_dir=root, fingerprints=[index.store_fingerprint()])
        if records:
            index.write(root)
        ds.problems = index.errors(shown(name))
        ds.prompts_only = without_answers(ds, index.prompt_only) == index.n_records
        return ds, Fingerprint(index.size, index.sha256)

    def _with_topk(self, index: "BatchIndex") -> bool:
        """Stored top-k only serve off-policy steps: none when every step is on-policy (as kdforge train)."""
        return self.daemon.session.with_topk and self.daemon.cfg.on_policy.fraction < 1 and index.answered

    def _kept_index(self, root: Path, refused: bool, settings: dict) -> "BatchIndex | None":
        """The index kept for this claim's current bytes, parsed under the same refusal of prompt-only
        lines, whose store exists; None otherwise (then the file is parsed). Hashes the file only when
        an index of this claim and size is there (a new batch is read once)."""
        from kdforge.data import store as st

        index = BatchIndex.read(root)
        if index is None or index.file != self.path.name or index.refused != refused:
            return None
        try:
            if self.path.lstat().st_size != index.size:
                return None
        except OSError:
            return None
        fp = batch_fingerprint(self.path, self.daemon.daemon_cfg.max_batch_bytes)
        if (fp.size, fp.sha256) != (index.size, index.sha256):
            return None
        key = st.store_key([index.store_fingerprint()], st.tokenizer_fingerprint(self.daemon.session.tokenizer),
                           self._with_topk(index), st.merged_settings(settings))
        return index if (root / key / "meta.json").is_file() else None

    def _name_problems(self, problems: list, n_records: int) -> None:
        """The first bad lines into the log; no usable line at all fails the batch, naming them."""
        log = self.daemon.log
        for problem in problems[:MAX_LINES_NAMED]:
            log.warning(f"skipped bad line {problem}")
        more = (f"\n... and {len(problems) - MAX_LINES_NAMED} more bad lines (kdforge data validate lists them all)"
                if len(problems) > MAX_LINES_NAMED else "")
        if more:
            log.warning(more.strip())
        if not n_records:
            reasons = "\n".join(str(p) for p in problems[:MAX_LINES_NAMED]) + more or f"{shown(self.name)}: no records"
            raise DataError(f"no usable line in {shown(self.name)} ({len(problems)} bad):\n{reasons}")

    def resume_point(self, fp: Fingerprint) -> ResumePoint:
        """Load the newest checkpoint if memory differs, and say how this claim starts from it."""
        d, claim_id, name = self.daemon, self.claim_id, self.name
        newest = layout.latest_checkpoint(d.paths.checkpoints)
        if newest is None:
            if d.in_memory is not None:  # trained past the fresh base by a batch that failed
                d.open_session(d.configured_base(), d.session.tokenizer)
            return ResumePoint(Resume.NEW)
        saved_state = layout.read_state(newest)
        saved = BatchState.from_extra(saved_state.extra)
        same = (saved.claim_id == claim_id if claim_id is not None  # no id: claimed by an older daemon
                else saved.claim_id is None and (saved.batch_file, saved.batch_sha256) == (name, fp.sha256))
        if d.in_memory != (newest.name, saved_state.global_step):
            d.load_checkpoint(newest)
        if same and (saved.batch_sha256, saved.batch_bytes) not in ((fp.sha256, fp.size), (fp.sha256, None)):
            raise DataError(f"changed since it was claimed (now {fp.size:,} bytes, {saved.batch_bytes} when "
                            "training began); the batch was rolled back and the file kept whole: drop it "
                            "again when it is complete", shown(name))
        if same and saved.batch_done:
            return ResumePoint(Resume.SAVED)
        d.log.info(f"Resuming from checkpoint: {newest.name}")
        return ResumePoint(Resume.CONTINUE, d.state.data_position) if same else ResumePoint(Resume.NEW)

    # ============================================================================ finish, roll back

    def finish_file(self) -> str:
        """The batch is saved: the file leaves the inbox (deleted, or archived), unless it is not
        the file that was trained (a writer went on after the claim): then nothing is deleted."""
        d, name = self.daemon, self.name
        now, b = fingerprint(self.path), d.batch
        if (now.size, now.sha256) != (b.batch_bytes, b.batch_sha256):
            raise DataError(f"changed after it was claimed (a writer went on writing): {b.batch_bytes:,} bytes "
                            f"were trained, it now holds {now.size:,}; the batch was rolled back and the file "
                            "kept whole: write it elsewhere, then move it into inbox/ when complete", shown(name))
        if d.daemon_cfg.delete_processed:
            self.path.unlink()
            return "deleted"
        archive = d.daemon_cfg.archive_dir
        dest = move_to(self.path, Path(archive) if archive else d.paths.processed, name)
        return f"archived to {shown(str(dest))}"

    def keep_start(self) -> None:
        """Hard-link the checkpoint this batch starts from into .batch_start/ (its rollback point)."""
        paths = self.daemon.paths
        shutil.rmtree(paths.batch_start, ignore_errors=True)
        newest = layout.latest_checkpoint(paths.checkpoints)
        if newest is not None and layout.checkpoint_step(newest) == self.daemon.state.global_step:
            paths.batch_start.mkdir(parents=True)
            shutil.copytree(newest, paths.batch_start / newest.name, copy_function=os.link)

    def roll_back(self) -> None:
        """Undo the current batch: its checkpoints go, the one it started from is loaded again
        (from the hard-linked copy in .batch_start/ if save_total_limit rotated it out)."""
        d = self.daemon
        start, checkpoints = d.batch.batch_start_step, d.paths.checkpoints
        target = checkpoints / layout.checkpoint_name(start)
        kept = d.paths.batch_start / target.name
        # The start checkpoint comes back before the batch's own go: a kill in between leaves a
        # checkpoint of this claim as the newest, so the next start meets the failure and rolls back again.
        if not layout.is_complete(target) and layout.is_complete(kept):
            tmp = checkpoints / layout.temp_name(start, "restore")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(kept, tmp, copy_function=os.link)
            os.rename(tmp, target)
        for p in layout.list_checkpoints(checkpoints):
            if (layout.checkpoint_step(p) or 0) > start:
                shutil.rmtree(p)
        newest = layout.latest_checkpoint(checkpoints)
        if newest is not None:
            d.load_checkpoint(newest)
        else:  # the batch began on the fresh base: rebuild it as the start did
            d.open_session(d.configured_base(), d.session.tokenizer)
        d.reporters.rewind(d.state.global_step)  # the failed batch's points leave the curves
        d.log.info(f"rolled back to {newest.name if newest else 'the fresh base'} "
                   f"(global_step {d.state.global_step})")
