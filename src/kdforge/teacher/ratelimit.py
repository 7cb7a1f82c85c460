"""Pace request starts so the teacher's rate limits are used fully and never crossed.

- Requests/min and tokens/min are paced with GCRA (a virtual schedule): each start pushes the
  next allowed start by 60/rpm seconds, and by tokens*60/tpm for the token limit, so the
  long-run rate equals the limit without bursts. A start that woke up to `SLACK` late keeps
  the schedule instead of drifting below the limit; idle time earns no burst.
- The limits come from `--rpm/--tpm` and from the teacher itself (tier detection): every
  answer's `x-ratelimit-limit-*` headers re-set them (the lower of flag and header wins), and
  `x-ratelimit-remaining-requests: 0` holds starts for one interval (`-tokens: 0`: up to 1 s).
- Until the first answer arrives only one request is in flight (a probe), so a client that
  does not know its tier yet cannot open with a burst of 429s.
- A 429 calls `on_429`: no worker starts a request before its Retry-After ends; then, if the
  limit was spent, the schedule restarts at the paced rate (no catch-up burst); if the headers
  show quota left (a 429 for an overloaded teacher), the schedule goes on where it was.
- `--delay` is a minimum gap between request starts.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Callable, Mapping

TOKENS_PAUSE_MAX = 1.0  # seconds held when the teacher reports no tokens left (its reset may say longer)
SLACK = 0.1  # seconds a late wake-up (or a short pause) may borrow back from the schedule
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(text: str | None) -> float | None:
    """Seconds in '20ms', '1s', '6m0s', '1h2m3.5s' or a bare number; None if unreadable."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(a + u for a, u in parts) != text:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(a) * scale[u] for a, u in parts)


def _keep_schedule(slot: float, now: float) -> float:
    """Where the next interval starts: the slot we were due at if we woke within SLACK of it
    (so a few ms of lateness never lowers the rate), else now (no credit for idle time)."""
    return slot if now - slot <= SLACK else now


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    v = headers.get(name)
    try:
        return int(float(v)) if v is not None else None
    except ValueError:
        return None


class RateLimiter:
    def __init__(self, rpm: float | None = None, tpm: float | None = None, min_gap: float = 0.0, *,
                 probe: bool = True, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = asyncio.sleep, log: Callable[[str], None] | None = None):
        self.user_rpm, self.user_tpm = rpm, tpm
        self.header_rpm: int | None = None
        self.header_tpm: int | None = None
        self.min_gap = min_gap  # seconds between request starts
        self.clock, self.sleep, self.log = clock, sleep, log or (lambda msg: None)
        self.pause_until = -math.inf
        self._tat_req = -math.inf  # earliest next start allowed by requests/min (GCRA schedule)
        self._tat_tok = -math.inf  # same for tokens/min
        self._last_start = -math.inf
        self._lock = asyncio.Lock()
        self._probing = probe
        self._probe_sent = False
        self._probe_done = asyncio.Event()
        self.starts = 0
        self.pauses = 0

    @property
    def rpm(self) -> float | None:
        known = [x for x in (self.user_rpm, self.header_rpm) if x]
        return min(known) if known else None

    @property
    def tpm(self) -> float | None:
        known = [x for x in (self.user_tpm, self.header_tpm) if x]
        return min(known) if known else None

    # ------------------------------------------------------------------ starting
    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request costing `tokens` (prompt estimate + max_tokens) may start."""
        if self._probing and not self._probe_done.is_set():
            if self._probe_sent:
                await self._probe_done.wait()
            else:
                self._probe_sent = True
        async with self._lock:  # one waiter at a time: starts are handed out in order
            while True:
                now = self.clock()
                t = self._earliest(now)
                if t <= now:
                    self._commit(now, tokens)
                    return
                await self.sleep(t - now)

    def _earliest(self, now: float) -> float:
        t = max(self.pause_until, self._last_start + self.min_gap)
        if self.rpm:
            t = max(t, self._tat_req)
        if self.tpm:
            t = max(t, self._tat_tok)
        return t

    def _commit(self, now: float, tokens: int) -> None:
        if self.rpm:
            self._tat_req = _keep_schedule(self._tat_req, now) + 60.0 / self.rpm
        if self.tpm:
            self._tat_tok = _keep_schedule(self._tat_tok, now) + tokens * 60.0 / self.tpm
        self._last_start = now
        self.starts += 1

    # ------------------------------------------------------------------ feedback
    def pause(self, seconds: float, keep_schedule: bool = False) -> None:
        """Shared pause: nobody starts before `seconds` from now. Unless `keep_schedule`, the
        paced schedule restarts after the pause (the time paused is not made up for)."""
        until = self.clock() + max(0.0, seconds)
        if until > self.pause_until:
            self.pause_until = until
            self.pauses += 1
        if not keep_schedule:
            self._tat_req = max(self._tat_req, self.pause_until)
            self._tat_tok = max(self._tat_tok, self.pause_until)

    def on_429(self, seconds: float, headers: Mapping[str, str] | None) -> None:
        """A 429 pauses every worker for `seconds` (the server's Retry-After, else a backoff).

        If its headers show quota left (remaining requests and tokens > 0), the 429 was not about
        our pace (an overloaded teacher): after the pause the schedule goes on where it was.
        Otherwise (quota spent, or no headers) the schedule restarts after the pause.
        """
        rem = [_int_header(headers or {}, f"x-ratelimit-remaining-{k}") for k in ("requests", "tokens")]
        quota_left = any(r is not None for r in rem) and all(r is None or r > 0 for r in rem)
        self.pause(seconds, keep_schedule=quota_left)

    def observe(self, headers: Mapping[str, str] | None) -> None:
        """Learn from an answer (or from a failed attempt: headers None). Re-syncs the limits."""
        self._probe_done.set()
        if not headers:
            return
        rpm = _int_header(headers, "x-ratelimit-limit-requests")
        tpm = _int_header(headers, "x-ratelimit-limit-tokens")
        if (rpm and rpm != self.header_rpm) or (tpm and tpm != self.header_tpm):
            self.header_rpm = rpm or self.header_rpm
            self.header_tpm = tpm or self.header_tpm
            if self.rpm:  # starts made before we knew the tier count too
                self._tat_req = max(self._tat_req, self._last_start + 60.0 / self.rpm)
            parts = [f"{self.header_rpm} requests/min" if self.header_rpm else None,
                     f"{self.header_tpm} tokens/min" if self.header_tpm else None]
            self.log(f"teacher rate limits detected (x-ratelimit-* headers): {', '.join(p for p in parts if p)}; "
                     f"pacing at {self._describe()}")
        if _int_header(headers, "x-ratelimit-remaining-requests") == 0 and self.rpm:
            interval = 60.0 / self.rpm  # the next request comes back within one interval
            reset = parse_duration(headers.get("x-ratelimit-reset-requests"))
            self.pause(min(reset, interval) if reset is not None else interval)
        if _int_header(headers, "x-ratelimit-remaining-tokens") == 0:
            reset = parse_duration(headers.get("x-ratelimit-reset-tokens"))
            self.pause(min(reset, TOKENS_PAUSE_MAX) if reset is not None else TOKENS_PAUSE_MAX)

    def _describe(self) -> str:
        parts = []
        if self.rpm:
            parts.append(f"{self.rpm:g} requests/min")
        if self.tpm:
            parts.append(f"{self.tpm:g} tokens/min")
        if self.min_gap:
            parts.append(f"one start per {self.min_gap:g} s at most")
        return ", ".join(parts) or "no limit (concurrency only)"
