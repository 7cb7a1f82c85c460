"""`kdforge generate --batch`: the same samples through the provider's Batch API, at its price.

    BatchRun(cfg, jobs, ckpt, prices, ledger, journal, stats, log).run(gen)   # inside Generator.main

The pending samples go up in files of `batch_size` rows (`custom_id` = the sample's stable id,
each row the exact body an online request would send). Per file, in this order:

1. cache hits are answered first and never submitted;
2. every row's worst case (prompt bound + max_tokens, at the batch price) is held in the ledger
   as a keyed reservation that outlives the run; rows that would pass the limit are cut off;
3. the intent (file number, rows) is written to `batch.json` in the checkpoint dir (atomically);
4. upload (`POST /v1/files`, purpose=batch), then the file id is written;
5. submit (`POST /v1/batches`, metadata = our run id and file number), then the batch id is written;
6. poll (`GET /v1/batches/{id}`) with backoff, honouring Retry-After, until it ends;
7. download the output and error files; each row goes through the host's `deliver` / `reject`
   (`BatchHost`, the online `Generator`): the
   same ledger settle, cache and journal write as an online answer. The result files are the bill:
   a row that did not complete (in the error file, expired, cancelled, or in neither file) was not
   charged, and is retried in the next file or online (`batch_fallback`), at most MAX_BATCH_TRIES
   times in batches. Result files are streamed to the checkpoint dir (never held in memory) and
   cut at `len(rows) * row_cap()` bytes: a file past it is not a result file; the rows read
   before the cap count, the others are charged at their worst case and retried.

Every control-plane call has a deadline (`_deadline`: a hanging or dripping server is a timeout,
retried) and is abandoned at once when the run stops (`Generator.halted`: a signal, a refusal);
what it may have done at the provider is recovered by the next run, as after a kill.

Crash safety: a re-run reads `batch.json` and the ledger's keyed holds. A file with an intent but
no file id is uploaded again (an orphan upload costs nothing); one with a file id but no batch id
is first looked for among the provider's batches (`GET /v1/batches`, matched by our metadata),
and submitted only if not found, so no file is submitted twice; a submitted one is polled. Holds
whose file never got an intent (killed between reserving and writing it) are released.
`--cancel` cancels this run's open batches, waits for the provider to confirm, keeps what they
completed and releases the rest; `--status` prints all this without touching anything.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from kdforge.atomic import atomic_write_json
from kdforge.config import GenerateSection
from kdforge.errors import BudgetExceededError, DataError, KdforgeError, TeacherRefusedError, UsageError
from kdforge.teacher.budget import BudgetLedger, Reservation
from kdforge.teacher.client import AttemptFailed, RateLimited, Rejected, TeacherClient, Transient, _usage
from kdforge.teacher.generate import StopReason
from kdforge.teacher.journal import Journal
from kdforge.teacher.plan import SampleRequest
from kdforge.teacher.pricing import NANO, Prices
from kdforge.teacher.progress import Stats
from kdforge.teacher.tokens import TokenEstimator

STATE_FILE = "batch.json"
TERMINAL = ("completed", "failed", "expired", "cancelled")
MAX_BATCH_TRIES = 3  # batches a row may fail in before it counts as a failed sample (a re-run retries it)
POLL_MAX = 60.0  # seconds: the longest wait between two polls of one batch
LIST_SLACK = 600  # seconds: batches created this long before our intent cannot be ours (list is newest first)
CONTROL_DEADLINE = 60.0  # seconds: the longest any control-plane call may take (or `timeout`, if shorter) ...
MIN_RATE = 1 << 20  # ... plus its bytes at this rate (bytes/s) for uploads and downloads
ROW_BYTES = 64 << 10  # a result row's bytes besides its tokens (ids, usage, JSON) at most ...
TOKEN_BYTES = 256  # ... plus this per token and per logprob alternative (escaped text, bytes lists)
DOWNLOAD_CHUNK = 1 << 16


@dataclass
class BatchFile:
    """One input file and its batch, as `batch.json` records it."""

    n: int  # file number within the run (1, 2, ...)
    rows: list[str]  # custom_ids = sample ids
    status: str = "intent"  # intent | uploaded | submitted | done | released
    created: float = field(default_factory=time.time)  # when the intent was written (for list matching)
    file_id: str | None = None
    batch_id: str | None = None
    provider_status: str | None = None  # validating | in_progress | finalizing | completed | expired ...
    counts: dict = field(default_factory=dict)  # the provider's request_counts
    cancel: bool = False  # --cancel asked for it

    @property
    def open(self) -> bool:
        return self.status in ("intent", "uploaded", "submitted")


@dataclass
class BatchRunState:
    """A batch run's files and per-row tries, as `batch.json` records them (not the daemon's
    `daemon.batch_state.BatchState`)."""

    run_id: str
    files: list[BatchFile] = field(default_factory=list)
    tries: dict[str, int] = field(default_factory=dict)  # sample id -> batches it went up in

    @classmethod
    def load(cls, path: Path) -> "BatchRunState | None":
        if not path.exists():
            return None
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            return cls(obj["run_id"], [BatchFile(**f) for f in obj["files"]], dict(obj.get("tries", {})))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"not a kdforge batch state ({e}); it records which batches were submitted, so it "
                            "was not replaced: restore it, or delete the checkpoint directory to start over "
                            "(batches it named may still run at the provider)", str(path)) from None

    def save(self, path: Path) -> None:
        atomic_write_json(path, {"run_id": self.run_id, "files": [asdict(f) for f in self.files],
                                 "tries": self.tries})


def hold_key(run_id: str, n: int, sid: str) -> str:
    return f"batch:{run_id}:{n}:{sid}"


def _file_of(key: str) -> tuple[str, int] | None:
    parts = key.split(":")
    if len(parts) != 4 or parts[0] != "batch" or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def _http_errors() -> type[Exception]:
    """The HTTP library's base error, as the openai client uses it (httpx2 in newer releases)."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http.HTTPError


class BatchHost(Protocol):
    """What a batch run needs from the online generator (`generate.Generator` is the one): its stop
    state, the online workers for rows retried online, and the steps every answer goes through
    (settle, cache, write), so a result row is paid and written exactly as an online answer."""

    stop_reason: StopReason | None
    halted: asyncio.Event  # set by every stop but the budget's: abandon control-plane calls
    client: TeacherClient
    held_elsewhere: int  # samples the batches hold: the online workers do not claim them

    def stop(self, reason: StopReason, err: Exception | None) -> None: ...
    def backoff(self, attempt: int) -> float: ...
    def throttled(self, wait: float, headers) -> None: ...
    async def run_workers(self, jobs: list[SampleRequest] | None = None) -> None: ...
    def is_finished(self, job: SampleRequest) -> bool: ...
    def answer_from_cache(self, job: SampleRequest) -> bool: ...
    def deliver(self, job: SampleRequest, res: Reservation, ans, attempts: int, cost: float = 0.0) -> None: ...
    def reject(self, job: SampleRequest, res: Reservation, e: AttemptFailed, attempts: int) -> None: ...
    def settle_ok(self, job: SampleRequest, res: Reservation, ans) -> float: ...
    def settle_reported(self, res: Reservation, usage, outcome: str) -> tuple[float, int, int]: ...
    def settle_worst(self, res: Reservation, outcome: str) -> None: ...
    def fail(self, job: SampleRequest, reason: str, kind: str, attempts: int, permanent: bool) -> None: ...


class _Halted(Exception):
    """The run is stopping (a signal, a refusal): a control-plane call was abandoned."""


class BatchRun:
    """Drives a generate run through the Batch API; see the module docstring."""

    def __init__(self, cfg: GenerateSection, jobs: list[SampleRequest], ckpt: Path, prices: Prices | None,
                 ledger: BudgetLedger, journal: Journal, stats: Stats, log: Callable[[str], None],
                 cancel: bool = False):
        """`ledger`, `journal`, `stats`: the run's, shared with the online workers (the batch holds
        its rows' worst cases in the ledger under `hold_key`s); `log`: the progress view's."""
        self.cfg, self.ckpt, self.cancel = cfg, ckpt, cancel
        self.ledger, self.journal, self.stats, self.log = ledger, journal, stats, log
        self.prices = prices.for_batch(cfg.batch_discount) if prices else None
        self.path = ckpt / STATE_FILE
        self.state = BatchRunState.load(self.path) or BatchRunState(uuid.uuid4().hex[:16])
        self.jobs = {j.id: j for j in jobs}
        self._todo = list(jobs)  # not yet in any file, in plan order
        self.tokens = TokenEstimator()
        self.online: list[SampleRequest] = []  # rows to retry online (batch_fallback: online)
        self.retry: list[SampleRequest] = []  # rows for the next file (batch_fallback: batch)
        self._online_jobs: list[SampleRequest] = []  # rows the online workers are on now
        self._next_poll: dict[int, float] = {}
        self._interval: dict[int, float] = {}
        self.budget_short: BudgetExceededError | None = None
        self.api_calls = 0  # control-plane HTTP calls this run (upload, submit, list, poll, cancel, download)

    # ---------------------------------------------------------------- the loop
    async def run(self, gen: BatchHost) -> None:
        """Send, poll and collect until every sample is written or in a file, or the run stops."""
        self.gen, self.api = gen, gen.client
        self._recover()
        online: asyncio.Task | None = None
        try:
            while gen.stop_reason is None:
                # Rows retried online go first, so new files never take the room they need.
                if self.online and (online is None or online.done()):
                    if online is not None:
                        online.result()
                    self._online_jobs, self.online = self.online, []
                    online = asyncio.create_task(gen.run_workers(self._online_jobs))
                busy = online is not None and not online.done()
                if not busy:
                    self._online_jobs = []
                if not self.cancel:
                    while gen.stop_reason is None and await self._send_next_file():
                        pass
                for f in self.open_files():
                    if gen.stop_reason is not None:
                        break
                    if self.cancel and f.status == "uploaded":
                        await self._adopt_or_release(f)
                    elif f.status in ("intent", "uploaded"):
                        await self._submit(f)
                if not self.open_files() and not busy and not self.online and not self.retry:
                    if self.budget_short is not None and self._need() > 0 and not self.cancel:
                        gen.stop(StopReason.BUDGET, self.budget_short)
                    break
                await self._poll_due()
                self._update_held()
                await asyncio.sleep(self._sleep_for())
        finally:
            self.save()
            if online is not None:
                await asyncio.gather(online, return_exceptions=True)
            done = sum(1 for f in self.state.files if f.status == "done")
            self.log(f"batch: {len(self.state.files)} files ({done} done, {len(self.open_files())} open), "
                     f"{self.api_calls} Batch API calls this run")

    def _need(self) -> int:
        """Samples still to send: neither written, nor in an open file, nor being retried online."""
        j = self.journal
        online = sum(1 for job in self._online_jobs + self.online if not j.done(job.id, job.key))
        return self.cfg.total - j.count - self._held_rows() - online

    def open_files(self) -> list[BatchFile]:
        return [f for f in self.state.files if f.open]

    def _held_rows(self) -> int:
        j = self.journal
        return sum(1 for f in self.open_files() for sid in f.rows if sid not in j.ids)

    def _update_held(self) -> None:
        """Tell the online workers how many samples the batches hold, and the progress line how
        the files stand."""
        self.gen.held_elsewhere = self._held_rows()
        files = self.state.files
        running = sum(1 for f in files if f.status == "submitted" and f.provider_status not in (None, "validating"))
        self.stats.note = (f"batch files {sum(1 for f in files if f.batch_id)} submitted / {running} in progress "
                               f"/ {sum(1 for f in files if f.status == 'done')} done · "
                               f"${self.ledger.reserved:.4f} held")

    def _sleep_for(self) -> float:
        if not self._next_poll:
            return 0.05
        return max(0.01, min(0.5, min(self._next_poll.values()) - time.monotonic()))

    def save(self) -> None:
        self.state.save(self.path)

    # ---------------------------------------------------------------- resume
    def _recover(self) -> None:
        """Match the ledger's keyed holds with batch.json: release what no open file holds."""
        files = {f.n: f for f in self.state.files}
        for key in self.ledger.held_keys():
            owner = _file_of(key)
            if owner is None:
                continue
            f = files.get(owner[1]) if owner[0] == self.state.run_id else None
            if f is None or not f.open:  # reserved, but the intent never written: nothing was sent
                self.ledger.settle(self.ledger.held(key), 0, 0, "released")
        in_files = {sid for f in self.open_files() for sid in f.rows}
        strangers = sorted(in_files - self.jobs.keys() - self.journal.ids)
        if strangers and not self.cancel:
            raise UsageError(
                f"{self.path} holds open batches with {len(strangers)} rows this command would not send (e.g. "
                f"{strangers[0]}): a flag that shapes the requests changed (--model, --max-tokens, --temperature, "
                "--prompts, --seed ...). Re-run the command that submitted them, or cancel them with "
                "kdforge generate --batch --cancel and the same --out/--checkpoint-dir")
        self._todo = [job for job in self._todo if job.id not in in_files]
        for f in self.open_files():
            self._next_poll[f.n] = time.monotonic()
            self._interval[f.n] = self.cfg.batch_poll
            if self.cancel and f.status == "intent":  # no file id: no batch can exist for it
                self._release(f, "cancelled before upload")
        if self.open_files():
            self.log(f"batch: resuming {len(self.open_files())} open file(s) of run {self.state.run_id} "
                     f"({self._held_rows()} rows; {sum(1 for f in self.state.files if not f.open)} files done)")

    # ---------------------------------------------------------------- a new file
    async def _send_next_file(self) -> bool:
        """Build, hold, record, upload and submit the next file. False: nothing (more) to send now."""
        gen, need = self.gen, self._need()
        if need <= 0:
            return False
        rows: list[SampleRequest] = []
        pool = self.retry + self._todo
        taken = 0
        cut = None
        for job in pool:
            if len(rows) >= min(need, self.cfg.batch_size):
                break
            taken += 1
            if gen.is_finished(job):
                continue
            if gen.answer_from_cache(job):  # a hit is never submitted
                need -= 1
                continue
            rows.append(job)
        if not rows:
            self.retry, self._todo = [], pool[taken:]
            return False
        n = max((f.n for f in self.state.files), default=0) + 1
        held = []
        for job in rows:
            res = self.ledger.try_reserve(self.tokens.prompt_bound(job.messages), self.cfg.max_tokens,
                                         self.prices, hold_key(self.state.run_id, n, job.id))
            if res is None:
                cut = job
                break
            held.append(job)
        back = rows[len(held):]  # cut off by the budget: they stay pending
        self.retry, self._todo = [], back + pool[taken:]
        if cut is None:
            self.budget_short = None  # this file fit whole: any earlier shortfall has passed
        else:
            worst = self.prices.cost_nano(self.tokens.prompt_bound(cut.messages), self.cfg.max_tokens)
            self.budget_short = BudgetExceededError(
                f"budget exhausted: spent ${self.ledger.spent:.4f} of ${self.ledger.limit:.4f} with "
                f"${self.ledger.reserved:.4f} held by batches; the next row may cost up to ${worst / NANO:.4f} "
                "(prompt + max_tokens at the batch price)")
        if not held:
            return False
        f = BatchFile(n, [j.id for j in held])
        self.state.files.append(f)
        for job in held:
            self.state.tries[job.id] = self.state.tries.get(job.id, 0) + 1
        self.save()  # the intent, before anything goes out
        self._interval[n] = self.cfg.batch_poll
        self._update_held()
        await self._submit(f)
        return cut is None and f.status == "submitted"

    async def _submit(self, f: BatchFile) -> None:
        """Upload (if no file id is recorded) and create the batch (unless it exists already)."""
        if f.status == "intent":
            lines = [json.dumps({"custom_id": sid, "method": "POST", "url": "/v1/chat/completions",
                                 "body": self.jobs[sid].body}, ensure_ascii=False) for sid in f.rows]
            data = ("\n".join(lines) + "\n").encode("utf-8")
            up = await self._call("upload (POST /v1/files)", self.api.openai.files.create,
                                  file=(f"kdforge-{self.state.run_id}-{f.n}.jsonl", data), purpose="batch",
                                  deadline=self._deadline(len(data)))
            if up is None:
                return
            f.file_id, f.status = up.id, "uploaded"
            self.save()
        if f.status == "uploaded":
            found = await self._find(f)
            if found is None and self.gen.stop_reason is None:
                found = await self._create(f)
            if found is None:
                return
            f.batch_id, f.status, f.provider_status = found.id, "submitted", found.status
            self.save()
            self.stats.requests += len(f.rows)  # attempts sent: one per row, as online
            self._next_poll[f.n] = time.monotonic() + self.cfg.batch_poll
            self.log(f"batch file {f.n}: submitted as {found.id} ({len(f.rows)} rows, "
                     f"${self._held_usd(f):.4f} held at the batch price)")

    async def _adopt_or_release(self, f: BatchFile) -> None:
        """--cancel on a file uploaded but with no batch id saved: the batch may exist (killed right
        after creating it): if the list has it, it is cancelled like the others; else released."""
        found = await self._find(f)
        if found is None:
            if self.gen.stop_reason is None:
                self._release(f, "cancelled before submission")
            return
        f.batch_id, f.status, f.provider_status = found.id, "submitted", found.status
        self.save()
        self._next_poll[f.n] = time.monotonic()

    def _held_usd(self, f: BatchFile) -> float:
        led = self.ledger
        return sum(r.nano for sid in f.rows if (r := led.held(hold_key(self.state.run_id, f.n, sid)))) / NANO

    async def _create(self, f: BatchFile):
        """POST /v1/batches once. A failure of unknown outcome is checked against the list before
        any retry: the provider may have created it."""
        meta = {"kdforge_run": self.state.run_id, "kdforge_file": str(f.n)}
        for attempt in range(1, self.cfg.max_retries + 2):
            try:
                return await self._once("submit (POST /v1/batches)", self.api.openai.batches.create,
                                        input_file_id=f.file_id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata=meta)
            except _Halted:
                return None
            except AttemptFailed as e:
                if not await self._wait_after(e, attempt, "submit (POST /v1/batches)"):
                    return None
            found = await self._find(f)
            if found is not None:
                return found
        return None

    async def _find(self, f: BatchFile):
        """Our batch for this file among the provider's (newest first), or None."""
        after = None
        while True:
            kw = {"limit": 100} | ({"after": after} if after else {})
            page = await self._call("list (GET /v1/batches)", self.api.openai.batches.list, **kw)
            if page is None:
                return None
            for b in page.data:
                meta = b.metadata or {}
                if meta.get("kdforge_run") == self.state.run_id and meta.get("kdforge_file") == str(f.n):
                    return b
            if not page.data or not page.has_more or page.data[-1].created_at < f.created - LIST_SLACK:
                return None
            after = page.data[-1].id

    async def _call(self, what: str, fn, *args, deadline: float | None = None, **kw):
        """A control-plane call with retries on 429/5xx/timeouts (Retry-After honoured). None: the
        run is stopping or the provider stayed unavailable (the run then stops, resumable)."""
        for attempt in range(1, self.cfg.max_retries + 2):  # as an online request: max_retries after the first
            try:
                return await self._once(what, fn, *args, deadline=deadline, **kw)
            except _Halted:
                return None
            except AttemptFailed as e:
                if not await self._wait_after(e, attempt, what):
                    return None
        return None

    def _deadline(self, nbytes: int = 0) -> float:
        return min(self.cfg.timeout, CONTROL_DEADLINE) + nbytes / MIN_RATE

    async def _once(self, what: str, fn, *args, deadline: float | None = None, **kw):
        """One control-plane call, bounded: by its deadline (a server that hangs or drips is a
        timeout, retried as one) and by the run stopping (a signal, a refusal): then the call is
        abandoned at once and `_Halted` raised; what was sent is recovered by the next run, as
        after a kill (module docstring)."""
        gen = self.gen
        if gen.stop_reason is not None and gen.stop_reason != StopReason.BUDGET:
            raise _Halted
        self.api_calls += 1
        limit = deadline if deadline is not None else self._deadline()
        call = asyncio.ensure_future(asyncio.wait_for(self.api.call(what, fn, *args, **kw), limit))
        halt = asyncio.ensure_future(gen.halted.wait())
        try:
            await asyncio.wait({call, halt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.cancel()
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
        if call.cancelled():
            raise _Halted
        try:
            return call.result()
        except asyncio.TimeoutError:
            raise Transient(f"{what}: no answer within its deadline of {limit:g} s", "timeout",
                            billed=False) from None

    async def _wait_after(self, e: AttemptFailed, attempt: int, what: str) -> bool:
        gen = self.gen
        if isinstance(e, Rejected):
            hint = (f"the teacher at {self.cfg.teacher} has no Batch API (or lost the object); drop --batch"
                    if e.status == 404 else "the request was refused")
            gen.stop(StopReason.REFUSED, TeacherRefusedError(f"{what}: {e.reason}; {hint}"))
            return False
        if attempt > self.cfg.max_retries:
            gen.stop(StopReason.UNAVAILABLE, KdforgeError(
                f"{what} at {self.cfg.teacher} kept failing ({attempt} attempts, last: {e.reason})"))
            return False
        wait = e.retry_after if e.retry_after is not None else gen.backoff(attempt)
        if isinstance(e, RateLimited):
            gen.throttled(wait, e.headers)
        self.stats.retries[e.kind] += 1
        end = time.monotonic() + wait
        while gen.stop_reason is None and time.monotonic() < end:  # an interrupt must not wait a backoff out
            await asyncio.sleep(min(0.2, end - time.monotonic()))
        return gen.stop_reason is None

    # ---------------------------------------------------------------- polling
    async def _poll_due(self) -> None:
        now = time.monotonic()
        for f in self.open_files():
            if f.status != "submitted" or self._next_poll.get(f.n, 0) > now or self.gen.stop_reason:
                continue
            if self.cancel and not f.cancel:
                b = await self._call("cancel (POST /v1/batches/{id}/cancel)", self.api.openai.batches.cancel,
                                     f.batch_id)
                if b is None:
                    return
                f.cancel = True
                self.save()
                self.log(f"batch file {f.n}: cancel requested for {f.batch_id} (now {b.status})")
            b = await self._call(f"poll (GET /v1/batches/{f.batch_id})", self.api.openai.batches.retrieve,
                                 f.batch_id)
            if b is None:
                return
            counts = b.request_counts.model_dump() if b.request_counts is not None else {}
            if b.status != f.provider_status or counts != f.counts:
                f.provider_status, f.counts = b.status, counts
                self.save()
                self.log(f"batch file {f.n}: {b.status}, {counts.get('completed', 0)}/{len(f.rows)} rows done "
                         f"({counts.get('failed', 0)} failed) · ${self.ledger.spent:.4f} spent, "
                         f"${self.ledger.reserved:.4f} held")
            if b.status in TERMINAL:
                await self._collect(f, b)
                self._next_poll.pop(f.n, None)
            else:
                self._interval[f.n] = min(POLL_MAX, self._interval.get(f.n, self.cfg.batch_poll) * 1.5)
                self._next_poll[f.n] = time.monotonic() + self._interval[f.n]

    def row_cap(self) -> int:
        """The most bytes one result row can take: ROW_BYTES, plus TOKEN_BYTES per token of
        max_tokens (thinking included) and per logprob alternative."""
        return ROW_BYTES + self.cfg.max_tokens * TOKEN_BYTES * (1 + self.cfg.top_logprobs)

    async def _download(self, f: BatchFile, file_id: str | None, which: str) -> tuple[Path | None, bool] | None:
        """Stream a result file to the checkpoint dir, never past what `f`'s rows can take (its
        cap). (path, cut at the cap), (None, False) for no file, None when stopping or failed."""
        if not file_id:
            return None, False
        path = self.ckpt / f"batch-{f.n}-{which}.jsonl.part"
        cap = len(f.rows) * self.row_cap()
        cut = False

        async def fetch() -> bool:
            nonlocal cut
            got = 0
            try:
                async with self.api.openai.files.with_streaming_response.content(file_id) as resp:
                    with open(path, "wb") as out:
                        async for chunk in resp.iter_bytes(DOWNLOAD_CHUNK):
                            out.write(chunk[:cap - got])
                            got += len(chunk)
                            if got > cap:
                                cut = True
                                break
            except _http_errors() as e:  # the body broke off: read again by the next attempt
                raise Transient(f"download of {file_id} broke off after {got} bytes ({type(e).__name__})",
                                "dropped", billed=False) from None
            return True

        what = f"download (GET /v1/files/{file_id}/content)"
        if await self._call(what, fetch, deadline=self._deadline(cap)) is None:
            return None
        if cut:
            self.log(f"batch file {f.n}: the {which} file {file_id} of batch {f.batch_id} passed its cap of {cap} "
                     f"bytes ({len(f.rows)} rows x ({ROW_BYTES} + --max-tokens {self.cfg.max_tokens} x "
                     f"{TOKEN_BYTES} x (1 + --top-logprobs {self.cfg.top_logprobs})) bytes): not a result file; the "
                     "rows read before the cap are kept, the others charged at their worst case and retried")
        return path, cut

    def _rows(self, path: Path | None):
        """The result rows of a downloaded file, one line at a time; a line longer than a row can
        be, a torn or foreign line is skipped (its row counts as unread)."""
        if path is None:
            return
        limit = self.row_cap()
        with open(path, "rb") as fh:
            while line := fh.readline(limit + 1):
                if len(line) > limit and not line.endswith(b"\n"):
                    while (rest := fh.readline(DOWNLOAD_CHUNK)) and not rest.endswith(b"\n"):
                        pass  # skip the rest of an overlong line without holding it
                    continue
                try:
                    row = json.loads(line.decode("utf-8", "replace"))
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("custom_id"), str):
                    yield row

    async def _collect(self, f: BatchFile, b) -> None:
        """A batch ended: settle and write each row as an online answer; retry what did not complete."""
        out = await self._download(f, getattr(b, "output_file_id", None), "output")
        err = await self._download(f, getattr(b, "error_file_id", None), "error") if out is not None else None
        if out is None or err is None:
            return  # stopping: polled again by the next run
        gen, mine = self.gen, set(f.rows)
        seen: set[str] = set()
        for row in itertools.chain(self._rows(out[0]), self._rows(err[0])):
            sid = row["custom_id"]
            if sid not in mine or sid in seen:
                continue  # not ours, or a provider that listed a row twice: it is paid and written once
            seen.add(sid)
            if sid in self.jobs:
                self._settle_row(f, self.jobs[sid], row)
            else:  # a row of another command's plan (--cancel with other flags): paid, cannot be written
                self._settle_stranger(f, sid, row)
        unread = out[1] or err[1]  # a file cut at its cap: an unseen row may be in the part not read
        for sid in f.rows:
            if sid not in seen:  # in neither file: the provider never ran it (failed or cancelled batch)
                res = self.ledger.held(hold_key(self.state.run_id, f.n, sid))
                if res is not None and unread:
                    gen.settle_worst(res, "unread")
                elif res is not None:
                    self.ledger.settle(res, 0, 0, "not-run")
                if sid in self.jobs:
                    self._again(self.jobs[sid], f"not run by batch {f.batch_id} ({b.status})" if not unread else
                                f"not read: a result file of batch {f.batch_id} passed its cap")
        if b.status == "failed":
            errs = getattr(getattr(b, "errors", None), "data", None) or []
            why = "; ".join(str(getattr(e, "message", e)) for e in errs[:3]) or "no reason given"
            self.log(f"batch file {f.n}: the provider failed batch {f.batch_id} ({why}); its rows are retried "
                     + ("online" if self.cfg.batch_fallback == "online" else "in the next file"))
        f.status = "done"
        self.save()
        for p in (out[0], err[0]):
            if p is not None:
                p.unlink(missing_ok=True)
        self._update_held()

    def _settle_row(self, f: BatchFile, job: SampleRequest, row: dict) -> None:
        gen = self.gen
        res = self.ledger.held(hold_key(self.state.run_id, f.n, job.id))
        if res is None:  # settled by a run killed before it wrote the sample: never charged twice
            res = Reservation(-1, 0, self.tokens.prompt_bound(job.messages), self.cfg.max_tokens, self.prices)
        tries = self.state.tries.get(job.id, 1)
        resp = row.get("response") or {}
        status, body = resp.get("status_code"), resp.get("body")
        if status == 200 and isinstance(body, dict):
            from openai.types.chat import ChatCompletion

            try:
                # parsed as the openai client parses an online answer (`construct`, not a strict
                # validation): a row whose `usage` lies ("lots", 28.5) is still the teacher's answer,
                # and the ledger charges its usage at the worst case (`budget.usage_problem`)
                ans = self.api.answer(lambda: ChatCompletion.construct(**body))
            except Transient as e:  # billed (it completed) but unreadable: charged in full, retried
                gen.settle_worst(res, e.kind)
                self._again(job, e.reason)
                return
            if self.journal.done(job.id, job.key):
                gen.settle_ok(job, res, ans)  # written already (the same prompt twice): paid, not written
            else:
                gen.deliver(job, res, ans, tries)
            return
        usage = _usage(body)
        reason = self.api.mask(json.dumps((body or {}).get("error") if isinstance(body, dict) else None)
                               if status else json.dumps(row.get("error")))
        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 425, 429):
            gen.reject(job, res, Rejected(f"{status} {reason}", status, usage=usage), tries)
            return
        # 429, 5xx, expired, or a row error: the provider did not complete it; the error file is the bill
        if usage is not None:
            gen.settle_reported(res, usage, "batch-error")
        else:
            self.ledger.settle(res, 0, 0, "batch-error")
        self._again(job, reason)

    def _settle_stranger(self, f: BatchFile, sid: str, row: dict) -> None:
        res = self.ledger.held(hold_key(self.state.run_id, f.n, sid))
        if res is None:
            return
        resp = row.get("response") or {}
        if resp.get("status_code") == 200:
            self.gen.settle_reported(res, _usage(resp.get("body")), "batch-other-plan")
        else:
            self.ledger.settle(res, 0, 0, "batch-error")

    def _again(self, job: SampleRequest, reason: str) -> None:
        """Retry a row that did not complete: online or in the next file, or give up for this run."""
        gen = self.gen
        if self.journal.done(job.id, job.key) or self.cancel:  # cancelled: a re-run sends it again
            return
        if self.cfg.batch_fallback == "online":
            self.online.append(job)
        elif self.state.tries.get(job.id, 0) < MAX_BATCH_TRIES:
            self.retry.append(job)
        else:
            gen.fail(job, f"failed in {MAX_BATCH_TRIES} batches (last: {reason})", "batch",
                      self.state.tries.get(job.id, 0), permanent=False)

    def _release(self, f: BatchFile, why: str) -> None:
        for sid in f.rows:
            res = self.ledger.held(hold_key(self.state.run_id, f.n, sid))
            if res is not None:
                self.ledger.settle(res, 0, 0, "released")
        f.status = "released"
        self.save()
        self.log(f"batch file {f.n}: {why}; its {len(f.rows)} holds released")


def status_report(ckpt: Path, ledger: BudgetLedger, done: int, total: int | None) -> str:
    """What `--batch --status` prints: files and their provider status, rows, $ spent and held."""
    state = BatchRunState.load(ckpt / STATE_FILE)
    if state is None:
        return f"no batch run in {ckpt} (no {STATE_FILE}); start one with kdforge generate --batch"
    by = {}
    for f in state.files:
        by[f.status] = by.get(f.status, 0) + 1
    lines = [f"batch run {state.run_id} in {ckpt}: {len(state.files)} files ("
             + ", ".join(f"{n} {s}" for s, n in sorted(by.items())) + f"); {done}/{total or '?'} samples written",
             f"  money: ${ledger.spent:.4f} spent, ${ledger.reserved:.4f} held"
             + (f", budget ${ledger.limit:.2f}" if ledger.limit is not None else "")]
    for f in state.files:
        c = f.counts or {}
        lines.append(f"  file {f.n}: {f.status:<9} {len(f.rows):>6} rows  provider {f.provider_status or '-'}"
                     f" ({c.get('completed', 0)} done, {c.get('failed', 0)} failed)  batch {f.batch_id or '-'}"
                     f"  file {f.file_id or '-'}")
    return "\n".join(lines)
