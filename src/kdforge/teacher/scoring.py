"""A teacher over HTTP that scores tokens, plain (`TokenScorer`, for `kdforge eval`) and with money
attached (`PricedScorer`, on-policy distillation's priced teacher).

The request (`scoring_body`): one `POST {url}/completions` per sequence with the sequence's token
ids as `prompt`, `max_tokens: 0`, `echo: true`, `logprobs: K` and vLLM's `prompt_logprobs: K`
(SPEC "serve: scoring tokens"; `kdforge serve` and vLLM answer it). The rows come from
`prompt_logprobs`, which name token IDS: the legacy `top_logprobs` name tokens by text, which a
byte-level fragment does not have, so a server that sends none is refused (exit 2) rather than
guessed at.

The answer (`read_rows`) is checked entry by entry before anything trains on it or is cached: one
row per sent token, each naming that token; ids integers inside the student's vocabulary, each
once; log-probs finite, <= 0, a row's mass <= 1 (to rounding). A row with more than the K asked
for (plus the sent token) is cut to its K best. Anything else is a teacher whose scores cannot be
true: `TeacherAnswerError` (exit 1) naming the teacher, the position and what was wrong.

`PricedScorer`: scoring through generate's budget ledger, response cache, rate limiter and retry
rules. A scoring request bills its prompt tokens at the input price and nothing else, so its
worst case is exact: len(ids) tokens at `Prices.input`, reserved before each attempt; a request
whose reservation would pass the limit is never sent (BudgetExceededError, exit 3). A 429 pauses
the limiter for its Retry-After (else a backoff) and is retried (4 x max_retries times); 5xx,
timeouts and dropped connections back off and are retried max_retries times, each charged at the
worst case (the outcome is unknown); every attempt has a whole-request deadline
(`generate.timeout`), so a server that drips its answer a byte at a time times out. The
reservation of an answer settles at the `usage` it reports if that can be true, else at the worst
case (`BudgetLedger.settle_reported`). Only checked rows are cached; a cached answer (same URL,
model, ids, K) costs nothing and sends nothing, and is checked again when read (a cache written by
an older kdforge may hold rows it would refuse now: those are scored again).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from kdforge.errors import BudgetExceededError, KdforgeError, TeacherRefusedError, UsageError
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.cache import ResponseCache, request_key
from kdforge.teacher.pricing import NANO, Prices
from kdforge.teacher.ratelimit import RateLimiter

Rows = list[dict[int, float] | None]  # per position: {token id: teacher logprob}; None at position 0


TIMEOUT_S = 120.0  # one scoring request: a long sequence on a busy CPU server takes tens of seconds
POSITIVE_SLACK = 1e-3  # a log-prob this far above 0 is rounding (then read as 0); more is a lie
MASS_SLACK = 0.05  # a row's stored probabilities may sum to 1.05 (rounded digits); more is a lie
_ID = re.compile(r"[0-9]+")


class TeacherAnswerError(KdforgeError):
    """The teacher answered a scoring request with rows that cannot be true (exit 1): nothing of it
    was trained on or cached."""


def scoring_body(model: str, ids: list[int], top_k: int) -> dict:
    """The /completions body that scores `ids` (and generates nothing)."""
    return {"model": model, "prompt": list(ids), "max_tokens": 0, "echo": True, "logprobs": top_k,
            "prompt_logprobs": top_k, "temperature": 0}


@dataclass
class RowCheck:
    """What `read_rows` checks against: the sent ids, the K asked for, the student's vocabulary
    size (None: not checked), and the teacher's name for messages."""

    ids: list[int]
    top_k: int
    vocab: int | None
    where: str
    capped: int = 0  # rows cut to K + 1 entries (the teacher sent more than asked)

    def lie(self, t: int | None, what: str) -> TeacherAnswerError:
        at = f" at position {t} of {len(self.ids)}" if t is not None else ""
        return TeacherAnswerError(
            f"the teacher at {self.where} answered a scoring request with scores that cannot be true{at}: {what}. "
            "Nothing of that answer was trained on or cached; fix the teacher (or use another), then re-run "
            "with --resume auto")


def read_rows(answer, check: RowCheck) -> Rows:
    """The checked rows of a scoring answer (see the module docstring): None for position 0, then
    {token id: logprob} per sent token, at most K + 1 entries. Raises UsageError (exit 2) when the
    server sends no `prompt_logprobs` at all, TeacherAnswerError (exit 1) when they are wrong."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise check.lie(None, "no choices[0] object in the answer")
    rows = choices[0].get("prompt_logprobs")
    if rows is None:
        raise UsageError(f"--teacher {check.where} sent no prompt_logprobs for the {len(check.ids)} tokens (vLLM's "
                         "field, which names token ids): use kdforge serve or vLLM, or a teacher folder")
    if not isinstance(rows, list) or len(rows) != len(check.ids):
        got = f"{len(rows)} rows" if isinstance(rows, list) else f"a {type(rows).__name__}"
        raise check.lie(None, f"prompt_logprobs is {got} for the {len(check.ids)} tokens sent")
    return [None] + [read_row(rows[t], t, check) for t in range(1, len(rows))]


def read_row(row, t: int, check: RowCheck) -> dict[int, float]:
    """Position t's row, checked: {token id: logprob}; a vLLM entry ({"logprob": x, ...}) or a bare
    number is accepted as the log-prob."""
    if not isinstance(row, dict) or not row:
        raise check.lie(t, f"the row is {_show(row)}, not the scores of token {check.ids[t]}")
    out: dict[int, float] = {}
    for key, entry in row.items():
        i = _token_id(key)
        if i is None:
            raise check.lie(t, f"token id {_show(key)} is not an integer")
        if check.vocab is not None and i >= check.vocab:
            raise check.lie(t, f"token id {i} is outside the student's vocabulary (ids 0..{check.vocab - 1})")
        lp = entry.get("logprob") if isinstance(entry, dict) else entry
        if isinstance(lp, bool) or not isinstance(lp, (int, float)):
            raise check.lie(t, f"the log-prob of token {i} is {_show(lp)}, not a number")
        if not math.isfinite(lp) or lp > POSITIVE_SLACK:
            raise check.lie(t, f"the log-prob of token {i} is {lp} (a log-probability is finite and <= 0)")
        if i in out:
            raise check.lie(t, f"token id {i} is listed twice")
        out[i] = min(float(lp), 0.0)
    if check.ids[t] not in out:
        raise check.lie(t, f"the row does not score the token sent there (id {check.ids[t]}); it names "
                           f"{sorted(out)[:5]}")
    mass = math.fsum(math.exp(v) for v in out.values())
    if mass > 1.0 + MASS_SLACK:
        raise check.lie(t, f"its probabilities sum to {mass:.3f} (> 1)")
    if len(out) > check.top_k + 1:  # K asked for, plus the sent token where it is not among them
        check.capped += 1
        keep = sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:check.top_k]
        out = dict(keep) | {check.ids[t]: out[check.ids[t]]}
    return out


def _token_id(key) -> int | None:
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key >= 0 else None
    if isinstance(key, str) and _ID.fullmatch(key):
        return int(key)
    return None


def _show(x) -> str:
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _cached_rows(hit: dict, check: RowCheck) -> Rows | None:
    """Rows of a cache entry, checked as an answer is; None when they are not what this kdforge
    would have cached (an older version cached unchecked rows)."""
    rows = hit.get("rows")
    if not isinstance(rows, list) or len(rows) != len(check.ids):
        return None
    try:
        return [None] + [read_row({i: lp for i, lp in r} if isinstance(r, list) else r, t, check)
                         for t, r in enumerate(rows) if t > 0]
    except (TeacherAnswerError, TypeError, ValueError):
        return None


class TokenScorer:
    """`scorer(ids)` -> per position, {token id: teacher logprob} (None for position 0), checked."""

    def __init__(self, url: str, model: str | None = None, top_k: int = 20, api_key_env: str = "OPENAI_API_KEY",
                 vocab_size: int | None = None):
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.api_key_env = api_key_env
        key = os.environ.get(api_key_env) or ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(timeout=TIMEOUT_S, headers=headers)
        self.last_usage: dict | None = None  # `usage` of the last scoring answer (what it billed)

    def resolved_model(self) -> str:
        """The model to ask for: given, or the server's only one (GET /models)."""
        if self.model is None:
            r = self._http.get(f"{self.url}/models")
            self._check(r)
            ids = [m.get("id") for m in r.json().get("data", [])]
            if len(ids) != 1:
                raise UsageError(f"--teacher {self.url} serves {len(ids)} models ({', '.join(map(str, ids[:5]))}): "
                                 "name one with --teacher-model")
            self.model = ids[0]
        return self.model

    def _check(self, r) -> None:
        if r.status_code in (401, 403, 404):
            raise TeacherRefusedError(f"--teacher {self.url} refused us ({r.status_code}): {r.text[:300]}")
        if r.status_code >= 400:
            raise UsageError(f"--teacher {self.url} answered {r.status_code}: {r.text[:300]}")

    def row_check(self, ids: list[int]) -> RowCheck:
        return RowCheck(list(ids), self.top_k, self.vocab_size, self.url)

    def __call__(self, ids: list[int]) -> list[dict[int, float] | None]:
        import httpx

        self.last_usage = None
        try:
            r = self._http.post(f"{self.url}/completions", json=scoring_body(self.resolved_model(), ids, self.top_k))
        except httpx.HTTPError as e:
            raise UsageError(f"--teacher {self.url} cannot be reached ({e}); start it (kdforge serve DIR) "
                             "or give a teacher folder") from None
        self._check(r)
        try:
            answer = r.json()
        except ValueError:
            raise self.row_check(ids).lie(None, f"the answer is not JSON ({r.text[:80]!r})") from None
        self.last_usage = answer.get("usage") if isinstance(answer, dict) and isinstance(answer.get("usage"), dict) \
            else None
        return read_rows(answer, self.row_check(ids))

    def close(self) -> None:
        self._http.close()


@dataclass
class Retries:
    """generate's retry settings (config `generate`): max_retries, retry_base, retry_max seconds,
    and the whole-request deadline `timeout` seconds."""

    max_retries: int = 8
    retry_base: float = 1.0
    retry_max: float = 60.0
    timeout: float = TIMEOUT_S


class PricedScorer:
    """`score(ids)` -> (rows, USD charged for this call, whether the cache answered)."""

    def __init__(self, url: str, model: str | None, top_k: int, api_key_env: str, state_dir: str | Path,
                 prices: Prices | None, limit: float | None, rpm: float | None = None,
                 tpm: float | None = None, delay: float = 0.0, log=print, *, vocab_size: int | None = None,
                 retries: Retries | None = None, seed: int = 0):
        from kdforge.teacher.client import TeacherClient

        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.scorer = TokenScorer(url, model, top_k, api_key_env, vocab_size)
        self.ledger = BudgetLedger(state_dir / "budget.jsonl", prices, limit)
        self.cache = ResponseCache(state_dir / "cache.sqlite", log=log)
        self.limiter = RateLimiter(rpm, tpm, delay, probe=False, log=log)
        self.retries = retries or Retries()
        self.log = log
        self._rng = random.Random(seed)
        self._said: set[str] = set()
        self._loop = asyncio.new_event_loop()  # the limiter and the client are asyncio; this caller is not
        self.client = TeacherClient(self.scorer.url, os.environ.get(api_key_env) or None, self.retries.timeout,
                                    api_key_env)

    @property
    def spent(self) -> float:
        """USD settled, this run and earlier runs of the same output dir."""
        return self.ledger.spent

    def score(self, ids: list[int]) -> tuple[Rows, float, bool]:
        """The teacher's checked rows for `ids` (see `read_rows`), the USD this call charged and
        whether the cache answered. Raises BudgetExceededError before a request the budget cannot
        hold, TeacherAnswerError (exit 1) for rows that cannot be true (not cached), KdforgeError
        past the retry limits, TeacherRefusedError / UsageError when the teacher refuses."""
        model = self.scorer.resolved_model()
        check = self.scorer.row_check(ids)
        # the cache key's body: what identifies the answer (the sent body adds logprobs/temperature)
        key = request_key(self.scorer.url, {"model": model, "prompt": list(ids), "max_tokens": 0, "echo": True,
                                            "prompt_logprobs": self.scorer.top_k})
        hit = self.cache.get(key)
        if hit is not None:
            rows = _cached_rows(hit, check)
            if rows is not None:
                return rows, 0.0, True
            self._say("stale", f"warning: cached scores in {self.cache.path} that this kdforge would refuse "
                               "(cached before rows were checked) are scored again")
        answer, usd = self.send(scoring_body(model, ids, self.scorer.top_k), len(ids))
        rows = read_rows(answer, check)
        if check.capped:
            self._say("capped", f"the teacher at {self.scorer.url} sent more than the {self.scorer.top_k} alternatives "
                                "asked for (teacher.top_logprobs): each row is cut to its best "
                                f"{self.scorer.top_k} plus the scored token")
        self.cache.put(key, {"text": "", "rows": [None if r is None else sorted(r.items()) for r in rows]})
        return rows, usd, False

    def send(self, body: dict, prompt_tokens: int) -> tuple[dict, float]:
        """POST `body` to {url}/completions, priced at `prompt_tokens` input tokens, through the
        ledger, the limiter and generate's retry rules; -> (the answer's JSON, USD charged in all
        attempts). The answer is not checked here (callers do, before caching it)."""
        return self._loop.run_until_complete(self._send(body, prompt_tokens))

    async def _send(self, body: dict, prompt_tokens: int) -> tuple[dict, float]:
        from kdforge.teacher.client import AttemptFailed, RateLimited, RetryCount

        r = self.retries
        tries = RetryCount(r.max_retries, r.retry_base, r.retry_max, self._rng)
        usd = 0.0
        while True:
            res = self._reserve(prompt_tokens)
            await self.limiter.acquire(prompt_tokens)
            try:
                answer, headers = await self._attempt(body)
            except (TeacherRefusedError, UsageError):  # refused (401/403/404, another 4xx): before any work
                self.ledger.settle(res, 0, 0, "refused")
                raise
            except AttemptFailed as e:
                usd += self._settle_failed(res, e)
                self.limiter.observe(e.headers or None)
                wait, gave_up = tries.after(e)  # generate's rules
                if gave_up:
                    raise self._gave_up(e, tries)
                if isinstance(e, RateLimited):
                    self.limiter.on_429(wait, e.headers)  # acquire() waits it out
                else:
                    await asyncio.sleep(wait)
                continue
            except BaseException:
                self.ledger.settle_worst(res, "error")  # outcome unknown: the provider may have billed it
                raise
            self.limiter.observe(headers)
            u = answer.get("usage") if isinstance(answer, dict) and isinstance(answer.get("usage"), dict) else {}
            c, *_ = self.ledger.settle_reported(res, (u.get("prompt_tokens"), u.get("completion_tokens")), "ok")
            self.scorer.last_usage = u or None
            return answer, usd + c

    def _reserve(self, prompt_tokens: int):
        res = self.ledger.try_reserve(prompt_tokens, 0)
        if res is None:
            nano = self.ledger.cost_nano(prompt_tokens, 0)
            raise BudgetExceededError(
                f"budget exhausted: spent ${self.ledger.spent:.6f} of ${self.ledger.limit:.6f} "
                f"(generate.budget_limit); scoring the next {prompt_tokens} tokens costs ${nano / NANO:.6f}; the "
                "last finished step is saved: raise generate.budget_limit and re-run with --resume auto")
        return res

    async def _attempt(self, body: dict) -> tuple[dict, dict]:
        """One request with a whole-request deadline; its failures classified as generate's are
        (client.TeacherClient): -> (the answer's JSON, its headers)."""
        import json

        from kdforge.teacher.client import Rejected, Transient

        extra = {k: v for k, v in body.items() if k not in ("model", "prompt", "max_tokens", "echo", "logprobs",
                                                             "temperature")}
        call = self.client.call("scoring", self.client.openai.completions.with_raw_response.create,
                                model=body["model"], prompt=body["prompt"], max_tokens=body["max_tokens"],
                                echo=body["echo"], logprobs=body["logprobs"], temperature=body["temperature"],
                                extra_body=extra or None)
        try:
            raw = await asyncio.wait_for(call, self.retries.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise Transient(f"no whole answer within {self.retries.timeout:g} s (generate.timeout)", "timeout",
                            billed=True) from None
        except Rejected as e:
            if e.status == 404:
                raise TeacherRefusedError(f"the teacher at {self.scorer.url} does not know model {body['model']!r} "
                                          f"or has no /completions (404: {e.reason})") from None
            raise UsageError(f"the teacher at {self.scorer.url} refused the scoring request ({e.reason}): it must "
                             "answer /completions with echo and prompt_logprobs (kdforge serve, vLLM)") from None
        except Transient as e:
            e.billed = e.kind != "connect"  # a scoring request that reached the server may be billed
            raise
        try:
            return json.loads(raw.text), dict(raw.headers)
        except ValueError:
            raise Transient(self.client.mask(f"unreadable answer ({raw.text[:80]!r})"), "bad-answer", billed=True,
                            headers=dict(raw.headers)) from None

    def _settle_failed(self, res, e) -> float:
        """generate's rule: the usage an error reports if it gives one; else the worst case when the
        outcome is unknown (5xx, timeout, dropped), nothing when refused before any work (429)."""
        if e.usage is not None:
            return self.ledger.settle_reported(res, e.usage, e.kind)[0]
        if getattr(e, "billed", False):
            return self.ledger.settle_worst(res, e.kind)
        return self.ledger.settle(res, 0, 0, e.kind)

    def _gave_up(self, e, tries) -> KdforgeError:
        """The error (exit 1) for a teacher that stays throttled or down past generate's retry limits."""
        return KdforgeError(f"the teacher at {self.scorer.url} gave no scores after {tries.failures} attempts (last: "
                            f"{e.reason}); generate.max_retries is {self.retries.max_retries}. The last finished step "
                            "is saved: re-run with --resume auto once the teacher answers")

    def _say(self, what: str, message: str) -> None:
        if what not in self._said:
            self._said.add(what)
            self.log(message)

    def close(self) -> None:
        self.scorer.close()
        self.cache.close()
        self.ledger.close()
        try:
            self._loop.run_until_complete(self.client.aclose())
        finally:
            self._loop.close()
