"""`kdforge serve`'s Batch API under hostile input and crashes (issue 22, "Batch API"): files
listed and deleted, batches for /v1/completions (scoring), a line nested too deeply to parse,
metadata caps, results streamed to disk as rows finish and kept across a cancel and a SIGKILL,
non-UTF-8 multipart fields. Real `kdforge serve` subprocesses on 127.0.0.1, the `openai` client."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

import openai
import pytest
from conftest import cli_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.serve import launch

KEY = "sk-test-batch-storage-key"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def start(model_dir, batch_dir):
    return launch(model_dir, env=cli_env(KDFORGE_TEST_KEY=KEY), api_key_env="KDFORGE_TEST_KEY",
                  extra_args=["--batch-dir", str(batch_dir)])


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("batches")


@pytest.fixture(scope="module")
def server(tiny_model_dir, batch_dir):
    handle = start(tiny_model_dir, batch_dir)
    yield handle
    assert handle.stop() == 0


def client_of(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return client_of(server)


def wait(client, bid: str, until=TERMINAL, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while (b := client.batches.retrieve(bid)).status not in until:
        assert time.monotonic() < deadline, f"batch {bid} still {b.status}"
        time.sleep(0.05)
    return b


def jsonl(rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows).encode()


def chat_row(server, cid: str, text: str, **kw) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": server.model, "messages": [{"role": "user", "content": text}], "max_tokens": 2} | kw}


def completion_row(server, cid: str, prompt, **kw) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": server.model, "prompt": prompt, "temperature": 0} | kw}


def submit(client, rows, endpoint="/v1/chat/completions", **kw):
    f = client.files.create(file=("in.jsonl", jsonl(rows)), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h", **kw)


def results(client, fid: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(fid).text.splitlines()] if fid else []


# ---- files: list, delete -------------------------------------------------------------------------

def test_files_are_listed_paged_and_deleted_with_the_openai_client(client, server):
    names = ["données 日本 🎉.jsonl", "b.jsonl", "c.jsonl"]
    made = [client.files.create(file=(n, jsonl([chat_row(server, "a", "x")])), purpose="batch") for n in names]
    listed = client.files.list(purpose="batch", limit=2)
    assert [f.id for f in listed.data] == [made[2].id, made[1].id] and listed.has_more
    after = client.files.list(purpose="batch", limit=2, after=made[1].id).data
    assert after[0].id == made[0].id and after[0].filename == names[0]
    assert [f.id for f in client.files.list(purpose="batch_output").data if f.id in {m.id for m in made}] == []
    gone = client.files.delete(made[1].id)
    assert gone.deleted and gone.id == made[1].id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(made[1].id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(made[1].id)
    assert made[1].id not in [f.id for f in client.files.list().data]


def test_the_input_of_a_running_batch_cannot_be_deleted_but_results_can(client, server):
    rows = [completion_row(server, f"r{i}", "Ça va?", max_tokens=120, ignore_eos=True) for i in range(24)]
    b = submit(client, rows, endpoint="/v1/completions")
    with pytest.raises(openai.ConflictError) as e:
        client.files.delete(b.input_file_id)
    assert b.id in str(e.value)
    client.batches.cancel(b.id)
    done = wait(client, b.id)
    assert client.files.delete(b.input_file_id).deleted
    if done.output_file_id:
        assert client.files.delete(done.output_file_id).deleted


# ---- batches for /v1/completions: scoring ------------------------------------------------------

def test_completions_batch_scores_and_generates_as_online(client, server):
    prompts = ["Café au lait", "日本語 🎉", [5, 17, 42, 99]]
    rows = [completion_row(server, f"s{i}", p, max_tokens=0, echo=True, logprobs=3) for i, p in enumerate(prompts)]
    rows.append(completion_row(server, "g", "naïve façade", max_tokens=6, logprobs=2))
    b = wait(client, submit(client, rows, endpoint="/v1/completions").id)
    assert b.status == "completed" and b.endpoint == "/v1/completions" and b.request_counts.completed == 4
    out = {r["custom_id"]: r["response"] for r in results(client, b.output_file_id)}
    for row in rows:
        got = out[row["custom_id"]]
        assert got["status_code"] == 200 and got["body"]["object"] == "text_completion"
        online = client.completions.create(**row["body"]).model_dump()
        g, o = got["body"]["choices"][0], online["choices"][0]
        assert g["text"] == o["text"] and g["logprobs"]["tokens"] == o["logprobs"]["tokens"]
        assert g["logprobs"]["token_logprobs"] == pytest.approx(o["logprobs"]["token_logprobs"], abs=1e-5)


def test_a_row_for_another_endpoint_fails_validation_naming_its_line(client, server):
    rows = [completion_row(server, "a", "x", max_tokens=1), chat_row(server, "b", "y")]
    b = wait(client, submit(client, rows, endpoint="/v1/completions").id)
    assert b.status == "failed" and [(e.line, "url" in e.message) for e in b.errors.data] == [(2, True)]
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=b.input_file_id, endpoint="/v1/embeddings", completion_window="24h")


# ---- hostile lines -------------------------------------------------------------------------------

def test_a_deeply_nested_line_fails_the_batch_once_naming_it(client, server):
    rows = [chat_row(server, "ok", "héllo"), "[" * 100000, '{"custom_id": ' * 50000]
    b = submit(client, rows)
    done = wait(client, b.id, timeout=30)
    assert done.status == "failed" and done.failed_at is not None
    assert [(e.line, "nested too deeply" in e.message) for e in done.errors.data] == [(2, True), (3, True)]
    for _ in range(5):  # a GET never starts it again
        assert client.batches.retrieve(b.id).status == "failed"
    assert "RecursionError" not in Path(server.log_path).read_text(errors="replace")


def test_a_deeply_nested_row_body_is_that_rows_400(client, server):
    deep = chat_row(server, "deep", "x")
    deep["body"]["messages"] = json.loads("[" * 500 + "]" * 500)
    b = wait(client, submit(client, [chat_row(server, "ok", "日本"), deep]).id)
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (1, 1)
    assert results(client, b.error_file_id)[0]["response"]["status_code"] == 400


def test_a_deeply_nested_json_body_is_400_online(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for path in ("/v1/batches", "/v1/chat/completions", "/tokenize"):
        conn.request("POST", path, body=b"[" * 100000, headers={"Authorization": f"Bearer {KEY}",
                                                              "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 400, (path, r.read())
        r.read()


odd_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=8)
odd_line = st.one_of(odd_json.map(lambda v: json.dumps(v, ensure_ascii=False)),
                     st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=30),
                     st.integers(1, 3000).map(lambda n: "[" * n), st.integers(1, 3000).map(lambda n: "{\"a\":" * n))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(odd_line, min_size=1, max_size=6))
def test_generated_odd_lines_end_the_batch_naming_each_bad_line(client, server, lines):
    rows = [chat_row(server, "good", "Ça va? 日本")] + lines
    b = wait(client, submit(client, rows).id, timeout=60)
    bad = [i for i, x in enumerate(rows[1:], 2) if x.encode().strip()]
    if bad:
        assert b.status == "failed" and [e.line for e in b.errors.data] == bad
    else:
        assert b.status == "completed" and b.request_counts.completed == 1


# ---- metadata ------------------------------------------------------------------------------------

def _create(client, fid: str, metadata):
    return client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h",
                                 metadata=metadata)


@pytest.fixture(scope="module")
def bad_file(client):
    """An input that fails validation at once: batches made from it cost no model time."""
    return client.files.create(file=("bad.jsonl", b"not json\n"), purpose="batch").id


@pytest.mark.parametrize("meta", [{f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513},
                                  {"k": 3}, {"k": None}, ["a"], "text"])
def test_metadata_over_openais_caps_is_400(client, bad_file, meta):
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, bad_file, meta)
    assert e.value.body["param"] == "metadata"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(max_size=8) | st.text(min_size=60, max_size=70),
                       st.text(max_size=8) | st.text(min_size=505, max_size=520), max_size=18))
def test_generated_metadata_is_kept_exactly_when_within_the_caps(client, bad_file, meta):
    ok = len(meta) <= 16 and all(len(k) <= 64 and len(v) <= 512 for k, v in meta.items())
    if not ok:
        with pytest.raises(openai.BadRequestError):
            _create(client, bad_file, meta)
        return
    b = _create(client, bad_file, meta)
    assert client.batches.retrieve(b.id).metadata == meta


def test_metadata_at_the_caps_with_non_ascii_is_kept(client, bad_file):
    meta = {("é" * 63) + str(i % 10): "日" * 512 for i in range(16)}
    assert client.batches.retrieve(_create(client, bad_file, meta).id).metadata == meta


# ---- results on disk: cancel, SIGKILL, restart --------------------------------------------------

def long_rows(server, n: int) -> list[dict]:
    return [completion_row(server, f"r{i:03d}", f"Row {i}: naïve 日本", max_tokens=80, ignore_eos=True)
            for i in range(n)]


def partial_lines(batch_dir: Path) -> list[dict]:
    return [json.loads(x) for p in batch_dir.glob("files/*out.partial") for x in p.read_text().splitlines()]


def until_completed(c, bid: str, n: int):
    deadline = time.monotonic() + 120
    while (b := c.batches.retrieve(bid)).request_counts.completed < n:
        assert b.status in ("validating", "in_progress") and time.monotonic() < deadline, b.status
        time.sleep(0.05)
    return b


def test_killed_server_keeps_finished_rows_of_a_cancelled_and_a_running_batch(tiny_model_dir, tmp_path):
    """Two batches run; one is cancelled and the server is SIGKILLed before either ends, with a
    torn line at the end of a results file. Restarted on the same folder: the cancelled batch
    ends with exactly the rows it finished (counts = lines), the running one goes on from the
    rows written: every row once, none run twice, none lost."""
    first = start(tiny_model_dir, tmp_path)
    rows = long_rows(first, 24)
    rows.insert(5, completion_row(first, "bad", "x", max_tokens=1, model="nope"))
    try:
        c = client_of(first)
        run = submit(c, rows, endpoint="/v1/completions")
        cancelled = submit(c, long_rows(first, 40), endpoint="/v1/completions")
        running = until_completed(c, cancelled.id, 3)
        until_completed(c, run.id, 3)
        # streamed: the finished rows are on disk while the batches run
        assert len(partial_lines(tmp_path)) >= 6 and running.output_file_id is None
        assert c.batches.cancel(cancelled.id).status == "cancelling"
        first.process.kill()  # before the cancelled batch's rows in flight could finish
        first.process.wait()
    finally:
        first.stop()
    written = partial_lines(tmp_path)
    on_disk = json.loads((tmp_path / "batches" / f"{cancelled.id}.json").read_text())
    assert on_disk["status"] == "cancelling"  # killed before the cancel could finish: the restart finishes it
    with open(next(tmp_path.glob(f"files/*{run.id.removeprefix('batch_')}out.partial")), "ab") as f:
        f.write(b'{"id": "batch_req_torn", "custom_id": "r0')  # a write cut by the kill
    second = start(tiny_model_dir, tmp_path)
    try:
        c = client_of(second)
        done = wait(c, cancelled.id)
        out = kept = results(c, done.output_file_id)
        ids = [r["custom_id"] for r in out]
        assert done.status == "cancelled" and len(ids) == len(set(ids)) >= 3
        assert done.request_counts.completed == len(out) and done.request_counts.failed == 0
        assert all(r["response"]["body"]["usage"]["completion_tokens"] == 80 for r in out)

        done = wait(c, run.id)
        out, err = results(c, done.output_file_id), results(c, done.error_file_id)
        assert done.status == "completed"
        assert sorted(r["custom_id"] for r in out) == [f"r{i:03d}" for i in range(24)]  # none lost, none twice
        assert [r["custom_id"] for r in err] == ["bad"] and err[0]["response"]["status_code"] == 404
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (25, 24, 1)
        kept = {r["id"] for r in kept + out}
        assert all(r["id"] in kept for r in written)  # rows written before the kill were kept, not run again
    finally:
        assert second.stop() == 0


# ---- multipart -----------------------------------------------------------------------------------

def multipart(fields: list[tuple[bytes, bytes | None, bytes]]) -> tuple[bytes, str]:
    body = b""
    for name, filename, data in fields:
        disp = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
        body += b"--XyZ\r\nContent-Disposition: " + disp + b"\r\n\r\n" + data + b"\r\n"
    return body + b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"


@pytest.mark.parametrize("fields,param", [
    ([(b"purpose", None, b"\xff\xfebatch"), (b"file", b"a.jsonl", b"{}\n")], "purpose"),
    ([(b"purpose", None, b"batch"), (b"file", b"\xff\xfe.jsonl", b"{}\n")], "file"),
])
def test_non_utf8_multipart_is_400_and_the_connection_stays_usable(server, fields, param):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body, ctype = multipart(fields)
    conn.request("POST", "/v1/files", body=body, headers={"Authorization": f"Bearer {KEY}", "Content-Type": ctype})
    r = conn.getresponse()
    err = json.loads(r.read())["error"]
    assert r.status == 400 and param in (err["param"] or "") + err["message"]
    sock = conn.sock
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok" and conn.sock is sock  # same connection


def test_a_utf8_filename_round_trips(client):
    f = client.files.create(file=("naïve 日本 🎉.jsonl", b"{}\n"), purpose="batch")
    assert client.files.retrieve(f.id).filename == "naïve 日本 🎉.jsonl"


def test_after_a_500_the_connection_stays_usable(client, server, batch_dir):
    f = client.files.create(file=("gone.jsonl", b"{}\n"), purpose="batch")
    (batch_dir / "files" / f.id).unlink()  # the disk lost it behind the server's back
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", f"/v1/files/{f.id}/content", headers={"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    assert r.status == 500 and "error id" in json.loads(r.read())["error"]["message"]
    sock = conn.sock
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 200 and r.read() and conn.sock is sock
