"""A scoring teacher that lies on request: a real HTTP/1.1 server on 127.0.0.1 (stdlib
`ThreadingHTTPServer`) answering vLLM-style scoring requests (`POST /v1/completions` with token ids,
`echo`, `prompt_logprobs`) and `GET /v1/models`.

Honest rows: for each sent token t >= 1, {ids[t]: log 0.5, ids[t]+1: log 0.3, ids[t]+2: log 0.1}
(mod the vocabulary), `usage.prompt_tokens` = the number of ids. `faults` is a queue: each request
takes the next fault (none left: honest). A fault is a name from `LIES` (a 200 whose rows cannot be
true) or `STATUS` (429 / 500 / a slow drip / not JSON / 300 alternatives), with an optional number
(Retry-After seconds for 429).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "lying-scorer"
LIES = ("bad_id", "abc_id", "list_value", "list_row", "missing_sent", "positive", "nan", "inf", "short",
        "no_choices", "mass", "string_logprob", "negative_id")
STATUS = ("429", "500", "drip", "garbage", "big_k", "400")


def honest_rows(ids: list[int], vocab: int) -> list:
    rows = [None]
    for t in range(1, len(ids)):
        i = ids[t]
        rows.append({str(i): {"logprob": math.log(0.5), "rank": 1},
                     str((i + 1) % vocab): {"logprob": math.log(0.3), "rank": 2},
                     str((i + 2) % vocab): {"logprob": math.log(0.1), "rank": 3}})
    return rows


def lie(name: str, ids: list[int], vocab: int) -> dict:
    """A 200 answer with rows that cannot be true."""
    rows = honest_rows(ids, vocab)
    t = len(ids) - 1  # the last position carries the lie
    sent = str(ids[t])
    row = rows[t]
    if name == "bad_id":
        row["99999"] = {"logprob": -9.0}
    elif name == "negative_id":
        row["-3"] = {"logprob": -9.0}
    elif name == "abc_id":
        row["abc"] = {"logprob": -9.0}
    elif name == "list_value":
        row[sent] = [-0.7]
    elif name == "list_row":
        rows[t] = list(row.items())
    elif name == "missing_sent":
        del row[sent]
    elif name == "positive":
        row[sent] = {"logprob": 0.7}
    elif name == "nan":
        row[sent] = {"logprob": float("nan")}
    elif name == "inf":
        row[sent] = {"logprob": float("-inf")}
    elif name == "string_logprob":
        row[sent] = {"logprob": "-0.5"}
    elif name == "mass":
        row[sent] = {"logprob": -0.01}
        row[str((ids[t] + 1) % vocab)] = {"logprob": -0.01}
    elif name == "short":
        rows = rows[:-1]
    elif name == "no_choices":
        return {"object": "text_completion", "choices": []}
    return answer(rows, ids)


def answer(rows: list, ids: list[int]) -> dict:
    return {"id": "cmpl-x", "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": rows}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}}


class ScoringFaultServer:
    """`with ScoringFaultServer(vocab) as s:` -> s.url (base URL ending in /v1), s.faults (a deque
    of (name, number) to serve next), s.calls (scoring requests answered, any outcome), s.big_k
    (rows of 300 entries, honest otherwise)."""

    def __init__(self, vocab: int = 512, tokenizer_dir=None):
        self.vocab = vocab
        self.tokenizer = None  # answers a text prompt (a tokenizer probe) honestly in these tokens
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.faults: deque = deque()
        self.calls = 0
        self.big_k = False
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    def next_fault(self):
        with self._lock:
            self.calls += 1
            return self.faults.popleft() if self.faults else (None, None)

    def text_answer(self, text: str, k: int) -> dict:
        """An echoed legacy `logprobs` answer for a text prompt, with the ids it tokenises to."""
        from kdforge.data.tokenizer import token_bytes

        ids = self.tokenizer(text)["input_ids"]
        table = token_bytes(self.tokenizer)
        toks = [(table[i] or b"").decode("utf-8", "replace") for i in ids]
        lps = [None] + [math.log(0.5)] * (len(ids) - 1)
        tops = [None] + [{t: math.log(0.5)} for t in toks[1:]]
        return {"id": "cmpl-t", "object": "text_completion", "model": MODEL, "prompt_token_ids": [ids],
                "choices": [{"index": 0, "text": text, "finish_reason": "length",
                             "logprobs": {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops,
                                          "tokens_bytes": [list(table[i] or b"") for i in ids]}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}}

    def rows_for(self, ids: list[int]) -> list:
        rows = honest_rows(ids, self.vocab)
        if self.big_k:
            for r in rows[1:]:
                for j in range(300):
                    r.setdefault(str((j * 7) % self.vocab), {"logprob": -20.0 - j / 100})
        return rows


def _handler(srv: ScoringFaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _send(self, status: int, obj, headers: dict | None = None, drip: float = 0.0, raw: bytes | None = None):
            body = raw if raw is not None else json.dumps(obj).encode()  # NaN/Infinity as JSON's extension
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            try:
                if drip:  # one byte at a time: only a whole-request deadline ends it
                    for b in body:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        time.sleep(drip)
                else:
                    self.wfile.write(body)
            except OSError:  # the client gave up
                self.close_connection = True

        def do_GET(self):
            self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            ids = body.get("prompt")
            if isinstance(ids, str) and srv.tokenizer is not None:  # a tokenizer probe: not a scoring call
                return self._send(200, srv.text_answer(ids, body.get("logprobs") or 1))
            name, n = srv.next_fault()
            if name == "429":
                return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                                  {"retry-after": str(n if n is not None else 0)})
            if name == "400":
                return self._send(400, {"error": {"message": "prompt_logprobs is not supported"}})
            if name == "500":
                return self._send(500, {"error": {"message": "upstream fell over"}})
            if name == "garbage":
                return self._send(200, None, raw=b"<html>not json")
            if name == "drip":
                return self._send(200, answer(srv.rows_for(ids), ids), drip=0.5)
            if name == "big_k":  # 300 alternatives per row, honest otherwise
                rows = honest_rows(ids, srv.vocab)
                for r in rows[1:]:
                    for j in range(300):
                        r.setdefault(str((j * 7) % srv.vocab), {"logprob": -20.0 - j / 100})
                return self._send(200, answer(rows, ids))
            if name is not None:
                return self._send(200, lie(name, ids, srv.vocab))
            self._send(200, answer(srv.rows_for(ids), ids))

    return Handler
