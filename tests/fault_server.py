"""A fault-injecting OpenAI-compatible teacher for tests and benchmarks.

A real HTTP/1.1 server (stdlib `ThreadingHTTPServer`) on 127.0.0.1, one thread per connection.
It answers `POST /v1/chat/completions` (and `GET /v1/models`) the way OpenAI does, and on
purpose gets things wrong: it can require a key, refuse unknown models, enforce requests- and
tokens-per-minute limits (token buckets, as OpenAI quantises them), inject 429s with
`retry-after-ms`/`retry-after`, 500s, slow responses and dropped connections, and answer 400
for prompts holding a marker. It counts everything it received (`hits`), and what it billed:
a completion counts as billed once generated, even if the connection is then dropped.

It can also lie, request by request, from a `script` of `Act`s (the i-th request plays
`script[i % len(script)]`): usage that is missing, negative, huge, a string or a bool; 5xx
answers after the upstream generated (and billed) the completion, as gateways do with 502/504;
bodies echoing the API key at any offset; garbage JSON, truncated bodies and slow drips. What it
billed is always the honest count, whatever it reports.

    with FaultServer(FaultConfig(api_key="sk-test", p429=0.3)) as srv:
        ... kdforge generate --teacher srv.url ...
        assert srv.count(status=200) == 20

Responses are deterministic per prompt (a digest of it leads the text), so duplicates show.

The Batch API too (`/v1/files`, `/v1/batches`, OpenAI's shapes): a batch completes
`batch_latency` seconds after creation, its rows answered as online requests would be (same
text) and billed at `batch_discount` of the price. Faults: batches that fail validation, expire
with part of their rows done, put rows in the error file (500s; 400 for the bad marker), vanish
from the list, answer 5xx while polled; and uploads or creations that are done but answered
late (`hold_*`, so a test can kill the client in that window); polls that hang (`hold_poll`); and
result files that never end (`endless_content`). `batch_rows` counts the rows
submitted per custom_id (a row in two created batches was submitted twice).
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import random
import socket
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("the teacher writes a careful answer with steps and checks each result before it moves on "
         "to the next part of the question so the student can learn from every token").split()


THINKING = (" Let me think.", " Étape", " 考える", " 🤔", " so", " überprüfen")  # one token each

USAGE_LIES = ("honest", "missing", "negative", "huge", "string", "bool", "float", "over")


@dataclass(frozen=True)
class Act:
    """How the server answers one request (see `FaultConfig.script`)."""

    status: int = 200  # 200, or an error status (400, 500, 502, 503, 504 ...)
    usage: str = "honest"  # one of USAGE_LIES: what `usage` reports (billing stays honest)
    billed: bool = False  # for a 5xx: the upstream generated the completion and billed it
    echo_key_at: int | None = None  # the key is echoed in the answer (or error message) at this offset
    body: str = "json"  # json | garbage (not JSON) | truncated (closed mid-body)
    drip: float = 0.0  # seconds between the body's 4 chunks (a slow drip)


@dataclass
class FaultConfig:
    api_key: str | None = None  # required bearer key; None accepts any
    models: tuple[str, ...] | None = None  # known model names; None accepts any
    latency: float = 0.0  # seconds, mean time to answer
    jitter: float = 0.0  # seconds, uniform +- around latency
    p429: float = 0.0  # probability of an injected 429
    p500: float = 0.0  # probability of an injected 500
    p_drop: float = 0.0  # probability the connection is closed after generating (billed, no reply)
    p_slow: float = 0.0  # probability of a slow answer
    slow_seconds: float = 5.0
    retry_after_ms: int | None = 50  # `retry-after-ms` on injected 429s (None: header absent)
    retry_after_s: float | None = None  # `retry-after` (seconds) on injected 429s
    rpm: float | None = None  # enforce requests/min (and advertise it in x-ratelimit-* headers)
    tpm: float | None = None  # enforce tokens/min (prompt + max_tokens, as OpenAI counts)
    burst_seconds: float = 1.0  # bucket capacity, in seconds of the rate
    usage: bool = True  # include `usage` in answers
    completion_tokens: int | None = None  # fixed completion length (capped by max_tokens); None: varies
    bad_marker: str = "<<400>>"  # prompts containing this get a 400
    p500_billed: float = 0.0  # probability an injected 5xx was generated and billed upstream first
    status_5xx: int = 500  # the status of injected 5xx answers (502/504: a gateway in front)
    answer: str | None = None  # fixed answer text, sent as 3-byte tokens (splits non-ASCII characters)
    script: tuple[Act, ...] | None = None  # per-request behaviour, cycled; None: the random faults above
    # A reasoning ("thinking") model, as Kimi's and OpenAI's o-series are: it thinks for
    # `reasoning_tokens` before it answers, the thinking counts inside max_tokens and is billed, and
    # it is sent in `reasoning_field` (usage.completion_tokens_details.reasoning_tokens counts it).
    # With max_tokens <= reasoning_tokens the answer is empty (finish_reason "length").
    reasoning_tokens: int = 0
    reasoning_field: str = "reasoning_content"  # or "reasoning", as some gateways name it
    fixed_temperature: float | None = None  # other temperatures get Kimi's 400 (thinking models fix it)
    seed: int = 0
    # Batch API
    batch_latency: float = 0.2  # seconds from creation until a batch ends
    batch_fail_validation: int = 0  # the first N batches fail validation (no row runs)
    batch_expire: int = 0  # the first N batches (after those) expire with half their rows done
    batch_row_errors: int = 0  # every k-th row of a batch lands in the error file with a 500 (0: none)
    batch_vanish: bool = False  # batches never show in GET /v1/batches (retrievable by id all the same)
    batch_poll_5xx: float = 0.0  # probability a GET /v1/batches/{id} answers 503
    hold_upload: float = 0.0  # seconds a POST /v1/files waits, file stored, before it answers
    hold_create: float = 0.0  # seconds a POST /v1/batches waits, batch created, before it answers
    hold_content: float = 0.0  # seconds a GET /v1/files/{id}/content waits before it answers
    hold_poll: float = 0.0  # seconds a GET /v1/batches/{id} hangs before it answers (a hanging server)
    endless_content: int = 0  # the first N result-file downloads never end: half the file, then 'x' forever
    endless_rate: float = 20e6  # bytes/s of a never-ending download
    batch_usage: str = "honest"  # one of USAGE_LIES: what batch result rows report (billing stays honest)
    batch_garbage: bool = False  # result files also hold lines that are not JSON, and rows of unknown ids


@dataclass
class Hit:
    t: float  # time.time() at arrival
    status: int
    prompt: str = ""  # last user message
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed: bool = False
    kind: str = ""  # "ok", "auth", "model", "limit", "inj429", "inj500", "drop", "bad", "scripted", "batch"
    body: dict = field(default_factory=dict)
    act: Act | None = None  # the scripted behaviour it got, if any


class _Bucket:
    """Continuous-refill token bucket: `rate` per second, `capacity` tokens, full at start."""

    def __init__(self, per_minute: float, burst_seconds: float, min_capacity: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(min_capacity, self.rate * burst_seconds)
        self.level = self.capacity
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def take(self, n: float) -> float:
        """Take n tokens; returns 0 on success, else seconds until n would be there."""
        self._refill()
        if self.level >= n:
            self.level -= n
            return 0.0
        return (n - self.level) / self.rate

    def reset_seconds(self) -> float:
        self._refill()
        return (self.capacity - self.level) / self.rate


def _duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1s', '6m0s'."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    m, s = divmod(seconds, 60)
    return f"{int(m)}m{s:.0f}s" if m else f"{s:.3g}s"


def count_prompt_tokens(messages: list[dict]) -> int:
    """The server's tokenizer: ~4 bytes a token plus 4 per message (below any client upper bound)."""
    return sum(-(-len(str(m.get("content", "")).encode()) // 4) + 4 for m in messages) + 3


class FaultServer:
    def __init__(self, cfg: FaultConfig | None = None, port: int = 0):
        self.cfg = cfg or FaultConfig()
        self.hits: list[Hit] = []
        self.lock = threading.Lock()
        self.rng = random.Random(self.cfg.seed)
        self.in_flight = 0
        self.max_in_flight = 0
        self._req_bucket = _Bucket(self.cfg.rpm, self.cfg.burst_seconds) if self.cfg.rpm else None
        self._tok_bucket = _Bucket(self.cfg.tpm, self.cfg.burst_seconds, 4096) if self.cfg.tpm else None
        self.files: dict[str, dict] = {}  # Batch API: id -> {meta, data}
        self.batches: dict[str, dict] = {}  # id -> batch object (+ private "_t0", "_n")
        self.batch_rows: Counter = Counter()  # custom_id -> times submitted in a created batch
        self.batch_api = _BatchAPI(self)
        self.content_gets = 0  # GET /v1/files/{id}/content requests
        self.polls = 0  # GET /v1/batches/{id} requests
        self.endless_sent = 0  # bytes sent by never-ending downloads
        self._stopped = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FaultServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fault-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()  # ends never-ending downloads
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FaultServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ what it saw
    def count(self, status: int | None = None, kind: str | None = None) -> int:
        with self.lock:
            return sum(1 for h in self.hits if (status is None or h.status == status)
                       and (kind is None or h.kind == kind))

    @property
    def received(self) -> int:
        """Chat completion requests received, whatever became of them."""
        with self.lock:
            return len(self.hits)

    def kinds(self) -> Counter:
        with self.lock:
            return Counter(h.kind for h in self.hits)

    def ok_prompts(self) -> list[str]:
        with self.lock:
            return [h.prompt for h in self.hits if h.kind in ("ok", "slow")]

    def billed_usd(self, price_input: float, price_output: float, batch_discount: float = 0.5) -> float:
        """What a provider charging these prices (USD per million tokens) would bill; batch rows at
        `batch_discount` of them."""
        with self.lock:
            return sum((h.prompt_tokens * price_input + h.completion_tokens * price_output)
                       * (batch_discount if h.kind == "batch" else 1) for h in self.hits if h.billed) / 1e6

    def reset_counts(self) -> None:
        with self.lock:
            self.hits.clear()

    # ------------------------------------------------------------------ behaviour
    def _limit_headers(self) -> dict[str, str]:
        h = {}
        for name, b, per_min in (("requests", self._req_bucket, self.cfg.rpm), ("tokens", self._tok_bucket, self.cfg.tpm)):
            if b is not None:
                h[f"x-ratelimit-limit-{name}"] = str(int(per_min))
                h[f"x-ratelimit-remaining-{name}"] = str(int(b.level))
                h[f"x-ratelimit-reset-{name}"] = _duration(b.reset_seconds())
        return h

    def decide(self, body: dict, auth: str | None) -> tuple[int, dict, dict, Hit]:
        """Status, JSON body and headers for one request (before any latency), and its Hit."""
        msgs = body.get("messages") or []
        prompt = next((str(m.get("content", "")) for m in reversed(msgs) if m.get("role") == "user"), "")
        hit = Hit(time.time(), 0, prompt)
        c = self.cfg
        with self.lock:
            self.hits.append(hit)
            if c.api_key is not None and auth != f"Bearer {c.api_key}":  # echoes the key, as careless servers do
                return self._err(hit, 401, "auth", f"Incorrect API key provided: {(auth or '')[7:]}.", "invalid_api_key")
            if c.models is not None and body.get("model") not in c.models:
                return self._err(hit, 404, "model", f"The model `{body.get('model')}` does not exist.",
                                 "model_not_found")
            ptoks = count_prompt_tokens(msgs)
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            wait = 0.0
            if self._req_bucket is not None:
                wait = self._req_bucket.take(1)
            if not wait and self._tok_bucket is not None:
                wait = self._tok_bucket.take(ptoks + max_tokens)
                if wait and self._req_bucket is not None:
                    self._req_bucket.level += 1  # give the request token back
            headers = self._limit_headers()
            if wait:
                headers["retry-after-ms"] = str(int(wait * 1000) + 1)
                headers["retry-after"] = str(max(1, round(wait)))
                return self._err(hit, 429, "limit", "Rate limit reached for requests.", "rate_limit_exceeded",
                                 headers)
            if c.script:
                return self._scripted(hit, body, prompt, ptoks, max_tokens, headers)
            r = self.rng.random()
            if r < c.p429:
                if c.retry_after_ms is not None:
                    headers["retry-after-ms"] = str(c.retry_after_ms)
                if c.retry_after_s is not None:
                    headers["retry-after"] = str(c.retry_after_s)
                return self._err(hit, 429, "inj429", "Rate limit reached (injected).", "rate_limit_exceeded", headers)
            if r < c.p429 + c.p500:
                if self.rng.random() < c.p500_billed:  # generated upstream, then the gateway failed
                    self._bill(hit, prompt, ptoks, max_tokens, body)
                return self._err(hit, c.status_5xx, "inj500", "The server had an error (injected).", None, headers)
            if c.bad_marker and c.bad_marker in prompt:
                return self._err(hit, 400, "bad", "This model's maximum context length was exceeded (injected).",
                                 "context_length_exceeded", headers)
            if c.fixed_temperature is not None and body.get("temperature", c.fixed_temperature) != c.fixed_temperature:
                return self._err(hit, 400, "bad", f"invalid temperature: only {c.fixed_temperature:g} is allowed for "
                                 "this model", "invalid_request_error", headers)
            ctoks = self._completion_len(prompt, max_tokens)
            hit.status, hit.kind, hit.billed = 200, "ok", True
            hit.prompt_tokens, hit.completion_tokens, hit.body = ptoks, ctoks, body
            if self.rng.random() < c.p_drop:
                hit.kind = "drop"
            elif self.rng.random() < c.p_slow:
                hit.kind = "slow"
        return 200, self._completion(body, prompt, ptoks, ctoks, max_tokens), headers, hit

    def _bill(self, hit: Hit, prompt: str, ptoks: int, max_tokens: int, body: dict) -> int:
        """Generate (and bill) a completion for this hit; returns its length in tokens."""
        ctoks = self._completion_len(prompt, max_tokens)
        hit.billed, hit.prompt_tokens, hit.completion_tokens, hit.body = True, ptoks, ctoks, body
        return ctoks

    def _scripted(self, hit: Hit, body: dict, prompt: str, ptoks: int, max_tokens: int, headers: dict):
        act = self.cfg.script[(len(self.hits) - 1) % len(self.cfg.script)]
        hit.act, key = act, self.cfg.api_key or ""
        if act.status != 200:
            if act.billed:
                self._bill(hit, prompt, ptoks, max_tokens, body)
            msg = "The request could not be served (scripted). " * 10
            if act.echo_key_at is not None:
                at = min(act.echo_key_at, len(msg))
                msg = msg[:at] + key + msg[at:]
            out = self._err(hit, act.status, "scripted", msg, None, headers)
            if act.billed:  # what a provider that billed the failed answer may report
                out[1]["usage"] = self._usage(act.usage, ptoks, hit.completion_tokens, max_tokens)
            return out
        ctoks = self._bill(hit, prompt, ptoks, max_tokens, body)
        hit.status, hit.kind = 200, "scripted"
        obj = self._completion(body, prompt, ptoks, ctoks, max_tokens)
        if act.echo_key_at is not None:  # the answer itself quotes the key (a prompt-injected teacher)
            text = obj["choices"][0]["message"]["content"]
            at = min(act.echo_key_at, len(text))
            obj["choices"][0]["message"]["content"] = text[:at] + key + text[at:]
        usage = self._usage(act.usage, ptoks, ctoks, max_tokens, obj.get("usage"))
        if usage is None:
            obj.pop("usage", None)
        else:
            obj["usage"] = usage
        return 200, obj, headers, hit

    @staticmethod
    def _usage(lie: str, ptoks: int, ctoks: int, max_tokens: int, honest: dict | None = None) -> dict | None:
        """The `usage` object an answer reports, honest or not (billing is always `ptoks`, `ctoks`);
        a thinking model's `completion_tokens_details` are kept from the `honest` usage."""
        p, c = {"honest": (ptoks, ctoks), "negative": (-1_000_000, -ctoks), "huge": (10**15, 10**15),
                "string": ("lots", "many"), "bool": (True, False), "float": (ptoks + 0.5, float(ctoks)),
                "over": (ptoks, max_tokens * 10)}.get(lie, (None, None))
        if lie == "missing":
            return None
        out = {"prompt_tokens": p, "completion_tokens": c,
               "total_tokens": p + c if lie in ("honest", "negative", "huge", "over") else "?"}
        if honest and "completion_tokens_details" in honest:
            out["completion_tokens_details"] = honest["completion_tokens_details"]
        return out

    def _err(self, hit: Hit, status: int, kind: str, msg: str, code: str | None, headers: dict | None = None):
        hit.status, hit.kind = status, kind
        etype = {401: "invalid_request_error", 404: "invalid_request_error", 400: "invalid_request_error",
                 429: "requests"}.get(status, "server_error")
        return status, {"error": {"message": msg, "type": etype, "param": None, "code": code}}, headers or {}, hit

    def _answer_len(self, prompt: str, max_tokens: int) -> int:
        """The answer's own length in tokens (before any cut by max_tokens, for a thinking model)."""
        if self.cfg.completion_tokens is not None:
            return max(1, self.cfg.completion_tokens)
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
        if self.cfg.reasoning_tokens:
            return 4 + seed % 8
        lo = max(1, max_tokens // 2)
        return lo + seed % (max_tokens - lo + 1)

    def _completion_len(self, prompt: str, max_tokens: int) -> int:
        """Completion tokens generated and billed: thinking (if any) plus answer, cut at max_tokens."""
        return max(1, min(self.cfg.reasoning_tokens + self._answer_len(prompt, max_tokens), max_tokens))

    def _completion(self, body: dict, prompt: str, ptoks: int, ctoks: int, max_tokens: int) -> dict:
        digest = hashlib.sha256(f"{prompt}|{body.get('temperature')}".encode()).hexdigest()[:8]
        rng = random.Random(digest)
        think = min(self.cfg.reasoning_tokens, ctoks)  # thinking comes first, inside max_tokens
        answer = ctoks - think
        if self.cfg.answer is not None:  # byte-level tokens: a character may span two of them
            raw = f"[{digest}] {self.cfg.answer}".encode()
            pieces = [raw[i:i + 3] for i in range(0, len(raw), 3)] if answer else []
        else:
            pieces = [t.encode() for t in [f"[{digest}]"] + [" " + rng.choice(WORDS) for _ in range(answer - 1)]] \
                if answer else []
        tokens = [p.decode("utf-8", "replace") for p in pieces]
        msg = {"role": "assistant", "content": b"".join(pieces).decode()}
        cut = self.cfg.reasoning_tokens + self._answer_len(prompt, max_tokens) > max_tokens
        if think:
            msg[self.cfg.reasoning_field] = "".join(THINKING[i % len(THINKING)] for i in range(think))
        choice = {"index": 0, "message": msg, "finish_reason": "length" if ctoks >= max_tokens or cut else "stop",
                  "logprobs": None}
        if body.get("logprobs"):
            k = int(body.get("top_logprobs") or 0)
            content = []
            for tok, piece in zip(tokens, pieces):
                lp = -round(rng.random() * 0.5, 4)
                alts = [{"token": tok, "logprob": lp, "bytes": list(piece)}]
                alts += [{"token": " " + w, "logprob": lp - 1 - i, "bytes": list((" " + w).encode())}
                         for i, w in enumerate(rng.sample(WORDS, max(0, k - 1)))]
                content.append({"token": tok, "logprob": lp, "bytes": list(piece), "top_logprobs": alts[:k]})
            choice["logprobs"] = {"content": content, "refusal": None}
        out = {"id": f"chatcmpl-{digest}", "object": "chat.completion", "created": int(time.time()),
               "model": body.get("model", "fault-teacher"), "choices": [choice]}
        if self.cfg.usage:
            out["usage"] = {"prompt_tokens": ptoks, "completion_tokens": ctoks, "total_tokens": ptoks + ctoks}
            if self.cfg.reasoning_tokens:
                out["usage"]["completion_tokens_details"] = {"reasoning_tokens": think}
        return out

    def delay(self) -> float:
        c = self.cfg
        with self.lock:
            return max(0.0, c.latency + (self.rng.uniform(-c.jitter, c.jitter) if c.jitter else 0.0))


class _BatchAPI:
    """The Batch API half of FaultServer (see the module docstring). Methods return
    (status, JSON body or bytes, headers); the caller holds no lock."""

    def __init__(self, srv: FaultServer):
        self.srv = srv

    def _now_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:16]}"

    def upload(self, content_type: str, raw: bytes):
        msg = email.parser.BytesParser().parsebytes(b"content-type: " + content_type.encode() + b"\r\n\r\n" + raw)
        parts = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()} \
            if msg.is_multipart() else {}
        if "file" not in parts:
            return 400, _error("multipart field 'file' is missing"), {}
        purpose = (parts.get("purpose").get_payload(decode=True) or b"").decode() if "purpose" in parts else ""
        data = parts["file"].get_payload(decode=True) or b""
        fid = self._now_id("file")
        meta = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                "filename": parts["file"].get_filename() or "upload.jsonl", "purpose": purpose, "status": "processed"}
        with self.srv.lock:
            self.srv.files[fid] = {"meta": meta, "data": data}
        if self.srv.cfg.hold_upload:
            time.sleep(self.srv.cfg.hold_upload)
        return 200, meta, {}

    def create(self, body: dict):
        srv, c = self.srv, self.srv.cfg
        with srv.lock:
            f = srv.files.get(body.get("input_file_id"))
            if f is None:
                return 400, _error(f"No file with id {body.get('input_file_id')!r}"), {}
            rows = [json.loads(x) for x in f["data"].decode().splitlines() if x.strip()]
            n = len(srv.batches)
            bid = self._now_id("batch")
            b = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
                 "input_file_id": f["meta"]["id"], "completion_window": body.get("completion_window", "24h"),
                 "status": "validating", "output_file_id": None, "error_file_id": None,
                 "created_at": int(time.time()), "metadata": body.get("metadata"),
                 "request_counts": {"total": len(rows), "completed": 0, "failed": 0},
                 "_t0": time.monotonic(), "_n": n, "_rows": rows}
            srv.batches[bid] = b
            for r in rows:
                srv.batch_rows[r.get("custom_id")] += 1
        if c.hold_create:
            time.sleep(c.hold_create)
        return 200, self.public(b), {}

    @staticmethod
    def public(b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    def _advance(self, b: dict, cancel: bool = False) -> None:
        """Run a batch whose time has come (or that is cancelled), under the server lock."""
        srv, c = self.srv, self.srv.cfg
        if b["status"] in ("completed", "failed", "expired", "cancelled"):
            return
        if not cancel and time.monotonic() - b["_t0"] < c.batch_latency:
            b["status"] = "in_progress" if time.monotonic() - b["_t0"] > c.batch_latency / 2 else "validating"
            return
        rows, n = b["_rows"], b["_n"]
        if cancel:
            b["status"] = "cancelled"
            return
        if n < c.batch_fail_validation:
            b["status"] = "failed"
            b["errors"] = {"object": "list", "data": [{"code": "invalid_request", "line": 1, "param": "body",
                                                       "message": "validation failed (injected)"}]}
            return
        expire = n < c.batch_fail_validation + c.batch_expire
        out, err = [], []
        for i, r in enumerate(rows):
            sid, body = r.get("custom_id"), r.get("body") or {}
            if expire and i >= len(rows) // 2:
                err.append({"id": f"batch_req_{i}", "custom_id": sid, "response": None,
                            "error": {"code": "batch_expired", "message": "This request could not be executed "
                                      "before the completion window expired."}})
                continue
            msgs = body.get("messages") or []
            prompt = next((str(m.get("content", "")) for m in reversed(msgs) if m.get("role") == "user"), "")
            if c.batch_row_errors and i % c.batch_row_errors == c.batch_row_errors - 1:
                status, obj = 500, _error("The server had an error (injected batch row).")
            elif c.bad_marker and c.bad_marker in prompt:
                status, obj = 400, _error("This model's maximum context length was exceeded (injected).")
            else:
                ptoks = count_prompt_tokens(msgs)
                max_tokens = int(body.get("max_tokens") or 16)
                ctoks = srv._completion_len(prompt, max_tokens)
                srv.hits.append(Hit(time.time(), 200, prompt, ptoks, ctoks, True, "batch", body))
                status, obj = 200, srv._completion(body, prompt, ptoks, ctoks, max_tokens)
                usage = srv._usage(c.batch_usage, ptoks, ctoks, max_tokens, obj.get("usage"))
                if usage is None:
                    obj.pop("usage", None)
                else:
                    obj["usage"] = usage
            row = {"id": f"batch_req_{i}", "custom_id": sid,
                   "response": {"status_code": status, "request_id": f"req_{i}", "body": obj}, "error": None}
            (out if status == 200 else err).append(row)
        for name, lines in (("output_file_id", out), ("error_file_id", err)):
            if lines:
                fid = self._now_id("file")
                data = "".join(json.dumps(x) + "\n" for x in lines).encode()
                if c.batch_garbage:
                    data = (b"<html>not json\n" + data + json.dumps({"custom_id": "not-ours", "response": {
                        "status_code": 200, "body": {}}}).encode() + b"\n" + data[: len(data) // 3])
                srv.files[fid] = {"meta": {"id": fid, "object": "file", "bytes": len(data), "purpose": "batch_output",
                                           "created_at": int(time.time()), "filename": f"{b['id']}_{name}.jsonl",
                                           "status": "processed"}, "data": data}
                b[name] = fid
        b["request_counts"] = {"total": len(rows), "completed": len(out), "failed": len(err)}
        b["status"] = "expired" if expire else "completed"

    def retrieve(self, bid: str):
        srv = self.srv
        with srv.lock:
            srv.polls += 1
        if srv.cfg.hold_poll:
            srv._stopped.wait(srv.cfg.hold_poll)
        with srv.lock:
            if srv.cfg.batch_poll_5xx and srv.rng.random() < srv.cfg.batch_poll_5xx:
                return 503, _error("The server is overloaded (injected)."), {}
            b = srv.batches.get(bid)
            if b is None:
                return 404, _error(f"No batch with id {bid!r}"), {}
            self._advance(b)
            return 200, self.public(b), {}

    def cancel(self, bid: str):
        with self.srv.lock:
            b = self.srv.batches.get(bid)
            if b is None:
                return 404, _error(f"No batch with id {bid!r}"), {}
            self._advance(b, cancel=True)
            return 200, self.public(b), {}

    def list(self, query: dict):
        srv = self.srv
        limit = int(query.get("limit", ["20"])[0])
        after = query.get("after", [None])[0]
        with srv.lock:
            items = [] if srv.cfg.batch_vanish else sorted(srv.batches.values(), key=lambda b: -b["_n"])
            for b in items:
                self._advance(b)
            if after is not None:
                ids = [b["id"] for b in items]
                items = items[ids.index(after) + 1:] if after in ids else []
            page = [self.public(b) for b in items[:limit]]
        return 200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                     "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}, {}

    def file(self, fid: str, content: bool):
        with self.srv.lock:
            f = self.srv.files.get(fid)
            if content:
                self.srv.content_gets += 1
                endless = self.srv.content_gets <= self.srv.cfg.endless_content
        if f is None:
            return 404, _error(f"No file with id {fid!r}"), {}
        if content and self.srv.cfg.hold_content:
            time.sleep(self.srv.cfg.hold_content)
        if content and endless:
            return 200, _Endless(f["data"]), {}
        return 200, (f["data"] if content else f["meta"]), {}


class _Endless(bytes):
    """A result file that never ends: the first half of these bytes, then 'x' forever (so the row
    cut in half becomes a line that never ends, and the rows after it are never sent)."""



def _error(msg: str) -> dict:
    return {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": None}}


def acts(key_offsets: int = 400):
    """A hypothesis strategy for one scripted answer: honest or lying usage, error statuses with the
    upstream's bill or without, the key echoed at any offset, garbage, truncated or dripping bodies.
    Drips of 0.6 s between chunks outlast a 0.5 s read timeout (an unknown outcome)."""
    from hypothesis import strategies as st

    return st.builds(
        Act,
        status=st.sampled_from([200, 200, 200, 400, 500, 502, 503, 504]),
        usage=st.sampled_from(USAGE_LIES),
        billed=st.booleans(),
        echo_key_at=st.none() | st.integers(0, key_offsets),
        body=st.sampled_from(["json", "json", "garbage", "truncated"]),
        drip=st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.6]),
    )


def _make_handler(srv: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, obj: dict, headers: dict | None = None, act: Act | None = None) -> None:
            data = json.dumps(obj).encode()
            if act is not None and act.body == "garbage":
                data = b'{"id": "chatcmpl-x", "choices": [{"message": ' + data[: len(data) // 3] + b"<html>oops"
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if act is not None and act.body == "truncated":  # promise the whole body, send half, hang up
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            chunks = 4 if act is not None and act.drip else 1
            step = -(-len(data) // chunks)
            for i in range(0, len(data), step):
                if i:
                    time.sleep(act.drip)
                self.wfile.write(data[i:i + step])
                self.wfile.flush()

        def _send_endless(self, data: bytes) -> None:
            """The file, then 'x' at `endless_rate` bytes/s until the client hangs up or the server stops."""
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("content-length", str(1 << 50))
            self.end_headers()
            chunk = b"x" * 65536
            step = len(chunk) / srv.cfg.endless_rate
            try:
                self.wfile.write(data[: len(data) // 2])
                while not srv._stopped.wait(step):
                    self.wfile.write(chunk)
                    with srv.lock:
                        srv.endless_sent += len(chunk)
            except OSError:  # the client hung up
                pass
            self.close_connection = True

        def _authorized(self) -> bool:
            if srv.cfg.api_key is not None and self.headers.get("authorization") != f"Bearer {srv.cfg.api_key}":
                self._send(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                           "code": "invalid_api_key"}})
                return False
            return True

        def _batch_route(self, method: str, raw: bytes = b"") -> bool:
            """Serve a Batch API route; False if the path is not one."""
            url = urllib.parse.urlparse(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) < 2 or parts[0] != "v1" or parts[1] not in ("files", "batches"):
                return False
            if not self._authorized():
                return True
            api, rest = srv.batch_api, parts[2:]
            if parts[1] == "files":
                if method == "POST" and not rest:
                    out = api.upload(self.headers.get("content-type", ""), raw)
                elif method == "GET" and len(rest) in (1, 2):
                    out = api.file(rest[0], content=rest[1:] == ["content"])
                else:
                    out = 404, _error(f"no route {self.path}"), {}
            elif method == "POST" and not rest:
                out = api.create(json.loads(raw or b"{}"))
            elif method == "GET" and not rest:
                out = api.list(urllib.parse.parse_qs(url.query))
            elif method == "GET" and len(rest) == 1:
                out = api.retrieve(rest[0])
            elif method == "POST" and len(rest) == 2 and rest[1] == "cancel":
                out = api.cancel(rest[0])
            else:
                out = 404, _error(f"no route {self.path}"), {}
            status, obj, headers = out
            if isinstance(obj, _Endless):
                return self._send_endless(obj) or True
            if isinstance(obj, bytes):
                self.send_response(status)
                self.send_header("content-type", "application/octet-stream")
                self.send_header("content-length", str(len(obj)))
                self.end_headers()
                self.wfile.write(obj)
            else:
                self._send(status, obj, headers)
            return True

        def do_GET(self) -> None:
            if self._batch_route("GET"):
                return
            if self.path.rstrip("/").endswith("/models"):
                names = srv.cfg.models or ("fault-teacher",)
                return self._send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
            self._send(404, {"error": {"message": "not found", "type": "invalid_request_error", "code": None}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
            if self._batch_route("POST", raw):
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error",
                                                  "code": None}})
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                return self._send(400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error",
                                                  "code": None}})
            status, obj, headers, hit = srv.decide(body, self.headers.get("authorization"))
            with srv.lock:
                srv.in_flight += 1
                srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            try:
                if status == 200:
                    wait = srv.delay() + (srv.cfg.slow_seconds if hit.kind == "slow" else 0.0)
                    if wait:
                        time.sleep(wait)
                    if hit.kind == "drop":
                        self.close_connection = True
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        return
                try:
                    self._send(status, obj, headers, hit.act)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    self.close_connection = True  # the client gave up (timeout); it was still billed
            finally:
                with srv.lock:
                    srv.in_flight -= 1

    return Handler


if __name__ == "__main__":  # manual use: python tests/fault_server.py --rpm 600
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8765)
    for name in ("rpm", "tpm", "latency", "jitter", "p429", "p500", "p_drop"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    a = ap.parse_args()
    cfg = FaultConfig(**{k: v for k, v in vars(a).items() if k != "port" and v is not None})
    with FaultServer(cfg, a.port) as s:
        print(f"fault server on {s.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
