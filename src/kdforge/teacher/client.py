"""One attempt at a chat completion through the official `openai` async client, classified.

The client's own retries are off (`max_retries=0`): retrying is ours (generate.py), because
every attempt must pass the rate limiter and the budget. `TeacherClient.complete` returns an
`Answer` or raises exactly one of:

- `TeacherRefusedError` (kdforge.errors, exit 4): 401, 403, 404 (unknown model or wrong URL),
  429 `insufficient_quota`. Retrying cannot help; the message says what to check.
- `RateLimited`: 429; carries the server's `retry-after-ms`/`retry-after`.
- `Transient`: 5xx, 408/409, timeouts, dropped connections, unreadable answers. `billed` says
  whether the provider may have charged for it (the request reached it and the outcome is
  unknown): the ledger then counts the worst case. Every 5xx is such an unknown outcome: a
  gateway's 502/504 often comes after the upstream generated (and billed) the completion. Only
  an answer that reports its usage proves otherwise.
- `Rejected`: any other 4xx (bad request, context too long): this sample fails, the run goes on.

Every failure carries the answer's headers when there was an answer, for tier detection.

Nothing here trusts the teacher's numbers: `usage` is passed on as the server sent it (it may be
missing, negative, a string) for the ledger to check (`budget.usage_problem`). Every error text
has the API key masked in full before it is cut to `REASON_CHARS` (`mask_secret`).
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from kdforge.errors import TeacherRefusedError

REASON_CHARS = 300  # error text kept per failure (failures.jsonl, messages)
MIN_FRAGMENT = 4  # a trailing piece of the key this long or longer is masked too


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    prompt_tokens: Any  # from `usage`, as sent (None if absent); the ledger decides what is charged
    completion_tokens: Any
    logprobs: list[dict] | None  # [{token, logprob, bytes?, top: [{token, logprob, bytes?}]}]
    model: str | None
    headers: Mapping[str, str] = field(default_factory=dict)
    reasoning: str | None = None  # a thinking model's `reasoning_content` (or `reasoning`), whole
    reasoning_tokens: Any = None  # usage.completion_tokens_details.reasoning_tokens, as sent (unchecked)

    def to_cache(self) -> dict:
        return {"text": self.text, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "logprobs": self.logprobs, "model": self.model,
                "reasoning": self.reasoning, "reasoning_tokens": self.reasoning_tokens}

    @classmethod
    def from_cache(cls, obj: dict) -> "Answer":
        return cls(obj["text"], obj.get("finish_reason"), obj.get("prompt_tokens"), obj.get("completion_tokens"),
                   obj.get("logprobs"), obj.get("model"), reasoning=obj.get("reasoning"),
                   reasoning_tokens=obj.get("reasoning_tokens"))

    def thinking_tokens(self) -> int | None:
        """The reasoning tokens the teacher reported, when it reported a whole number within its
        completion tokens; else None (not reported, or not to be trusted)."""
        r, c = self.reasoning_tokens, self.completion_tokens
        if type(r) is not int or r < 0 or (type(c) is int and r > c):
            return None
        return r


class AttemptFailed(Exception):
    """Base of the retry-relevant failures. `kind` is what the summary counts them by."""

    kind = "error"

    def __init__(self, reason: str, headers: Mapping[str, str] | None = None, retry_after: float | None = None,
                 usage: tuple[int, int] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.headers = headers or {}
        self.retry_after = retry_after  # seconds the server asked us to wait
        self.usage = usage  # (prompt, completion) tokens as the error answer reported them, unchecked


class RateLimited(AttemptFailed):
    kind = "429"


class Transient(AttemptFailed):
    def __init__(self, reason: str, kind: str, billed: bool, **kw):
        super().__init__(reason, **kw)
        self.kind = kind
        self.billed = billed


class Rejected(AttemptFailed):
    def __init__(self, reason: str, status: int, **kw):
        super().__init__(reason, **kw)
        self.status = status
        self.kind = str(status)


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """`retry-after-ms` (milliseconds) first, then `retry-after` (seconds or an HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        when = email.utils.parsedate_tz(ra)
        return max(0.0, email.utils.mktime_tz(when) - time.time()) if when else None


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Progressive backoff with jitter: half of base*2^(attempt-1) (capped), plus up to that again."""
    d = min(cap, base * 2 ** max(0, attempt - 1))
    return d / 2 + rng.uniform(0, d / 2)


RATE_LIMIT_RETRIES_PER_RETRY = 4  # a request may see 4x max_retries 429s: being throttled is not failing


class RetryCount:
    """One request's failed attempts under generate's retry rules, shared by generate's samples and
    the priced scorer (teacher/scoring.py): `after(e)` -> (seconds to wait, out of retries?).

    A 429 (`RateLimited`) waits its Retry-After, else a backoff, and is retried up to
    `RATE_LIMIT_RETRIES_PER_RETRY * max(1, max_retries)` times; any other failure (5xx, timeouts,
    dropped connections) waits the longer of its Retry-After and a backoff, up to `max_retries`
    times. The backoff (`backoff_delay`) counts each kind's own attempts and draws its jitter from
    `rng` (the caller's seeded one, shared across its requests). What a wait means (every worker
    pauses for a 429, this request sleeps otherwise) and what giving up does are the caller's."""

    def __init__(self, max_retries: int, base: float, cap: float, rng: random.Random):
        self.max_retries, self.base, self.cap, self.rng = max_retries, base, cap, rng
        self.rate_limited = 0  # 429s seen
        self.transient = 0  # other retryable failures seen

    @property
    def failures(self) -> int:
        return self.rate_limited + self.transient

    def after(self, e: AttemptFailed) -> tuple[float, bool]:
        """Count the failed attempt `e`; -> (seconds to wait before the next one, True when that
        was one too many of its kind). The wait is drawn even then, as the rules always did."""
        if isinstance(e, RateLimited):
            self.rate_limited += 1
            n, limit = self.rate_limited, RATE_LIMIT_RETRIES_PER_RETRY * max(1, self.max_retries)
            wait = e.retry_after if e.retry_after is not None else backoff_delay(n, self.base, self.cap, self.rng)
        else:
            self.transient += 1
            n, limit = self.transient, self.max_retries
            wait = max(e.retry_after or 0.0, backoff_delay(n, self.base, self.cap, self.rng))
        return wait, n > limit


def mask_secret(text: str, secret: str | None, limit: int = REASON_CHARS) -> str:
    """`text` with every copy of `secret` replaced by ***, then cut to `limit` characters.

    Masking comes first, so a cut can never leave part of a key that was there whole; a piece of
    the key left at the end (a server that cut its own message mid-key) is masked as well.
    """
    if secret:
        text = text.replace(secret, "***")
    cut = text[:limit]
    if secret:
        for n in range(min(len(secret) - 1, len(cut)), MIN_FRAGMENT - 1, -1):
            if cut.endswith(secret[:n]):
                return cut[:-n] + "***"
    return cut


# A sampling parameter a provider fixes for a model (Kimi's thinking models allow only temperature 1
# and top_p 0.95; OpenAI's o-series refuse temperature/top_p/logprobs): the flag that sends it.
_PARAM_FLAGS = {"temperature": "--temperature (generate.temperature)", "top_p": "generate.top_p",
                "top_logprobs": "--top-logprobs", "logprobs": "--top-logprobs"}
_PARAM_RE = re.compile(r"\b(temperature|top_p|top_logprobs|logprobs)\b", re.IGNORECASE)
_REFUSED_RE = re.compile(r"invalid|only|not supported|unsupported|not allowed|must be|does not support", re.IGNORECASE)
_ALLOWED_RE = re.compile(r"only\s+(-?\d+(?:\.\d+)?)\s+(?:is|are)\s+allowed|must be\s+(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def fixed_parameter_hint(msg: str) -> str:
    """For a 400 that refuses a sampling parameter: which flag to drop or change ("" otherwise)."""
    m = _PARAM_RE.search(msg)
    if not m or not _REFUSED_RE.search(msg):
        return ""
    name = m.group(1).lower()
    flag = _PARAM_FLAGS[name]
    allowed = _ALLOWED_RE.search(msg)
    value = next((g for g in allowed.groups() if g is not None), None) if allowed else None
    if value is not None:
        where = f"{flag.split(' (')[0]} {value}" if flag.startswith("--") else f"{flag}: {value} in the config"
        return f"; the teacher fixes {name} for this model: set {where} (the value it allows)"
    if name in ("top_logprobs", "logprobs"):
        return "; this model returns no logprobs: drop --top-logprobs"
    return f"; the teacher fixes {name} for this model: drop {flag} (or set the value its documentation names)"


def _error_detail(body: Any) -> tuple[str, str | None]:
    """The error message (whole: the caller masks, then cuts) and its code."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err), err.get("code") or err.get("type")
        return str(err), None
    return (str(body) if body else ""), None


def _usage(body: Any) -> tuple[Any, Any] | None:
    """(prompt_tokens, completion_tokens) as an error answer reported them, unchecked."""
    u = body.get("usage") if isinstance(body, dict) else None
    if isinstance(u, dict) and ("prompt_tokens" in u or "completion_tokens" in u):
        return u.get("prompt_tokens"), u.get("completion_tokens")
    return None


def _json_or_none(response) -> Any:
    try:
        return response.json() if response is not None else None
    except Exception:  # noqa: BLE001 - not JSON: no usage to read
        return None


def _connect_failed(e: BaseException) -> bool:
    """True if the connection was never made (so the request never reached the provider)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in ("ConnectError", "ConnectTimeout", "ConnectionRefusedError"):
            return True
        e = e.__cause__ or e.__context__
    return False


class TeacherClient:
    """`complete(body)` makes one attempt; see the module docstring for what it raises."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, api_key_env: str = "OPENAI_API_KEY"):
        from openai import AsyncOpenAI  # ~0.9 s of imports: only when a request is to be made

        self.base_url = base_url
        self.api_key_env = api_key_env
        self._has_key = bool(api_key)
        self._secret = api_key or None  # masked in every error text, however short
        # Local servers (vLLM, llama.cpp, transformers serve) accept any key; openai needs a string.
        self._client = AsyncOpenAI(base_url=base_url, api_key=api_key or "no-key", max_retries=0, timeout=timeout)

    async def complete(self, body: dict) -> Answer:
        import openai

        try:
            raw = await self._client.chat.completions.with_raw_response.create(**body)
        except openai.APIStatusError as e:
            raise self._classify_status(e, body) from None
        except openai.APITimeoutError:
            raise Transient("timed out", "timeout", billed=True) from None
        except openai.APIConnectionError as e:
            never = _connect_failed(e)
            raise Transient(self.mask(f"connection {'refused' if never else 'dropped'} ({e.__cause__ or e})"),
                            "connect" if never else "dropped", billed=not never) from None
        return self.answer(raw.parse, dict(raw.headers))

    def answer(self, parse, headers: Mapping[str, str] | None = None) -> Answer:
        """The Answer in a chat completion (`parse()` returns it, as the openai types have it):
        an online answer or a Batch API result row alike. Unreadable: Transient("bad-answer")."""
        headers = headers or {}
        try:
            resp = parse()
            choice = resp.choices[0]
            text = choice.message.content or ""
            if not isinstance(text, str):
                raise TypeError(f"message content is {type(text).__name__}, not text")
        except Exception as e:  # noqa: BLE001 - any unreadable 200 is a transient fault
            raise Transient(self.mask(f"unreadable answer ({type(e).__name__}: {e})"), "bad-answer", billed=True,
                            headers=headers) from None
        usage = getattr(resp, "usage", None)
        return Answer(
            text=text,
            finish_reason=choice.finish_reason,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            logprobs=_logprobs(choice),
            model=resp.model,
            headers=headers,
            reasoning=_reasoning(choice.message),
            reasoning_tokens=_field(getattr(usage, "completion_tokens_details", None), "reasoning_tokens"),
        )

    async def call(self, what: str, fn, *args, **kw):
        """One Batch API call (`fn` a method of `self.openai`, e.g. `files.create`), its failures
        classified as `complete`'s are; `what` names it in messages. A 404 here means the server
        has no Batch API (or forgot the object): Rejected(404), for the caller to decide."""
        import openai

        try:
            return await fn(*args, **kw)
        except openai.NotFoundError as e:
            raise Rejected(self.mask(f"404 on {what}: {_error_detail(e.body)[0]}"), 404) from None
        except openai.APIStatusError as e:
            raise self._classify_status(e, {}) from None
        except openai.APITimeoutError:
            raise Transient(f"{what} timed out", "timeout", billed=False) from None
        except openai.APIConnectionError as e:
            raise Transient(self.mask(f"{what}: connection failed ({e.__cause__ or e})"), "connect",
                            billed=False) from None

    @property
    def openai(self):
        """The underlying `openai.AsyncOpenAI` client (retries off)."""
        return self._client

    def mask(self, text: str) -> str:
        """Error text fit to keep: the key masked (some servers echo it back), then cut."""
        return mask_secret(text, self._secret)

    def leaks_key(self, ans: Answer) -> bool:
        """True if the answer quotes the API key (a prompt-injected or careless teacher)."""
        return bool(self._secret) and self._secret in json.dumps(ans.to_cache(), ensure_ascii=False)

    def _classify_status(self, e, body: dict) -> Exception:
        status = e.status_code
        headers = dict(e.response.headers) if e.response is not None else {}
        msg, code = _error_detail(e.body)
        msg = self.mask(msg)
        where = f"{self.base_url}"
        if status == 401:
            hint = (f"the environment variable {self.api_key_env} is not set" if not self._has_key
                    else f"check that {self.api_key_env} holds a valid key for this endpoint")
            return TeacherRefusedError(f"the teacher at {where} refused the API key (401: {msg}); {hint}")
        if status == 403:
            return TeacherRefusedError(f"the teacher at {where} denied access (403: {msg}); check that the key in "
                                       f"{self.api_key_env} may use model {body.get('model')!r}")
        if status == 404:
            return TeacherRefusedError(
                f"the teacher at {where} does not know model {body.get('model')!r} or the URL is wrong (404: {msg}); "
                f"check --model (the server lists its models at {where.rstrip('/')}/models) and that --teacher "
                "ends with the API prefix, usually /v1")
        if status == 429 and code == "insufficient_quota":
            return TeacherRefusedError(f"the teacher at {where} says the account is out of quota (429: {msg}); "
                                       "check the account's billing, then re-run to resume")
        retry = retry_after_seconds(headers)
        usage = _usage(_json_or_none(e.response))  # e.body holds only the "error" object
        if status == 429:
            return RateLimited(f"429 {msg}", headers=headers, retry_after=retry, usage=usage)
        if status >= 500 or status in (408, 409, 425):  # a 5xx may come after the upstream billed
            return Transient(f"{status} {msg}", str(status) if status < 500 else "5xx", billed=status >= 500,
                             headers=headers, retry_after=retry, usage=usage)
        hint = fixed_parameter_hint(msg) if status == 400 else ""
        return Rejected(f"{status} {msg}{hint}", status, headers=headers, usage=usage)

    async def aclose(self) -> None:
        await self._client.close()


REASONING_FIELDS = ("reasoning_content", "reasoning")  # DeepSeek/Kimi/vLLM; OpenRouter and some gateways


def _field(obj, name: str):
    """`obj.name`, whether `obj` is a parsed model (extra fields kept) or a plain dict."""
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _reasoning(message) -> str | None:
    """A thinking model's reasoning text, whole; None if there is none (or it is not text)."""
    for name in REASONING_FIELDS:
        text = _field(message, name)
        if isinstance(text, str) and text:
            return text
    return None


def _logprobs(choice) -> list[dict] | None:
    lp = getattr(choice, "logprobs", None)
    content = getattr(lp, "content", None) if lp is not None else None
    if not content:
        return None
    return [dict(_token(t), top=[_token(a) for a in (getattr(t, "top_logprobs", None) or [])]) for t in content]


def _token(t) -> dict:
    """{token, logprob}, plus OpenAI's `bytes` when sent: the token's exact UTF-8 bytes, which its
    text cannot carry for a token that ends inside a character (it decodes to U+FFFD)."""
    out = {"token": t.token, "logprob": t.logprob}
    raw = getattr(t, "bytes", None)
    if raw is not None:
        out["bytes"] = list(raw)
    return out
