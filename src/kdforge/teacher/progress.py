"""What a generate run shows: counters, a progress bar on a terminal (plain log lines
otherwise, every 10% or 10 s), and the final summary."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field

LOG_EVERY = 10.0  # seconds between plain progress lines


@dataclass
class Stats:
    total: int
    done_before: int  # samples already in the file when the run started
    started: float = field(default_factory=time.monotonic)
    written: int = 0  # samples written this run (cached ones included)
    cached: int = 0
    requests: int = 0  # attempts sent this run
    prompt_tokens: int = 0  # billed this run, all attempts
    completion_tokens: int = 0
    cost: float = 0.0  # USD this run
    failed: Counter = field(default_factory=Counter)  # reason kind -> samples
    retries: Counter = field(default_factory=Counter)  # error kind -> attempts retried
    note: str = ""  # a mode's own progress (batch files submitted / in progress / done), shown in the line
    _starts: deque = field(default_factory=deque)  # monotonic times of recent request starts
    _tokens: deque = field(default_factory=deque)  # (time, tokens) of recent answers

    @property
    def done(self) -> int:
        return self.done_before + self.written

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def on_start(self) -> None:
        self.requests += 1
        self._starts.append(time.monotonic())

    def on_usage(self, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost += cost
        self._tokens.append((time.monotonic(), prompt_tokens + completion_tokens))

    def _window(self) -> float:
        now = time.monotonic()
        for q, get in ((self._starts, lambda x: x), (self._tokens, lambda x: x[0])):
            while q and now - get(q[0]) > 60:
                q.popleft()
        return max(1e-6, min(60.0, self.elapsed))

    def per_minute(self) -> tuple[float, float]:
        """(requests/min, tokens/min) over the last minute."""
        w = self._window()
        return len(self._starts) * 60 / w, sum(t for _, t in self._tokens) * 60 / w

    def eta(self) -> float | None:
        if self.written - self.cached <= 0 or self.done >= self.total:
            return None
        rate = (self.written - self.cached) / self.elapsed
        return (self.total - self.done) / rate

    def line(self, spent_total: float | None, limit: float | None) -> str:
        rpm, tpm = self.per_minute()
        money = "cost unknown" if spent_total is None else f"${spent_total:.4f} spent" + (
            f" of ${limit:.2f}" if limit is not None else "")
        errs = sum(self.retries.values()) + sum(self.failed.values())
        eta = self.eta()
        pace = f"{rpm:.0f} req/min"
        if self.note and not self._starts:  # --batch: rows go out in files, never one request at a time
            pace = f"{self.written * 60 / max(self.elapsed, 1e-6):.0f} samples/min"
        return (f"{self.done}/{self.total} samples · {money} · {pace} · {tpm / 1000:.1f}k tok/min · "
                f"ETA {_hms(eta) if eta is not None else '-'} · errors {errs}" + (f" · {self.note}" if self.note else ""))


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressView:
    """A rich progress bar when stderr is a terminal, plain log lines otherwise."""

    def __init__(self, stats: Stats, money, limit: float | None, stream=None):
        self.stats, self.money, self.limit = stats, money, limit  # money(): total USD spent or None
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() and not os.environ.get("CI")  # no bar in CI logs
        self._bar = None
        self._last_log = time.monotonic()
        self._last_decile = stats.done * 10 // max(1, stats.total)

    def __enter__(self) -> "ProgressView":
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), console=Console(file=self.stream),
                                 transient=False)
            self._task = self._bar.add_task("generate", total=self.stats.total, completed=self.stats.done, info="")
            self._bar.start()
        return self

    def log(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, file=self.stream, flush=True)

    def refresh(self) -> None:
        s = self.stats
        if self._bar is not None:
            info = s.line(self.money(), self.limit).split(" · ", 1)[1]
            self._bar.update(self._task, completed=s.done, info=info)
            return
        decile = s.done * 10 // max(1, s.total)
        if decile > self._last_decile or time.monotonic() - self._last_log >= LOG_EVERY:
            self._last_decile, self._last_log = decile, time.monotonic()
            self.log("generate: " + s.line(self.money(), self.limit))

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self.refresh()
            self._bar.stop()


def summary_text(s: Stats, out: str, failures_path: str, spent_total: float | None, limit: float | None,
                 corrupted: int, status: str) -> str:
    """The final report: samples, cached, failed by reason, tokens, cost, wall time."""
    new = s.written - s.cached
    failed = sum(s.failed.values())
    by_reason = ", ".join(f"{k}: {v}" for k, v in s.failed.most_common()) or "none"
    retried = ", ".join(f"{k} x{v}" for k, v in s.retries.most_common()) or "none"
    cost_run = "unknown (no price for this model)" if spent_total is None else f"${s.cost:.4f}"
    cost_all = "" if spent_total is None else f", ${spent_total:.4f} in total" + (
        f" of a ${limit:.2f} budget" if limit is not None else "")
    elapsed = s.elapsed
    rate = s.requests * 60 / elapsed if elapsed > 0 else 0.0
    lines = [
        f"generate {status}: {s.done}/{s.total} samples in {out} "
        f"({new} new, {s.cached} from cache, {s.done_before} already there)",
        f"  failed:    {failed} ({by_reason})" + (f" -> {failures_path}" if failed else ""),
        f"  retried:   {retried}",
        f"  requests:  {s.requests} sent ({rate:.1f}/min), {s.cached} cache hits, {corrupted} corrupted cache entries",
        f"  tokens:    {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion "
        f"= {s.prompt_tokens + s.completion_tokens:,}",
        f"  cost:      {cost_run} this run{cost_all}",
        f"  wall time: {elapsed:.1f} s",
    ]
    return "\n".join(lines)
