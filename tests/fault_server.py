"""A fault-injecting OpenAI-compatible teacher for tests and benchmarks.

A real HTTP/1.1 server (stdlib `ThreadingHTTPServer`) on 127.0.0.1, one thread per connection.
It answers `POST /v1/chat/completions` (and `GET /v1/models`) the way OpenAI does, and on
purpose gets things wrong: it can require a key, refuse unknown models, enforce requests- and
tokens-per-minute limits (token buckets, as OpenAI quantises them), inject 429s with
`retry-after-ms`/`retry-after`, 500s, slow responses and dropped connections, and answer 400
for prompts holding a marker. It counts everything it received (`hits`), and what it billed:
a completion counts as billed once generated, even if the connection is then dropped.

    with FaultServer(FaultConfig(api_key="sk-test", p429=0.3)) as srv:
        ... kdforge generate --teacher srv.url ...
        assert srv.count(status=200) == 20

Responses are deterministic per prompt (a digest of it leads the text), so duplicates show.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("the teacher writes a careful answer with steps and checks each result before it moves on "
         "to the next part of the question so the student can learn from every token").split()


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
    seed: int = 0


@dataclass
class Hit:
    t: float  # time.time() at arrival
    status: int
    prompt: str = ""  # last user message
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed: bool = False
    kind: str = ""  # "ok", "auth", "model", "limit", "inj429", "inj500", "drop", "bad"
    body: dict = field(default_factory=dict)


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

    def billed_usd(self, price_input: float, price_output: float) -> float:
        """What a provider charging these prices (USD per million tokens) would bill."""
        with self.lock:
            return sum(h.prompt_tokens * price_input + h.completion_tokens * price_output
                       for h in self.hits if h.billed) / 1e6

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
            r = self.rng.random()
            if r < c.p429:
                if c.retry_after_ms is not None:
                    headers["retry-after-ms"] = str(c.retry_after_ms)
                if c.retry_after_s is not None:
                    headers["retry-after"] = str(c.retry_after_s)
                return self._err(hit, 429, "inj429", "Rate limit reached (injected).", "rate_limit_exceeded", headers)
            if r < c.p429 + c.p500:
                return self._err(hit, 500, "inj500", "The server had an error (injected).", None, headers)
            if c.bad_marker and c.bad_marker in prompt:
                return self._err(hit, 400, "bad", "This model's maximum context length was exceeded (injected).",
                                 "context_length_exceeded", headers)
            ctoks = self._completion_len(prompt, max_tokens)
            hit.status, hit.kind, hit.billed = 200, "ok", True
            hit.prompt_tokens, hit.completion_tokens, hit.body = ptoks, ctoks, body
            if self.rng.random() < c.p_drop:
                hit.kind = "drop"
            elif self.rng.random() < c.p_slow:
                hit.kind = "slow"
        return 200, self._completion(body, prompt, ptoks, ctoks, max_tokens), headers, hit

    def _err(self, hit: Hit, status: int, kind: str, msg: str, code: str | None, headers: dict | None = None):
        hit.status, hit.kind = status, kind
        etype = {401: "invalid_request_error", 404: "invalid_request_error", 400: "invalid_request_error",
                 429: "requests", 500: "server_error"}[status]
        return status, {"error": {"message": msg, "type": etype, "param": None, "code": code}}, headers or {}, hit

    def _completion_len(self, prompt: str, max_tokens: int) -> int:
        if self.cfg.completion_tokens is not None:
            return max(1, min(self.cfg.completion_tokens, max_tokens))
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
        lo = max(1, max_tokens // 2)
        return lo + seed % (max_tokens - lo + 1)

    def _completion(self, body: dict, prompt: str, ptoks: int, ctoks: int, max_tokens: int) -> dict:
        digest = hashlib.sha256(f"{prompt}|{body.get('temperature')}".encode()).hexdigest()[:8]
        rng = random.Random(digest)
        tokens = [f"[{digest}]"] + [" " + rng.choice(WORDS) for _ in range(ctoks - 1)]
        msg = {"role": "assistant", "content": "".join(tokens)}
        choice = {"index": 0, "message": msg, "finish_reason": "length" if ctoks >= max_tokens else "stop",
                  "logprobs": None}
        if body.get("logprobs"):
            k = int(body.get("top_logprobs") or 0)
            content = []
            for tok in tokens:
                lp = -round(rng.random() * 0.5, 4)
                alts = [{"token": tok, "logprob": lp, "bytes": list(tok.encode())}]
                alts += [{"token": " " + w, "logprob": lp - 1 - i, "bytes": list((" " + w).encode())}
                         for i, w in enumerate(rng.sample(WORDS, max(0, k - 1)))]
                content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": alts[:k]})
            choice["logprobs"] = {"content": content, "refusal": None}
        out = {"id": f"chatcmpl-{digest}", "object": "chat.completion", "created": int(time.time()),
               "model": body.get("model", "fault-teacher"), "choices": [choice]}
        if self.cfg.usage:
            out["usage"] = {"prompt_tokens": ptoks, "completion_tokens": ctoks, "total_tokens": ptoks + ctoks}
        return out

    def delay(self) -> float:
        c = self.cfg
        with self.lock:
            return max(0.0, c.latency + (self.rng.uniform(-c.jitter, c.jitter) if c.jitter else 0.0))


def _make_handler(srv: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                names = srv.cfg.models or ("fault-teacher",)
                return self._send(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
            self._send(404, {"error": {"message": "not found", "type": "invalid_request_error", "code": None}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length)
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
                    self._send(status, obj, headers)
                except (BrokenPipeError, ConnectionResetError):
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
