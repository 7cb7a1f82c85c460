"""`kdforge serve` against hostile clients: oversized bodies, too many prompts, clients that
leave, out-of-range seeds, a fail-open API key. A real server subprocess on 127.0.0.1; engine
effects are read from its `/stats` counters, never from timings."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from conftest import cli_env, free_port, run_cli
from test_serve import KEY, client, hf, server  # noqa: F401 - module fixtures reused here

from kdforge.serve.limits import DEFAULT_MAX_BODY_BYTES, MAX_PROMPTS, MAX_ROWS

AUTH = {"Authorization": f"Bearer {KEY}"}


def root(server) -> str:  # noqa: F811
    return server.base_url.removesuffix("/v1")


def stats(server) -> dict:  # noqa: F811
    r = httpx.get(root(server) + "/stats", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def raw_post(server, path: str, head_extra: str, body: bytes) -> socket.socket:  # noqa: F811
    """A POST written by hand on a plain socket, so the test decides what is sent and when."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\n{head_extra}\r\n").encode() + body)
    return s


def read_response(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += s.recv(65536)
    return status, json.loads(rest[:length])


# ---- body size ------------------------------------------------------------------------------

def test_body_over_the_cap_is_413_before_it_is_read(server):  # noqa: F811
    """Content-Length over the cap: answered at once, the body never read."""
    s = raw_post(server, "/v1/completions", f"Content-Length: {DEFAULT_MAX_BODY_BYTES + 1}\r\n", b'{"prompt": "')
    status, body = read_response(s)
    s.close()
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert str(DEFAULT_MAX_BODY_BYTES) in body["error"]["message"]


def test_chunked_body_over_the_cap_is_413(server):  # noqa: F811
    """No Content-Length (chunked upload): counted as it arrives, cut off at the cap."""
    s = raw_post(server, "/v1/completions", "Transfer-Encoding: chunked\r\n", b"")
    chunk = b"x" * (1 << 20)
    try:
        for _ in range(DEFAULT_MAX_BODY_BYTES // len(chunk) + 2):
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    except OSError:  # the server may answer and close while we still send
        pass
    status, body = read_response(s)
    s.close()
    assert status == 413 and body["error"]["type"] == "invalid_request_error"


def test_health_answers_while_a_big_prompt_is_tokenised(server):  # noqa: F811
    """Tokenising a 6 MB prompt must not hold the event loop. Proven without timings: GET /stats
    is answered while the server says the tokenising job is running (a job run on the loop could
    never be seen running), and /health is answered in that window too. The big request then ends
    in a context-length 400. If it ends before a poll catches it running (a very fast machine),
    the attempt is made again, at most 3 times."""
    body = json.dumps({"model": server.model, "prompt": "What is 12 plus 30? " * 300_000, "max_tokens": 1})
    for _attempt in range(3):
        done: list[str] = []

        def big():
            r = httpx.post(server.base_url + "/completions", content=body,
                           headers=AUTH | {"Content-Type": "application/json"}, timeout=120)
            done.append(f"big {r.status_code}")

        before = stats(server)["tokenize_jobs"]
        t = threading.Thread(target=big)
        t.start()
        seen_running = health = None
        while not done and seen_running is None:
            s = stats(server)
            if s["tokenize_jobs"] > before and s["tokenize_running"] > 0:
                seen_running = s
                health = httpx.get(root(server) + "/health", timeout=60).status_code
        t.join()
        assert done == ["big 400"]
        if seen_running is not None:
            assert health == 200
            return
    pytest.fail("the 6 MB prompt was never seen being tokenised while /stats answered (3 tries)")


# ---- prompts and rows per request ------------------------------------------------------------

def test_too_many_prompts_or_rows_is_400(client, server):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=["hi"] * (MAX_PROMPTS + 1), max_tokens=1)
    assert e.value.param == "prompt" and str(MAX_PROMPTS) in e.value.body["message"]
    n = 16
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=["hi"] * (MAX_ROWS // n + 1), max_tokens=1, n=n)
    assert e.value.param == "n" and str(MAX_ROWS) in e.value.body["message"]
    ok = client.completions.create(model=server.model, prompt=["hi"] * (MAX_ROWS // n), max_tokens=1, n=n)
    assert len(ok.choices) == MAX_ROWS // n * n


# ---- a client that leaves -------------------------------------------------------------------

def test_non_streamed_request_is_cancelled_when_the_client_leaves(server):  # noqa: F811
    """16 rows of 240 tokens are running when the client closes its socket: the engine drops
    all 16 (counted as cancelled) instead of generating them to the end. (Greedy on "hi" meets no
    eos within 240 tokens, so no row can end on its own first.)"""
    before = stats(server)
    body = json.dumps({"model": server.model, "prompt": "hi", "max_tokens": 240, "n": 16, "temperature": 0}).encode()
    s = raw_post(server, "/v1/completions", f"Content-Length: {len(body)}\r\n", body)
    deadline = time.monotonic() + 60
    while stats(server)["active_rows"] < 16:
        assert time.monotonic() < deadline, "the request never reached the engine"
    s.close()
    while (now := stats(server))["active_rows"] or now["waiting"]:
        assert time.monotonic() < deadline, now
    assert now["rows_cancelled"] - before["rows_cancelled"] == 16
    assert now["rows_finished"] == before["rows_finished"]  # none of them ran to its end


# ---- seeds and internal errors ----------------------------------------------------------------

@pytest.mark.parametrize("seed", [1e23, 2**63, -(2**63) - 1])
def test_seed_outside_int64_is_400(server, seed):  # noqa: F811
    r = httpx.post(server.base_url + "/completions", headers=AUTH, timeout=30,
                   json={"model": server.model, "prompt": "hi", "max_tokens": 2, "seed": seed})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text


def test_int64_edge_seeds_are_served(client, server):  # noqa: F811
    for seed in (2**63 - 1, -(2**63)):
        r = client.completions.create(model=server.model, prompt="hi", max_tokens=2, seed=seed, n=2)
        assert len(r.choices) == 2


def test_a_500_names_no_exception_text_and_the_log_has_it(hf, tiny_model_dir, capsys):  # noqa: F811
    """A real failure inside a route (the engine already closed) -> a generic 500 body; the
    exception's own text goes to the server's log only."""
    from kdforge.serve.app import build_app
    from kdforge.serve.engine import Engine
    from kdforge.serve.loader import load_served_model

    served = load_served_model(tiny_model_dir)
    engine = Engine(served.model, served.tokenizer)
    engine.close()
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine, served), host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="off"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": served.name, "prompt": "hi", "max_tokens": 2})
    finally:
        srv.should_exit = True
        t.join(10)
    err = r.json()["error"]
    assert r.status_code == 500 and err["type"] == "server_error"
    assert "closed" not in err["message"] and "RuntimeError" not in err["message"]
    assert "engine is closed" in capsys.readouterr().err


# ---- authentication that fails closed ----------------------------------------------------------

@pytest.mark.parametrize("value", ["", None])
def test_api_key_env_empty_or_unset_refuses_to_start(tiny_model_dir, value):
    env = cli_env()
    env.pop("KDFORGE_EMPTY_KEY", None)
    if value is not None:
        env["KDFORGE_EMPTY_KEY"] = value
    p = run_cli("serve", tiny_model_dir, "--port", "0", "--api-key-env", "KDFORGE_EMPTY_KEY", env=env, timeout=60)
    assert p.returncode == 2 and "KDFORGE_EMPTY_KEY" in p.stderr, p.stderr


def test_non_loopback_host_without_a_key_warns(tmp_path):
    """The warning comes with the option checks, before any folder is read (the folder here is
    empty, so the run then exits 2)."""
    loud = run_cli("serve", tmp_path, "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert loud.returncode == 2 and "WARNING" in loud.stderr and "--api-key-env" in loud.stderr
    quiet = run_cli("serve", tmp_path, "--host", "127.0.0.1", "--port", "0", timeout=60)
    assert quiet.returncode == 2 and "WARNING" not in quiet.stderr
