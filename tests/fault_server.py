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
    seed: int = 0


@dataclass
class Hit:
    t: float  # time.time() at arrival
    status: int
    prompt: str = ""  # last user message
    prompt_tokens: int = 0
    completion_tokens: int = 0
    billed: bool = False
    kind: str = ""  # "ok", "auth", "model", "limit", "inj429", "inj500", "drop", "bad", "scripted"
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
        usage = self._usage(act.usage, ptoks, ctoks, max_tokens)
        if usage is None:
            obj.pop("usage", None)
        else:
            obj["usage"] = usage
        return 200, obj, headers, hit

    @staticmethod
    def _usage(lie: str, ptoks: int, ctoks: int, max_tokens: int) -> dict | None:
        """The `usage` object an answer reports, honest or not (billing is always `ptoks`, `ctoks`)."""
        p, c = {"honest": (ptoks, ctoks), "negative": (-1_000_000, -ctoks), "huge": (10**15, 10**15),
                "string": ("lots", "many"), "bool": (True, False), "float": (ptoks + 0.5, float(ctoks)),
                "over": (ptoks, max_tokens * 10)}.get(lie, (None, None))
        if lie == "missing":
            return None
        return {"prompt_tokens": p, "completion_tokens": c,
                "total_tokens": p + c if lie in ("honest", "negative", "huge", "over") else "?"}

    def _err(self, hit: Hit, status: int, kind: str, msg: str, code: str | None, headers: dict | None = None):
        hit.status, hit.kind = status, kind
        etype = {401: "invalid_request_error", 404: "invalid_request_error", 400: "invalid_request_error",
                 429: "requests"}.get(status, "server_error")
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
        if self.cfg.answer is not None:  # byte-level tokens: a character may span two of them
            raw = f"[{digest}] {self.cfg.answer}".encode()
            pieces = [raw[i:i + 3] for i in range(0, len(raw), 3)]
        else:
            pieces = [t.encode() for t in [f"[{digest}]"] + [" " + rng.choice(WORDS) for _ in range(ctoks - 1)]]
        tokens = [p.decode("utf-8", "replace") for p in pieces]
        msg = {"role": "assistant", "content": b"".join(pieces).decode()}
        choice = {"index": 0, "message": msg, "finish_reason": "length" if ctoks >= max_tokens else "stop",
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
        return out

    def delay(self) -> float:
        c = self.cfg
        with self.lock:
            return max(0.0, c.latency + (self.rng.uniform(-c.jitter, c.jitter) if c.jitter else 0.0))


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
