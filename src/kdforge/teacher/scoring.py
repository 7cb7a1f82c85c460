"""Token scoring over HTTP with money attached: `eval.scoring.TokenScorer` through generate's
budget ledger, response cache and rate limiter (on-policy distillation's priced teacher).

A scoring request (`max_tokens: 0`, the sequence as token ids) bills its prompt tokens at the input
price and nothing else, so its worst case is exact: len(ids) tokens at `Prices.input`. It is
reserved before the request is sent; a request whose reservation would pass the limit is never
sent (BudgetExceededError, exit 3). The reservation settles at the `usage` the server reports if it
can be true, else at the worst case (`BudgetLedger.settle_reported`). A cached answer (same URL,
model, ids, K) costs nothing and sends nothing: a run resumed after a kill re-scores the steps past
its checkpoint from the cache, so spend is never counted twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from kdforge.errors import BudgetExceededError
from kdforge.eval.scoring import TokenScorer
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.cache import ResponseCache, request_key
from kdforge.teacher.pricing import NANO, Prices
from kdforge.teacher.ratelimit import RateLimiter

Rows = list[dict[int, float] | None]  # per position: {token id: teacher logprob}; None at position 0


class PricedScorer:
    """`score(ids)` -> (rows, USD charged for this call, whether the cache answered)."""

    def __init__(self, url: str, model: str | None, top_k: int, api_key_env: str, state_dir: str | Path,
                 prices: Prices | None, limit: float | None, rpm: float | None = None,
                 tpm: float | None = None, delay: float = 0.0, log=print):
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.scorer = TokenScorer(url, model, top_k, api_key_env)
        self.ledger = BudgetLedger(state_dir / "budget.jsonl", prices, limit)
        self.cache = ResponseCache(state_dir / "cache.sqlite", log=log)
        self.limiter = RateLimiter(rpm, tpm, delay, probe=False)
        self._loop = asyncio.new_event_loop()  # the limiter is asyncio; this caller is not
        self._usage: dict | None = None
        # The usage of the answer TokenScorer reads, seen on its way (httpx response hook).
        self.scorer._http.event_hooks["response"].append(self._capture_usage)

    def _capture_usage(self, response) -> None:
        self._usage = None
        if response.request.url.path.endswith("/completions") and response.status_code == 200:
            response.read()
            try:
                self._usage = response.json().get("usage")
            except ValueError:
                pass

    @property
    def spent(self) -> float:
        """USD settled, this run and earlier runs of the same output dir."""
        return self.ledger.spent

    def score(self, ids: list[int]) -> tuple[Rows, float, bool]:
        model = self.scorer.resolved_model()
        body = {"model": model, "prompt": list(ids), "max_tokens": 0, "echo": True,
                "prompt_logprobs": self.scorer.top_k}
        key = request_key(self.scorer.url, body)
        hit = self.cache.get(key)
        if hit is not None:
            return [None if r is None else {int(i): float(lp) for i, lp in r} for r in hit["rows"]], 0.0, True
        res = self.ledger.try_reserve(len(ids), 0)
        if res is None:
            nano = self.ledger.cost_nano(len(ids), 0)
            raise BudgetExceededError(
                f"budget exhausted: spent ${self.ledger.spent:.6f} of ${self.ledger.limit:.6f} "
                f"(generate.budget_limit); scoring the next {len(ids)} tokens costs ${nano / NANO:.6f}; the last "
                "finished step is saved: raise generate.budget_limit and re-run with --resume auto")
        self._loop.run_until_complete(self.limiter.acquire(len(ids)))
        self._usage = None
        try:
            rows = self.scorer(ids)
        except BaseException:
            self.ledger.settle_worst(res, "error")  # outcome unknown: the provider may have billed it
            raise
        u = self._usage or {}
        usd, *_ = self.ledger.settle_reported(res, (u.get("prompt_tokens"), u.get("completion_tokens")), "ok")
        self.cache.put(key, {"text": "", "rows": [None if r is None else sorted(r.items()) for r in rows]})
        return rows, usd, False

    def close(self) -> None:
        self.scorer.close()
        self.cache.close()
        self.ledger.close()
        self._loop.close()
