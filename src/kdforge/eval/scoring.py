"""A teacher over HTTP that scores tokens: top-K logprobs of every token of a token-id sequence.

One `POST {url}/completions` per sequence with the sequence's token ids as `prompt`,
`max_tokens: 0`, `echo: true`, `logprobs: K` and vLLM's `prompt_logprobs: K` (SPEC "serve: scoring
tokens"; `kdforge serve` and vLLM answer it). The rows come from `prompt_logprobs`, which name
token IDS: the legacy `top_logprobs` name tokens by text, which a byte-level fragment does not
have, so a server that sends only those is refused rather than guessed at.
"""

from __future__ import annotations

import os

from kdforge.errors import TeacherRefusedError, UsageError

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

        body = {"model": self.resolved_model(), "prompt": list(ids), "max_tokens": 0, "echo": True,
                "logprobs": self.top_k, "prompt_logprobs": self.top_k, "temperature": 0}
        try:
            r = self._http.post(f"{self.url}/completions", json=body)
        except httpx.HTTPError as e:
            raise UsageError(f"--teacher {self.url} cannot be reached ({e}); start it (kdforge serve DIR) "
                             "or give a teacher folder") from None
        self._check(r)
        rows = (r.json().get("choices") or [{}])[0].get("prompt_logprobs")
        if not isinstance(rows, list) or len(rows) != len(ids):
            raise UsageError(f"--teacher {self.url} sent no prompt_logprobs for the {len(ids)} tokens (vLLM's "
                             "field, which names token ids): use kdforge serve or vLLM, or a teacher folder")
        return [None if row is None else {int(k): float(v["logprob"]) for k, v in row.items()} for row in rows]

    def close(self) -> None:
        self._http.close()
