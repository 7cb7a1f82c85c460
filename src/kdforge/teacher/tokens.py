"""Token counts without the teacher's tokenizer: an upper bound for money, an estimate for pace.

- `prompt_bound`: one token per UTF-8 byte of every message, plus a per-message and a fixed
  template overhead. Byte-level BPE and byte-fallback tokenizers never spend more than one
  token per byte on text, so only the chat template's special tokens can add more; those are
  covered by the overhead, which `learn` raises if a teacher ever reports more (a provider's
  hidden system prompt, say). This is what the budget reserves: about 4x the real count for
  English, which costs little because max_tokens usually dominates the worst case.
- `prompt_estimate`: ~3 bytes a token (a slight overestimate for English), used to pace
  tokens-per-minute, where reserving 4x would waste the teacher's allowance.
- `count_prompt_tokens`: the exact count, where the teacher has vLLM's free `POST /tokenize`
  (vLLM, kdforge serve): what a plan checks against the teacher's context, since the estimate is
  no bound (a tokenizer of few merges spends ~1 token a byte: 3x the estimate).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class TokenEstimator:
    PER_MESSAGE = 8  # template tokens around each message (ChatML uses 4-5)
    FIXED = 16  # generation prompt, BOS and similar

    def __init__(self) -> None:
        self.extra = 0  # learned: tokens the teacher counted beyond our bound

    @staticmethod
    def _bytes(messages: list[dict]) -> int:
        return sum(len(str(m.get("content", "")).encode()) for m in messages)

    def prompt_bound(self, messages: list[dict]) -> int:
        """Upper bound on the prompt tokens a teacher bills for these messages."""
        return self._bytes(messages) + self.PER_MESSAGE * len(messages) + self.FIXED + self.extra

    def prompt_estimate(self, messages: list[dict]) -> int:
        """Likely prompt tokens (for rate limits, not for money)."""
        return self._bytes(messages) // 3 + 4 * len(messages) + 3

    def learn(self, messages: list[dict], reported_prompt_tokens: int) -> bool:
        """Raise the bound if the teacher counted more than it; True if it did."""
        over = reported_prompt_tokens - self.prompt_bound(messages)
        if over > 0:
            self.extra += over
            return True
        return False


# ----------------------------------------------------------------------------- exact counts from the teacher

COUNT_BUDGET_S = 5.0  # seconds a plan may spend counting its prompts at the teacher's /tokenize
FIND_TIMEOUT_S = 5.0  # the first /tokenize request, which finds the route
COUNT_WORKERS = 4  # /tokenize requests in flight (free, but the teacher serves others too)
ABSENT = (404, 405)  # no such route: an API teacher (OpenAI), or a server without vLLM's /tokenize


@dataclass
class PromptCounts:
    """Prompt tokens as the teacher counts them: `exact[i]` for the i-th messages list that its
    `POST /tokenize` (at `url`) counted: a chat body, rendered by the teacher's own template with the
    generation prompt, as its chat route renders it. The rest keep the estimate (`why`: no route)."""

    exact: dict[int, int] = field(default_factory=dict)
    url: str | None = None  # None: not counted, see `why`
    why: str = "the teacher was not asked"
    budget_s: float = COUNT_BUDGET_S
    max_model_len: int | None = None  # the context /tokenize reports beside the count (vLLM, kdforge serve)

    def length(self, i: int, messages: list[dict], est: TokenEstimator) -> tuple[int, bool]:
        """(tokens of the i-th prompt, whether exact)."""
        n = self.exact.get(i)
        return (n, True) if n is not None else (est.prompt_estimate(messages), False)

    def how(self, n: int) -> str:
        """How the first `n` prompts' lengths were had, in words."""
        if self.url is None:
            return f"estimated at ~3 bytes a token ({self.why})"
        k = sum(1 for i in self.exact if i < n)
        said = f"counted exactly by the teacher's POST {self.url}"
        return said if k >= n else f"{said} for {k} of {n} prompts (a {self.budget_s:g}s budget), the rest estimated"


def tokenize_urls(teacher: str) -> list[str]:
    """Where vLLM's /tokenize may be: at the server's root (vLLM, kdforge serve), else beside /v1."""
    base = teacher.rstrip("/")
    root = base[:-3] if base.endswith("/v1") else base
    return list(dict.fromkeys([f"{root}/tokenize", f"{base}/tokenize"]))


def _count(answer) -> int | None:
    if not isinstance(answer, dict):
        return None
    n = answer.get("count")
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    tokens = answer.get("tokens")
    return len(tokens) if isinstance(tokens, list) and tokens else None


def model_refusal(answer) -> str | None:
    """The server's message when a 404 answer is about the MODEL (vLLM: "The model `x` does not
    exist."; kdforge serve: code `model_not_found`, param `model`), not about a missing route
    (FastAPI's {"detail": "Not Found"}); else None."""
    from kdforge.teacher.client import _error_detail

    if not isinstance(answer, dict):
        return None
    msg, code = _error_detail(answer)
    err = answer.get("error") if isinstance(answer.get("error"), dict) else answer
    low = msg.lower()
    about_model = code == "model_not_found" or err.get("param") == "model" or (
        "model" in low and ("does not exist" in low or "not found" in low))
    return msg[:300] if about_model else None


def served_models(client, teacher: str, timeout: float) -> list[str]:
    """The model ids GET {teacher}/models lists ([] when it does not answer with a list)."""
    import httpx

    try:
        r = client.get(f"{teacher.rstrip('/')}/models", timeout=timeout)
        data = r.json().get("data") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
    return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")] if isinstance(data, list) else []


class _Tokenizer:
    """One teacher's /tokenize over one HTTP client."""

    def __init__(self, client, model: str | None):
        self.client, self.model, self.url, self.max_model_len, self.error = client, model, None, None, None
        self.refusal: str | None = None  # the last 404's message when it was about the model

    def ask(self, url: str, messages: list[dict], timeout: float):
        """(status, count or None); status 0: no answer (unreachable, timed out)."""
        import httpx

        body = {"messages": messages, "add_generation_prompt": True, **({"model": self.model} if self.model else {})}
        try:
            r = self.client.post(url, json=body, timeout=timeout)
        except httpx.HTTPError as e:
            self.error = type(e).__name__
            return 0, None
        try:
            answer = r.json() if r.status_code in (200, 404) else None
        except ValueError:  # not JSON: no count in it
            answer = None
        self.refusal = model_refusal(answer) if r.status_code == 404 else None
        if r.status_code != 200:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("max_model_len"), int):
            self.max_model_len = answer["max_model_len"]
        return r.status_code, _count(answer)

    def find(self, teacher: str, messages: list[dict], timeout: float) -> tuple[int | None, str | None]:
        """Count the first prompt, finding the route: (count, None), or (None, why there is none)."""
        why = None
        for url in tokenize_urls(teacher):
            status, n = self.ask(url, messages, timeout)
            if n is not None:
                self.url = url
                return n, None
            if status == 404 and self.refusal:  # the route is there; the model name is not
                return None, self.wrong_model(teacher, url, timeout)
            if status in ABSENT:
                why = why or f"the teacher has no /tokenize (POST {url}: {status})"
                continue
            if status == 200:
                return None, f"POST {url} answered 200 without a token count (`count` or `tokens`)"
            return None, (f"POST {url} answered {status} to a chat body" if status else
                          f"POST {url} got no answer: {self.error}")
        return None, why

    def wrong_model(self, teacher: str, url: str, timeout: float) -> str:
        """Why nothing was counted when /tokenize refused the model: its name, the server's words,
        what it serves (GET /models, where its message does not say), and the fix."""
        served = [m for m in served_models(self.client, teacher, timeout) if f"`{m}`" not in self.refusal]
        names = f"; it serves {', '.join(f'`{m}`' for m in served[:5])}" if served else ""
        return (f"the teacher does not serve the model `{self.model}` (POST {url}: 404: {self.refusal}{names}): "
                "set generate.model (--model) to a model it serves; its generation requests would be refused "
                "the same way")


def count_prompt_tokens(teacher: str, model: str | None, prompts: list[list[dict]], api_key: str | None = None,
                        budget_s: float = COUNT_BUDGET_S) -> PromptCounts:
    """Count `prompts` (messages lists, as sent) at the teacher's free `POST /tokenize`, in order,
    for at most `budget_s` seconds; prompts left uncounted (time ran out, or a server without the
    route: 404/405, an API teacher) keep the estimate, and `how` says so."""
    import httpx

    out = PromptCounts(budget_s=budget_s)
    if not prompts:
        return out
    deadline = time.monotonic() + budget_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(headers=headers) as client:
        tok = _Tokenizer(client, model)
        first, why = tok.find(teacher, prompts[0], timeout=FIND_TIMEOUT_S)  # whatever the budget: one try
        if first is None:
            out.why = why or "no answer"
            return out
        out.exact[0], out.url = first, tok.url

        def one(i: int) -> None:
            left = deadline - time.monotonic()
            if left > 0.05:
                n = tok.ask(tok.url, prompts[i], timeout=left)[1]
                if n is not None:
                    out.exact[i] = n

        with ThreadPoolExecutor(COUNT_WORKERS) as pool:
            list(pool.map(one, range(1, len(prompts))))
    out.max_model_len = tok.max_model_len
    return out
