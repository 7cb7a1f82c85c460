"""A teacher over HTTP that scores tokens, plain (`TokenScorer`, for `kdforge eval`) and with money
attached (`PricedScorer`, on-policy distillation's priced teacher).

`TokenScorer`: one `POST {url}/completions` per sequence with the sequence's token ids as `prompt`,
`max_tokens: 0`, `echo: true`, `logprobs: K` and vLLM's `prompt_logprobs: K` (SPEC "serve: scoring
tokens"; `kdforge serve` and vLLM answer it). The rows come from `prompt_logprobs`, which name
token IDS: the legacy `top_logprobs` name tokens by text, which a byte-level fragment does not
have, so a server that sends only those is refused rather than guessed at.

`PricedScorer`: `TokenScorer` through generate's budget ledger, response cache and rate limiter.
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
import os
from pathlib import Path

from kdforge.errors import BudgetExceededError, TeacherRefusedError, UsageError
from kdforge.teacher.budget import BudgetLedger
from kdforge.teacher.cache import ResponseCache, request_key
from kdforge.teacher.pricing import NANO, Prices
from kdforge.teacher.ratelimit import RateLimiter

Rows = list[dict[int, float] | None]  # per position: {token id: teacher logprob}; None at position 0


TIMEOUT_S = 120.0  # one scoring request: a long sequence on a busy CPU server takes tens of seconds


class TokenScorer:
    """`scorer(ids)` -> per position, {token id: teacher logprob} (None for position 0)."""

    def __init__(self, url: str, model: str | None = None, top_k: int = 20, api_key_env: str = "OPENAI_API_KEY"):
        import httpx

        self.url = url.rstrip("/")
        self.model = model
        self.top_k = top_k
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

    def __call__(self, ids: list[int]) -> list[dict[int, float] | None]:
        import httpx

        self.last_usage = None
        body = {"model": self.resolved_model(), "prompt": list(ids), "max_tokens": 0, "echo": True,
                "logprobs": self.top_k, "prompt_logprobs": self.top_k, "temperature": 0}
        try:
            r = self._http.post(f"{self.url}/completions", json=body)
        except httpx.HTTPError as e:
            raise UsageError(f"--teacher {self.url} cannot be reached ({e}); start it (kdforge serve DIR) "
                             "or give a teacher folder") from None
        self._check(r)
        answer = r.json()
        self.last_usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
        rows = (answer.get("choices") or [{}])[0].get("prompt_logprobs")
        if not isinstance(rows, list) or len(rows) != len(ids):
            raise UsageError(f"--teacher {self.url} sent no prompt_logprobs for the {len(ids)} tokens (vLLM's "
                             "field, which names token ids): use kdforge serve or vLLM, or a teacher folder")
        return [None if row is None else {int(k): float(v["logprob"]) for k, v in row.items()} for row in rows]

    def close(self) -> None:
        self._http.close()


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
        try:
            rows = self.scorer(ids)
        except BaseException:
            self.ledger.settle_worst(res, "error")  # outcome unknown: the provider may have billed it
            raise
        u = self.scorer.last_usage or {}
        usd, *_ = self.ledger.settle_reported(res, (u.get("prompt_tokens"), u.get("completion_tokens")), "ok")
        self.cache.put(key, {"text": "", "rows": [None if r is None else sorted(r.items()) for r in rows]})
        return rows, usd, False

    def close(self) -> None:
        self.scorer.close()
        self.cache.close()
        self.ledger.close()
        self._loop.close()
