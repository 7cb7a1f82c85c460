"""The budget ledger: what the teacher has cost, and what it may still cost.

Promise: with a limit set, `spent <= limit` at every moment, across concurrent requests and
across resumes, provided the teacher bills no more than the worst case we reserve (prompt
tokens bounded from above, completion tokens capped by max_tokens).

- Before a request is sent, its worst case is reserved under a lock; a reservation that would
  make spent + reserved pass the limit waits for in-flight requests to settle, and if it still
  does not fit with nothing in flight, raises BudgetExceededError: that request is never sent.
- After the attempt, the reservation is settled at the real usage: the answer's `usage`, 0 for
  an error answer without usage that was surely not billed (429, 4xx), and the full worst case
  when the outcome is unknown (timeout, dropped connection, 5xx, cancelled), since the provider
  may have billed it.
- The teacher's numbers are not trusted (`settle_reported`): usage that is missing, not a whole
  number, negative, or more than the request allowed is charged at the worst case reserved, so
  spend never goes down and never passes the limit, whatever a teacher reports.
- Money is counted in integer nano-dollars computed exactly (Fraction), so no float rounding
  can carry spend over the limit.
- The ledger persists as an append-only JSONL file in the checkpoint directory (`budget.jsonl`):
  a `reserve` line before each send and a `settle` line after. A run killed with requests in
  flight leaves reserves without settles; the next start counts those at their worst case.
  On start the file is compacted to one `carry` line (atomic rename).
- A reservation may carry a `key` and its own prices: a row of a Batch API file, held at the batch
  price while the provider works on it, possibly for hours and across runs. A keyed reservation a
  run leaves open is not counted as spent on the next start but held again (`held(key)`): the batch
  is still running and its results, polled by the next run, settle it. Settling twice is
  impossible: a key's settle line closes it for good.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from kdforge.atomic import atomic_write_text
from kdforge.errors import BudgetExceededError, DataError
from kdforge.atomic import AppendFile
from kdforge.teacher.pricing import NANO, Prices


@dataclass
class Reservation:
    rid: int
    nano: int  # worst-case cost held, nano-dollars
    prompt_tokens: int  # the worst-case token counts it was computed from
    completion_tokens: int
    prices: Prices | None = None  # the prices it is held at, if not the ledger's (a batch row)
    key: str | None = None  # a hold that outlives the run (see the module docstring)


def _to_nano_floor(usd: float) -> int:
    return math.floor(Fraction(usd) * NANO)


def usage_problem(usage: tuple[Any, Any] | None, res: Reservation) -> str | None:
    """Why reported usage (prompt, completion) cannot be what the request cost, or None if it can."""
    if usage is None or usage[0] is None or usage[1] is None:
        return "no usage reported"
    for name, v in zip(("prompt_tokens", "completion_tokens"), usage):
        if type(v) is not int:  # bool is an int to Python, not to a bill
            return f"{name}={v!r} is not a whole number"
        if v < 0:
            return f"{name}={v} is negative"
    if usage[0] > res.prompt_tokens or usage[1] > res.completion_tokens:
        return (f"{usage[0]}+{usage[1]} tokens is more than the request allowed "
                f"({res.prompt_tokens}+{res.completion_tokens})")
    return None


class BudgetLedger:
    """Spend accounting with reservations (see the module docstring). State changes happen under a
    lock; `reserve` waits on an asyncio event, so its waiters live in one event loop."""

    def __init__(self, path: str | Path | None, prices: Prices | None, limit: float | None = None,
                 readonly: bool = False):
        if limit is not None and prices is None:
            raise ValueError("a budget limit needs prices")
        self.path = Path(path) if path else None
        self.prices = prices
        self.limit = limit
        self.limit_nano = _to_nano_floor(limit) if limit is not None else None
        self.spent_nano = 0  # settled, this run and earlier runs
        self.reserved_nano = 0  # held by requests in flight
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.attempts = 0  # settled attempts, all runs
        self.recovered = 0  # reservations of a killed run counted at worst case on load
        self._open: dict[int, Reservation] = {}
        self._keyed: dict[str, Reservation] = {}  # open keyed holds, by key
        self._carried: dict[str, dict] = {}  # keyed holds a previous run left open (replayed lines)
        self._next = 0
        self._lock = threading.Lock()
        self._event: asyncio.Event | None = None
        self._file: AppendFile | None = None
        if self.path:
            self._replay()
            if not readonly:
                self._compact()

    # ------------------------------------------------------------------ money
    def cost_nano(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Exact cost, rounded up to a whole nano-dollar ($0 without prices)."""
        return self.prices.cost_nano(prompt_tokens, completion_tokens) if self.prices else 0

    @property
    def spent(self) -> float:
        """USD spent (settled), all runs of this checkpoint directory."""
        return self.spent_nano / NANO

    @property
    def reserved(self) -> float:
        return self.reserved_nano / NANO

    def fits(self, nano: int) -> bool:
        return self.limit_nano is None or self.spent_nano + self.reserved_nano + nano <= self.limit_nano

    # ------------------------------------------------------------------ reserve / settle
    def try_reserve(self, prompt_tokens: int, completion_tokens: int, prices: Prices | None = None,
                    key: str | None = None) -> Reservation | None:
        """Hold the worst case for one attempt (at `prices` if given), or None if it would pass the
        limit. A `key` makes it a hold that outlives the run (see the module docstring)."""
        p = prices or self.prices
        nano = p.cost_nano(prompt_tokens, completion_tokens) if p else 0
        with self._lock:
            if key is not None and key in self._keyed:
                raise ValueError(f"reservation {key!r} is held already")
            return self._try_reserve_locked(nano, prompt_tokens, completion_tokens, prices, key)

    def _try_reserve_locked(self, nano: int, prompt_tokens: int, completion_tokens: int,
                            prices: Prices | None = None, key: str | None = None,
                            force: bool = False) -> Reservation | None:
        if not force and not self.fits(nano):
            return None
        self._next += 1
        res = Reservation(self._next, nano, prompt_tokens, completion_tokens, prices, key)
        self._open[res.rid] = res
        self.reserved_nano += nano
        line = {"op": "reserve", "rid": res.rid, "nano": nano}
        if key is not None:
            self._keyed[key] = res
            line |= {"key": key, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            if prices is not None:
                line["prices"] = [prices.input, prices.output]
        self._append(line)
        return res

    def held(self, key: str) -> Reservation | None:
        """The open keyed hold `key` (of this run or carried from an earlier one), else None."""
        with self._lock:
            return self._keyed.get(key)

    def held_keys(self) -> list[str]:
        with self._lock:
            return list(self._keyed)

    async def reserve(self, prompt_tokens: int, completion_tokens: int) -> Reservation:
        """Like try_reserve, but waits while in-flight reservations may free room.

        Raises BudgetExceededError once the request cannot fit even with nothing in flight.
        """
        nano = self.cost_nano(prompt_tokens, completion_tokens)
        while True:
            with self._lock:
                res = self._try_reserve_locked(nano, prompt_tokens, completion_tokens)
                if res is not None:
                    return res
                if not self._open:
                    raise BudgetExceededError(
                        f"budget exhausted: spent ${self.spent:.4f} of ${self.limit:.4f}; the next request "
                        f"may cost up to ${nano / NANO:.4f} (prompt + max_tokens at the set prices)")
                if self._event is None:
                    self._event = asyncio.Event()
                event = self._event
            await event.wait()

    def settle(self, res: Reservation, prompt_tokens: int, completion_tokens: int, outcome: str) -> float:
        """Replace a reservation by the real cost of its attempt; returns that cost in USD.

        Usage above the reservation is still counted as spent (it is what we owe); the caller
        should then raise its worst-case estimate (see `kdforge.teacher.tokens`).
        """
        p = res.prices or self.prices
        nano = p.cost_nano(prompt_tokens, completion_tokens) if p else 0
        with self._lock:
            if self._open.pop(res.rid, None) is None:
                return 0.0  # already settled
            if res.key is not None:
                self._keyed.pop(res.key, None)
            self.reserved_nano -= res.nano
            self.spent_nano += nano
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.attempts += 1
            self._append({"op": "settle", "rid": res.rid, "nano": nano, "prompt_tokens": prompt_tokens,
                          "completion_tokens": completion_tokens, "outcome": outcome}
                         | ({"key": res.key} if res.key is not None else {}))
            event, self._event = self._event, None
        if event is not None:
            event.set()
        return nano / NANO

    def settle_reported(self, res: Reservation, usage: tuple[Any, Any] | None,
                        outcome: str) -> tuple[float, int, int, str | None]:
        """Settle at the usage the teacher reported if it can be true, else at the worst case
        reserved. Returns (USD, prompt tokens, completion tokens charged, why usage was not trusted)."""
        problem = usage_problem(usage, res)
        pt, ct = (res.prompt_tokens, res.completion_tokens) if problem else usage
        return self.settle(res, pt, ct, outcome), pt, ct, problem

    def settle_worst(self, res: Reservation, outcome: str) -> float:
        """Settle at the full reservation: the outcome is unknown, the provider may have billed."""
        return self.settle(res, res.prompt_tokens, res.completion_tokens, outcome)

    @property
    def in_flight(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ persistence
    def _append(self, obj: dict) -> None:
        if self._file is not None:
            self._file.append(obj)  # one write() per line: survives SIGKILL (page cache)

    def _replay(self) -> None:
        open_res: dict[int, int] = {}
        keyed: dict[int, dict] = {}  # rid -> reserve line of an open keyed hold
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for i, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines):
                        continue  # torn last line of a killed run: a reserve never sent, or a settle
                        # whose reserve then counts at its worst case below
                    raise DataError("budget ledger line is not JSON; it was not written by kdforge. "
                                    "Restore it or delete the checkpoint directory to start the count over",
                                    str(self.path), i) from None
                op = row.get("op")
                if op in ("carry", "settle") and row["nano"] < 0:  # written before usage was checked
                    row["nano"] = open_res.get(row.get("rid"), 0)  # its worst case if known: never less
                if op == "carry":
                    self.spent_nano += row["nano"]
                    self.prompt_tokens += row.get("prompt_tokens", 0)
                    self.completion_tokens += row.get("completion_tokens", 0)
                    self.attempts += row.get("attempts", 0)
                elif op == "reserve":
                    if row.get("key") is not None:
                        keyed[row["rid"]] = row
                    else:
                        open_res[row["rid"]] = row["nano"]
                elif op == "settle":
                    open_res.pop(row["rid"], None)
                    keyed.pop(row["rid"], None)
                    self.spent_nano += row["nano"]
                    self.prompt_tokens += row.get("prompt_tokens", 0)
                    self.completion_tokens += row.get("completion_tokens", 0)
                    self.attempts += 1
        # Requests in flight when a previous run died: the provider may have billed them in full.
        self.recovered = len(open_res)
        self.spent_nano += sum(open_res.values())
        # Keyed holds (batch rows still at the provider) stay reserved, not spent: held again below.
        self._carried = {row["key"]: row for row in keyed.values()}
        self.reserved_nano += sum(row["nano"] for row in self._carried.values())

    def _compact(self) -> None:
        carry = {"op": "carry", "nano": self.spent_nano, "usd": self.spent, "prompt_tokens": self.prompt_tokens,
                 "completion_tokens": self.completion_tokens, "attempts": self.attempts}
        atomic_write_text(self.path, json.dumps(carry) + "\n")
        self._file = AppendFile(self.path)
        carried, self._carried = self._carried, {}
        for key, row in carried.items():  # re-held under new ids, after the carry line
            self.reserved_nano -= row["nano"]
            prices = Prices(*row["prices"], source="batch hold") if row.get("prices") else None
            self._try_reserve_locked(row["nano"], row["prompt_tokens"], row["completion_tokens"], prices, key,
                                     force=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
