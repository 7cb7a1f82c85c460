"""`kdforge generate`: teacher API -> KD dataset, never overspending, never paying twice,
never losing or duplicating a sample.

    run_generate(cfg)  # cfg: kdforge.config.GenerateSection

Setup: validate, resolve prices (a budget without a price is exit 2), plan the prompts, lock the
output file (`OUT.lock` beside it) and the checkpoint directory, open the journal (the output
file; torn tail repaired), the failure log, the budget ledger and the response cache. Then `concurrency` workers each take the next sample
not yet in the file and:

1. answer it from the cache if the exact request is there (costs $0, sends nothing);
2. else, per attempt: wait for the rate limiter, reserve the worst case in the ledger (or stop:
   budget exhausted), send, settle the real cost, learn rate limits from the headers;
3. on success: cache the answer, append the sample line; on 429: shared pause, retry; on
   5xx/timeout/drop: backoff with jitter, retry up to `max_retries`; on other 4xx: record the
   failure (reason kept) and move on to the next prompt; on 401/403/404: stop everything.

With `--batch` (kdforge.teacher.batch) the samples go up as Batch API files instead; the Generator
is the batch run's `BatchHost`: every result row comes back through `Generator.deliver` / `reject`, the same settle, cache and journal steps as
an online answer, and rows retried online run through these workers.

Stopping: budget -> no new dispatch, in-flight requests finish, exit 3. Refused -> in-flight
requests cancelled at once, exit 4. SIGINT/SIGTERM -> no new dispatch, in-flight requests finish
(a second signal cancels them), exit 130. Teacher down (3 samples in a row out of retries) or
rejecting everything (10 requests in a row, or every request of a run) -> no new dispatch, exit 1
with the teacher's own (masked) message; paid answers that cannot be stored (empty, cut by
max_tokens before any text, filtered, quoting the key: `_unusable`) count in the same streak, and
a thinking model whose thinking filled max_tokens is named with what it used and a --max-tokens
that fits; the prompts of such a streak are not held against them, so a re-run sends them again. Every path saves `state.json` and prints the summary; all
resume.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import math
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from kdforge.atomic import atomic_write_json
from kdforge.config import GenerateSection
from kdforge.errors import BudgetExceededError, Interrupted, KdforgeError, TeacherRefusedError, UsageError
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.cache import ResponseCache
from kdforge.teacher.client import (Answer, AttemptFailed, RateLimited, Rejected, RetryCount, TeacherClient,
                                    backoff_delay)
from kdforge.teacher.journal import FailureLog, Journal
from kdforge.teacher.plan import SampleRequest, build_jobs, dry_run_report
from kdforge.teacher.pricing import Prices, resolve_prices
from kdforge.teacher.progress import ProgressView, Stats, summary_text
from kdforge.teacher.prompts import plan_prompts
from kdforge.teacher.ratelimit import RateLimiter
from kdforge.teacher.tokens import TokenEstimator

STATE_EVERY = 5.0  # seconds between state.json writes
UNAVAILABLE_AFTER = 3  # samples in a row giving up on transient errors: the teacher is down, stop (exit 1)
REJECTING_AFTER = 10  # samples in a row rejected (4xx): the endpoint or the request is wrong, not the prompts
UNUSABLE = {"empty": "empty", "cut": "cut by --max-tokens", "content_filter": "stopped by the content filter",
            "key-in-answer": "quoting the API key"}  # paid answers that cannot be stored, by kind
FINITE_FIELDS = ("budget_limit", "price_input", "price_output", "rpm", "tpm", "delay", "temperature", "timeout",
                 "retry_base", "retry_max")  # float settings where inf/nan would poison money or pacing



class StopReason(str, Enum):
    """Why a run stopped before its total (`Generator.stop_reason`; None while it runs). Each
    maps to the exit code and the state.json status that `run_generate` reports."""

    BUDGET = "budget"  # the next worst case would pass --budget-limit: in flight finishes, exit 3
    REFUSED = "refused"  # 401/403/404 (online, or the Batch API's control plane): cancelled at once, exit 4
    INTERRUPT = "interrupt"  # SIGINT/SIGTERM: in flight finishes (a second signal cancels it), exit 130
    UNAVAILABLE = "unavailable"  # UNAVAILABLE_AFTER samples in a row out of retries: exit 1
    REJECTING = "rejecting"  # REJECTING_AFTER rejected or unusable answers in a row: exit 1
    ERROR = "error"  # a bug or unexpected fault in a worker: cancelled at once, raised (exit 1)


STOP_STATUS = {StopReason.BUDGET: "budget_exhausted", StopReason.REFUSED: "refused",
               StopReason.INTERRUPT: "interrupted", StopReason.UNAVAILABLE: "teacher_unavailable",
               StopReason.REJECTING: "teacher_rejecting"}  # state.json's status (ERROR: "error", raised)


# ----------------------------------------------------------------------------- setup

def _paths(cfg: GenerateSection) -> tuple[Path, Path, Path]:
    out = Path(cfg.out)
    ckpt = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out.with_name(out.stem + "_checkpoints")
    cache = Path(cfg.cache_dir) if cfg.cache_dir else ckpt / "cache"
    return out, ckpt, cache


def _check(cfg: GenerateSection) -> None:
    problems = []
    if not cfg.teacher:
        problems.append("--teacher is required: the teacher's OpenAI-compatible base URL, e.g. https://api.openai.com/v1")
    elif not cfg.teacher.startswith(("http://", "https://")):
        problems.append(f"--teacher must be an http(s) URL, got {cfg.teacher!r}")
    if not cfg.model:
        problems.append("--model is required: the teacher model's name at that URL")
    if not cfg.out:
        problems.append("--out is required: the JSONL file to write (resumed if it exists)")
    if not cfg.total:
        problems.append("--total is required: how many samples the file should hold")
    for name in FINITE_FIELDS:
        v = getattr(cfg, name)
        if v is not None and not math.isfinite(v):
            problems.append(f"--{name.replace('_', '-')} (generate.{name}) must be a finite number, got {v}")
    if problems:
        raise UsageError("\n  ".join(["cannot generate:"] + problems))


def _flock(path: Path) -> int | None:
    """An exclusive OS lock on `path` (created if need be): its descriptor, or None if another
    process holds it. The kernel releases it when the holder exits, however it exits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def out_lock_path(out: Path) -> Path:
    """The lock file beside the output file (`kd.jsonl` -> `kd.jsonl.lock`)."""
    return out.with_name(out.name + ".lock")


def _holder(lock: Path) -> str:
    """Who holds `lock`, as its holder wrote it (best effort: it may be writing it right now)."""
    try:
        h = json.loads(lock.read_text(encoding="utf-8"))
        return (f"pid {h['pid']} on {h['host']}, started {h['started']}, checkpoint dir {h['checkpoint_dir']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def _locked(out: Path, ckpt: Path):
    """One writer per output file and per checkpoint directory. The output file is locked on its
    own (a lock file beside it): two runs with different checkpoint directories would otherwise
    both append (and pay for) every sample."""
    lock = out_lock_path(out)
    fd_out = _flock(lock)
    if fd_out is None:
        raise UsageError(f"{out} is being written by another kdforge generate ({_holder(lock)}); wait for it to "
                         f"finish or stop it (Ctrl-C, or kill that pid: it saves and resumes), then re-run; to "
                         "write a second dataset at the same time, pass another --out")
    try:
        os.ftruncate(fd_out, 0)
        os.pwrite(fd_out, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _utc_now(),
                                      "checkpoint_dir": str(ckpt)}).encode(), 0)
        fd = _flock(ckpt / ".lock")
        if fd is None:
            raise UsageError(f"another kdforge generate is running on {ckpt}; wait for it or stop it")
        try:
            yield
        finally:
            os.close(fd)
    finally:
        os.close(fd_out)


def fit_max_tokens(max_tokens: int) -> int:
    """A --max-tokens to suggest when a thinking model's thinking filled `max_tokens`: four times
    as much (its thinking ran past it, by how much is unknown), in whole 256s."""
    return -(-4 * max_tokens // 256) * 256


def _tokens(pt: int, ct: int, reasoning: int | None) -> dict:
    """metadata.tokens: completion counts the thinking (as providers bill it); `reasoning` says
    how much of it was thinking, where the provider reported it."""
    out = {"prompt": pt, "completion": ct}
    if reasoning is not None and reasoning <= ct:
        out["reasoning"] = reasoning
    return out | {"total": pt + ct}


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- the run

class Generator:
    """The workers and their shared state; see the module docstring for the flow."""

    def __init__(self, cfg: GenerateSection, jobs: list[SampleRequest], journal: Journal, failures: FailureLog,
                 ledger: BudgetLedger, cache: ResponseCache, stats: Stats, view: ProgressView,
                 api_key: str | None, prices: Prices | None, state_path: Path):
        self.cfg, self.journal, self.failures, self.ledger, self.cache = cfg, journal, failures, ledger, cache
        self.stats, self.view, self.api_key, self.prices, self.state_path = stats, view, api_key, prices, state_path
        self.tokens = TokenEstimator()
        self.rng = random.Random(cfg.seed)
        self.stop_reason: StopReason | None = None
        self.stop_error: Exception | None = None
        self._jobs = iter(jobs)
        self._claimed = 0  # samples taken and not finished
        self._state: dict[asyncio.Task, str] = {}  # worker -> "waiting" | "sending"
        self._warned: set[str] = set()
        self._interrupts = 0
        self._gave_up = 0  # samples in a row that failed for transient reasons
        self.rejected_in_row: list[SampleRequest] = []  # samples in a row rejected (4xx) or paid and unusable
        self._streak: Counter = Counter()  # their kinds
        self.last_failure = ""  # the latest failure's reason (masked), for the stop message
        self.transient_kinds: set[str] = set()  # failure kinds a re-run retries
        self.held_elsewhere = 0  # samples at the Batch API meanwhile (batch mode): not claimed online
        self.halted = asyncio.Event()  # set by every stop but the budget's: calls in flight may be abandoned

    # ---------------------------------------------------------------- main loop
    async def main(self, batch=None) -> None:
        """Run the workers over the jobs; with `batch` (a kdforge.teacher.batch.BatchRun), run that
        instead: it sends through the Batch API and calls `run_workers` for rows retried online."""
        cfg = self.cfg
        self.client = TeacherClient(cfg.teacher, self.api_key, cfg.timeout, cfg.api_key_env)
        self.limiter = RateLimiter(cfg.rpm, cfg.tpm, cfg.delay, log=self.view.log)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.interrupt)
        ticker = asyncio.create_task(self._tick())
        try:
            await (self.run_workers() if batch is None else batch.run(self))
        finally:
            ticker.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
                if self._interrupts:  # stopping already: a further Ctrl-C must not cut the save short
                    signal.signal(sig, signal.SIG_IGN)
            await self.client.aclose()

    async def run_workers(self, jobs: list[SampleRequest] | None = None) -> None:
        """`concurrency` workers over the jobs (these `jobs`, if given) until done or stopping."""
        if jobs is not None:
            self._jobs = iter(jobs)
        workers = [asyncio.create_task(self._worker()) for _ in range(self.cfg.concurrency)]
        results = await asyncio.gather(*workers, return_exceptions=True)
        for w in workers:
            self._state.pop(w, None)
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r

    async def _tick(self) -> None:
        last_state = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            self.view.refresh()
            if time.monotonic() - last_state > STATE_EVERY:
                self.save_state("running")
                last_state = time.monotonic()

    async def _worker(self) -> None:
        me = asyncio.current_task()
        self._state[me] = "waiting"
        while (job := self._claim()) is not None:
            try:
                await self._process(job)
            except Exception as e:  # a bug or an unexpected fault: stop all, save, report it
                self.stop(StopReason.ERROR, e)
                raise
            finally:
                self._claimed -= 1
                self._state[me] = "waiting"

    def _claim(self) -> SampleRequest | None:
        while self.stop_reason is None and self.journal.count + self._claimed + self.held_elsewhere < self.cfg.total:
            job = next(self._jobs, None)
            if job is None:
                return None
            if self.is_finished(job):
                continue
            self._claimed += 1
            return job
        return None

    def is_finished(self, job: SampleRequest) -> bool:
        """True if the sample is written, or failed for good (rejected): not to be sent this run."""
        return self.journal.done(job.id, job.key) or job.id in self.failures.permanent

    # ---------------------------------------------------------------- one sample
    def answer_from_cache(self, job: SampleRequest) -> bool:
        """Write the sample from the cache if the exact request is there; True if it was."""
        hit = self.cache.get(job.cache_key)
        if hit is None:
            return False
        self._write(job, Answer.from_cache(hit), 0.0, cached=True)
        return True

    async def _process(self, job: SampleRequest) -> None:
        if self.answer_from_cache(job):
            return
        me, attempts, cost = asyncio.current_task(), 0, 0.0
        tries = RetryCount(self.cfg.max_retries, self.cfg.retry_base, self.cfg.retry_max, self.rng)
        while True:
            self._state[me] = "waiting"
            res = await self._admit(job)
            if res is None:
                return  # stopping
            self._state[me] = "sending"
            attempts += 1
            self.stats.on_start()
            try:
                ans = await self.client.complete(job.body)
            except asyncio.CancelledError:  # refused elsewhere, or a second interrupt
                self.settle_worst(res, "cancelled")
                raise
            except TeacherRefusedError as e:
                self.ledger.settle(res, 0, 0, "refused")
                self.limiter.observe(None)
                self.stop(StopReason.REFUSED, e)
                return
            except AttemptFailed as e:
                self._state[me] = "waiting"
                cost += self._settle_failed(res, e)
                self.limiter.observe(e.headers or None)
                if await self._retry_after_failure(job, e, tries, attempts):
                    continue
                return
            self._state[me] = "waiting"
            self.limiter.observe(ans.headers)
            self.deliver(job, res, ans, attempts, cost)
            return

    def deliver(self, job: SampleRequest, res, ans: Answer, attempts: int, cost: float = 0.0) -> None:
        """An answer came back (online, or a Batch API result row): settle its reservation at the
        checked usage, then cache it and write the sample, or record why it cannot be kept.
        `cost`: what earlier attempts of this sample cost."""
        cost += self.settle_ok(job, res, ans)
        unusable = self._unusable(ans)
        if unusable is not None:  # paid for, cannot be kept: counts toward the stop as rejections do
            self.fail(job, unusable[1], unusable[0], attempts, permanent=True)
        else:
            self.cache.put(job.cache_key, ans.to_cache())
            self._write(job, ans, cost, cached=False)
            self._gave_up = 0
            self.rejected_in_row.clear()
            self._streak.clear()

    def _unusable(self, ans: Answer) -> tuple[str, str] | None:
        """(kind, reason) for a paid answer that cannot be stored, else None."""
        if self.client.leaks_key(ans):  # never into the dataset, the cache or a log
            return "key-in-answer", f"the teacher's answer quotes the API key from {self.cfg.api_key_env}; not stored"
        if ans.finish_reason == "content_filter":
            return "content_filter", "the teacher's content filter stopped the answer"
        if ans.text.strip():
            return None
        mt = self.cfg.max_tokens
        if ans.finish_reason != "length":
            thought = f" (after {len(ans.reasoning)} characters of thinking)" if ans.reasoning else ""
            return "empty", f"the teacher's answer is empty{thought}"
        if not ans.reasoning:
            return "cut", f"the teacher's answer was cut by --max-tokens {mt} before any text"
        used = ans.thinking_tokens()
        used = f"{used} tokens" if used is not None else f"all of them ({len(ans.reasoning)} characters of thinking)"
        return "cut", (f"the teacher thinks before it answers and its thinking used {used} of --max-tokens {mt}: "
                       f"cut before any answer; thinking and answer must both fit, e.g. --max-tokens "
                       f"{fit_max_tokens(mt)} or more")

    def reject(self, job: SampleRequest, res, e: AttemptFailed, attempts: int) -> None:
        """The teacher refused this request (a 4xx, online or in a batch's error file): settle as
        `_settle_failed` does and record the sample as failed for good."""
        self._settle_failed(res, e)
        self.fail(job, e.reason, e.kind, attempts, permanent=True)

    async def _admit(self, job: SampleRequest):
        """Wait for the rate limiter, then reserve the worst case. None: the run is stopping."""
        if self.stop_reason:
            return None
        await self.limiter.acquire(self.tokens.prompt_estimate(job.messages) + self.cfg.max_tokens)
        if self.stop_reason:
            return None
        try:
            return await self.ledger.reserve(self.tokens.prompt_bound(job.messages), self.cfg.max_tokens)
        except BudgetExceededError as e:
            self.stop(StopReason.BUDGET, e)
            return None

    async def _retry_after_failure(self, job: SampleRequest, e: AttemptFailed, tries: RetryCount,
                                   attempts: int) -> bool:
        """Record a failed attempt; wait as the error asks (`RetryCount`'s rules). False: the sample
        failed for good."""
        if isinstance(e, Rejected):
            self.fail(job, e.reason, e.kind, attempts, permanent=True)
            return False
        wait, gave_up = tries.after(e)
        if isinstance(e, RateLimited):  # throttled: retried longer, and every worker waits
            self.throttled(wait, e.headers)  # acquire() honours it
        if gave_up:
            self.fail(job, f"gave up after {attempts} attempts: {e.reason}", e.kind, attempts, permanent=False)
            return False
        self.stats.retries[e.kind] += 1
        if not isinstance(e, RateLimited):
            await asyncio.sleep(wait)
        return True

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (exponential, capped, jittered by the run's
        seeded rng)."""
        return backoff_delay(attempt, self.cfg.retry_base, self.cfg.retry_max, self.rng)

    def throttled(self, wait: float, headers) -> None:
        """A 429: every worker pauses `wait` seconds, and the rate limiter learns from `headers`."""
        self.limiter.on_429(wait, headers)

    def _settle_failed(self, res, e: AttemptFailed) -> float:
        if e.usage is not None:  # the answer says what it cost: checked like any usage
            return self.settle_reported(res, e.usage, e.kind)[0]
        if getattr(e, "billed", False):  # timeout / dropped / 5xx: unknown outcome, may be billed in full
            pt, ct = res.prompt_tokens, res.completion_tokens
        else:  # 429, 4xx: refused before any work
            pt, ct = 0, 0
        c = self.ledger.settle(res, pt, ct, e.kind)
        self._charge(c, pt, ct)
        return c

    def settle_ok(self, job: SampleRequest, res, ans: Answer) -> float:
        """Settle a completed answer's reservation at its checked usage (the answer then carries
        what was charged); returns the USD charged."""
        reported = ans.prompt_tokens
        c, ans.prompt_tokens, ans.completion_tokens = self.settle_reported(  # the record shows what was charged
            res, (ans.prompt_tokens, ans.completion_tokens), "ok")
        # A teacher counting more prompt tokens than our bound (a hidden system prompt, say) raises the
        # bound for later requests; an absurd count (over twice the bound) is a lie, not a template.
        if type(reported) is int and res.prompt_tokens < reported <= 2 * res.prompt_tokens \
                and self.tokens.learn(job.messages, reported):
            self._warn("overshoot", f"the teacher counted more prompt tokens than reserved ({reported}, reserved "
                                    f"{res.prompt_tokens}); the prompt bound now adds {self.tokens.extra} tokens")
        return c

    def settle_reported(self, res, usage, outcome: str) -> tuple[float, int, int]:
        """Settle at checked usage (see budget.settle_reported); returns (USD, tokens charged)."""
        c, pt, ct, problem = self.ledger.settle_reported(res, usage, outcome)
        if problem:
            kind = "missing" if problem.startswith("no usage") else "over" if "more than" in problem else "invalid"
            self._warn(f"usage:{kind}",  # once per kind of lie, not once per answer
                       f"the teacher's usage cannot be trusted ({problem}): such answers are charged at their worst "
                       "case (prompt bound + max_tokens)")
        self._charge(c, pt, ct)
        return c, pt, ct

    def settle_worst(self, res, outcome: str) -> None:
        """Settle `res` at its worst case (prompt bound + max_tokens): an outcome that may have
        been billed in full but says nothing of its usage."""
        self._charge(self.ledger.settle_worst(res, outcome), res.prompt_tokens, res.completion_tokens)

    def _charge(self, cost: float, pt: int, ct: int) -> None:
        self.stats.on_usage(pt, ct, cost)

    def _write(self, job: SampleRequest, ans: Answer, cost: float, cached: bool) -> None:
        pt, ct = ans.prompt_tokens or 0, ans.completion_tokens or 0
        rec = {"id": job.id, "prompt": job.prompt.text, "teacher_text": ans.text, "messages": job.messages}
        if ans.reasoning:  # a thinking teacher's reasoning, whole: paid for, and trainable (io.reasoning)
            rec["teacher_reasoning"] = ans.reasoning
        if self.cfg.top_logprobs:
            if ans.logprobs:
                rec["teacher_logprobs"] = ans.logprobs
            else:
                self._warn("logprobs", "the teacher returned no logprobs; --top-logprobs has no effect on this server")
        rec["metadata"] = {
            "model": ans.model or self.cfg.model, "source": job.prompt.source, "finish_reason": ans.finish_reason,
            "tokens": _tokens(pt, ct, ans.thinking_tokens()),
            "cost_usd": round(cost, 9) if (self.prices or cached) else None,
            "cached": cached, "created": _utc_now(),
        }
        self.journal.append(rec, job.key)
        self.stats.written += 1
        self.stats.cached += cached
        self.view.refresh()

    def fail(self, job: SampleRequest, reason: str, kind: str, attempts: int, permanent: bool) -> None:
        """Record a failed sample (`permanent`: rejected or unusable, not sent again by a re-run);
        a streak of them stops the run (REJECTING, UNAVAILABLE)."""
        self.failures.append(job.id, job.prompt.text, job.prompt.source, reason, kind, attempts, permanent)
        self.stats.failed[kind] += 1
        self.last_failure = reason
        if permanent and (kind.isdigit() or kind in UNUSABLE):  # rejected (4xx), or paid and unusable
            self.rejected_in_row.append(job)
            self._streak[kind] += 1
            if len(self.rejected_in_row) >= REJECTING_AFTER:
                self.stop(StopReason.REJECTING, KdforgeError(self._streak_text(reason)))
        if not permanent:
            self.transient_kinds.add(kind)
            self._gave_up += 1
            if self._gave_up >= UNAVAILABLE_AFTER:  # the teacher is down, not this prompt
                self.stop(StopReason.UNAVAILABLE, KdforgeError(
                    f"the teacher at {self.cfg.teacher} keeps failing: {self._gave_up} samples in a row ran out "
                    f"of retries (last: {reason})"))

    def _streak_text(self, reason: str) -> str:
        n, kinds = len(self.rejected_in_row), self._streak
        unusable = sum(v for k, v in kinds.items() if k in UNUSABLE)
        if not unusable:
            return f"the teacher at {self.cfg.teacher} rejected {n} requests in a row (last: {reason})"
        parts = ", ".join(f"{v} {UNUSABLE.get(k, f'rejected ({k})')}" for k, v in kinds.most_common())
        return (f"the teacher at {self.cfg.teacher} gave {n} answers in a row that cannot be used ({parts}; "
                f"{unusable} of them paid for; last: {reason})")

    def _warn(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.view.log(f"warning: {msg}")

    # ---------------------------------------------------------------- stopping
    def stop(self, reason: StopReason, err: Exception | None) -> None:
        """Stop dispatching (the first reason given is kept): every reason but the budget's sets
        `halted`; a refusal or an error cancels requests in flight, the others let them finish."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_error = reason, err
        if reason != StopReason.BUDGET:
            self.halted.set()
        at_once = reason in (StopReason.REFUSED, StopReason.ERROR)
        for task, state in list(self._state.items()):
            if task is not asyncio.current_task() and (at_once or state == "waiting"):
                task.cancel()

    def interrupt(self) -> None:
        self._interrupts += 1
        if self._interrupts == 1:
            n = sum(1 for s in self._state.values() if s == "sending")
            self.view.log(f"interrupted: finishing {n} request(s) in flight; interrupt again to abandon them")
            self.stop(StopReason.INTERRUPT, None)
        else:
            self.stop_reason = StopReason.INTERRUPT
            self.halted.set()
            for task in self._state:
                task.cancel()

    def save_state(self, status: str) -> None:
        atomic_write_json(self.state_path, {
            "status": status, "out": str(self.cfg.out), "total": self.cfg.total, "samples": self.journal.count,
            "failed": dict(self.stats.failed), "spent_usd": self.ledger.spent if self.prices else None,
            "budget_limit": self.cfg.budget_limit, "requests_this_run": self.stats.requests, "updated": _utc_now()})


# ----------------------------------------------------------------------------- entry point

def run_generate(cfg: GenerateSection, api_key: str | None = None, *, dry_run: bool = False,
                 out_stream=None, err_stream=None, batch_action: str | None = None) -> Stats | None:
    """Generate until the output file holds `cfg.total` samples (or stop, raising the error
    whose exit code tells why). `api_key` defaults to the variable named by `cfg.api_key_env`.
    With `cfg.batch`, through the Batch API (kdforge.teacher.batch); `batch_action` "cancel"
    cancels this run's open batches instead, "status" prints their state and touches nothing."""
    out_stream = out_stream or sys.stdout
    err_stream = err_stream or sys.stderr
    _check(cfg)
    prices = resolve_prices(cfg.model, cfg.price_input, cfg.price_output)
    if cfg.budget_limit is not None and prices is None:
        from kdforge.teacher.pricing import unknown_price_fix

        raise UsageError(f"--budget-limit needs prices, and model {cfg.model!r} is not in the shipped price table: "
                         f"{unknown_price_fix()}")
    out, ckpt, cache_dir = _paths(cfg)
    jobs = build_jobs(cfg, plan_prompts(cfg.prompts, cfg.mix, cfg.seed,
                                        warn=lambda m: print(f"warning: {m}", file=err_stream, flush=True)))
    if dry_run:
        shown = prices.for_batch(cfg.batch_discount) if cfg.batch and prices else prices  # what a --batch run pays
        print(dry_run_report(cfg, jobs, shown, out, ckpt, cache_dir), file=out_stream, flush=True)
        return None
    if batch_action == "status":
        from kdforge.teacher.batch import status_report

        ledger = BudgetLedger(ckpt / "budget.jsonl" if (ckpt / "budget.jsonl").exists() else None, prices,
                              cfg.budget_limit, readonly=True)
        print(status_report(ckpt, ledger, Journal(out, readonly=True).count, cfg.total), file=out_stream, flush=True)
        return None
    if api_key is None:
        api_key = os.environ.get(cfg.api_key_env) or None
    with _locked(out, ckpt):
        journal = Journal(out)
        failures = FailureLog(ckpt / "failures.jsonl")
        todo = [j for j in jobs if not journal.done(j.id, j.key) and j.id not in failures.permanent]
        need = cfg.total - journal.count
        ledger = BudgetLedger(ckpt / "budget.jsonl", prices, cfg.budget_limit)
        stats = Stats(cfg.total, journal.count)
        view = ProgressView(stats, (lambda: ledger.spent) if prices else (lambda: None), cfg.budget_limit, err_stream)
        cache = ResponseCache(cache_dir / "responses.sqlite", log=view.log)
        gen = Generator(cfg, todo, journal, failures, ledger, cache, stats, view, api_key, prices, ckpt / "state.json")
        batch = None
        if cfg.batch or batch_action == "cancel":
            from kdforge.teacher.batch import BatchRun

            batch = BatchRun(cfg, todo, ckpt, prices, ledger, journal, stats, view.log,
                             cancel=batch_action == "cancel")
        status = "error"
        try:
            if journal.repaired_bytes:
                view.log(f"repaired {out}: cut a torn last line ({journal.repaired_bytes} bytes) left by a killed run")
            if ledger.recovered:
                view.log(f"budget: {ledger.recovered} request(s) of a killed run counted at their worst case")
            for p in ([batch.prices] if batch and batch.prices else [prices] if prices else []):
                view.log(f"prices: ${p.input:g} input / ${p.output:g} output per million tokens ({p.source})")
            if 0 < len(todo) < need:
                view.log(f"warning: {out} needs {need} more samples but only {len(todo)} unused unique prompts are "
                         "left; the run will stop short (add prompts with --prompts, or lower --total)")
            if need > 0 or batch_action == "cancel":
                with view:
                    asyncio.run(gen.main(batch))
            if gen.stop_reason == StopReason.REJECTING or (stats.written == 0 and gen.rejected_in_row):
                failures.release([j.id for j in gen.rejected_in_row])  # the teacher's fault, not theirs
            status = STOP_STATUS.get(
                gen.stop_reason, "cancelled" if batch_action == "cancel" else
                "done" if journal.count >= cfg.total else "out_of_prompts")
        finally:
            journal.close()
            failures.close()
            ledger.close()
            cache.close()
            gen.save_state(status)
            print(summary_text(stats, str(out), str(ckpt / "failures.jsonl"), ledger.spent if prices else None,
                               cfg.budget_limit, cache.corrupted, status.replace("_", " ")), file=out_stream, flush=True)
    _raise_for(gen, out, ckpt)
    if batch_action == "cancel":
        return stats
    if journal.count < cfg.total:
        raise _short_of_total(gen, stats, len(jobs), out, ckpt)
    return stats


def _short_of_total(gen: Generator, stats: Stats, unique: int, out: Path, ckpt: Path) -> KdforgeError:
    """Why the file holds fewer than --total samples: the teacher (exit 1) or the prompts (exit 2)."""
    failed = sum(stats.failed.values())
    where = f"{gen.journal.count} of --total {gen.cfg.total} samples in {out}; see {ckpt / 'failures.jsonl'}"
    if failed and stats.written == 0:  # not one answer this run: the teacher, not the prompts
        return KdforgeError(f"the teacher at {gen.cfg.teacher} answered none of the {failed} samples tried this run "
                            f"(last: {gen.last_failure}). {where}; fix the cause, then re-run the same command: "
                            "rejected and timed-out prompts are sent again")
    transient = sum(n for k, n in stats.failed.items() if k in gen.transient_kinds)
    if transient:
        return KdforgeError(f"{transient} samples ran out of retries (last: {gen.last_failure}). {where}; re-run "
                            "the same command to retry them")
    return UsageError(f"{where}: the prompts ran out ({unique} unique, {failed} failed this run); add prompts with "
                      "--prompts and re-run to continue, or lower --total")


def _raise_for(gen: Generator, out: Path, ckpt: Path) -> None:
    if gen.stop_reason == StopReason.REFUSED:
        raise TeacherRefusedError(f"{gen.stop_error} (nothing was written for the refused request; "
                                  f"{gen.journal.count} samples in {out})")
    if gen.stop_reason == StopReason.BUDGET:
        raise BudgetExceededError(
            f"{gen.stop_error}. Stopped with {gen.journal.count} samples in {out}; spend is saved in "
            f"{ckpt / 'budget.jsonl'} and counts across runs. Re-run with a larger --budget-limit to continue.")
    if gen.stop_reason == StopReason.REJECTING:
        raise KdforgeError(f"{gen.stop_error}. Stopped with {gen.journal.count} samples in {out}: a streak like "
                           "this is the endpoint or the request (--model, --max-tokens, --top-logprobs), not the "
                           "prompts; fix it and re-run the same command: those prompts are sent again")
    if gen.stop_reason == StopReason.UNAVAILABLE:
        raise KdforgeError(f"{gen.stop_error}. Stopped with {gen.journal.count} samples in {out}; check that the "
                           "teacher is up, then re-run the same command to resume")
    if gen.stop_reason == StopReason.INTERRUPT:
        raise Interrupted(f"interrupted: {gen.journal.count} samples saved in {out}; "
                          "re-run the same command to resume")
