"""`kdforge serve`'s Batch API with the official `openai` client (files and batches: create,
retrieve, list, content, cancel; the key checked), greedy batch results equal to online answers;
and `kdforge generate --batch` end to end against it: the online dataset at the batch price."""

from __future__ import annotations

import json
import time

import openai
import pytest
from conftest import cli_env, run_cli
from generate_cli import lines

from kdforge.serve import launch

KEY = "sk-test-batch-key"
PROMPTS = ["What is 3 plus 4?", "Sort these words: golf alpha echo", "What is 10 plus 12?"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    handle = launch(tiny_model_dir, env=cli_env(KDFORGE_TEST_KEY=KEY), api_key_env="KDFORGE_TEST_KEY",
                    extra_args=["--batch-dir", str(tmp_path_factory.mktemp("batches"))])
    yield handle
    assert handle.stop() == 0


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


def _body(server, prompt: str) -> dict:
    return {"model": server.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}


def _wait(client, bid: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while (b := client.batches.retrieve(bid)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch {bid} still {b.status}"
        time.sleep(0.1)
    return b


def test_files_and_batches_with_the_openai_client_equal_online(client, server):
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": _body(server, p)}
            for i, p in enumerate(PROMPTS)]
    rows.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                 "body": _body(server, "x") | {"model": "no-such-model"}})
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = client.files.create(file=("in.jsonl", data), purpose="batch")
    assert client.files.retrieve(f.id).bytes == len(data) and client.files.content(f.id).content == data
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"run": "t1"})
    assert b.status == "validating" and b.metadata == {"run": "t1"}
    assert b.id in [x.id for x in client.batches.list(limit=5).data]
    b = _wait(client, b.id)
    assert b.status == "completed" and b.request_counts.completed == 3 and b.request_counts.failed == 1
    out = {r["custom_id"]: r for r in map(json.loads, client.files.content(b.output_file_id).text.splitlines())}
    err = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in err] == ["bad"] and err[0]["response"]["status_code"] == 404
    for i, p in enumerate(PROMPTS):
        online = client.chat.completions.create(**_body(server, p)).model_dump()
        row = out[f"r{i}"]["response"]
        assert row["status_code"] == 200
        got = row["body"]
        assert got["choices"][0]["message"]["content"] == online["choices"][0]["message"]["content"]
        assert {k: got["usage"][k] for k in ("prompt_tokens", "completion_tokens")} == \
            {k: online["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
        assert [t["token"] for t in got["choices"][0]["logprobs"]["content"]] == \
            [t["token"] for t in online["choices"][0]["logprobs"]["content"]]


def test_list_pages_cancel_invalid_file_and_key(client, server):
    f = client.files.create(file=("bad.jsonl", b'{"custom_id": "a", "method": "GET", "url": "/v1/x"}\n'),
                            purpose="batch")
    bad = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert _wait(client, bad.id).status == "failed" and client.batches.retrieve(bad.id).errors.data[0].line == 1
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": _body(server, f"What is {i} plus 1?") | {"max_tokens": 64}} for i in range(40)]
    f2 = client.files.create(file=("c.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()), purpose="batch")
    b = client.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
    c = client.batches.cancel(b.id)
    assert c.status in ("cancelling", "cancelled")
    done = _wait(client, b.id)
    assert done.status == "cancelled" and done.request_counts.completed < 40
    first = client.batches.list(limit=1)
    assert first.has_more and first.data[0].id == b.id
    second = client.batches.list(limit=1, after=first.data[0].id)
    assert second.data[0].id == bad.id
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0).batches.list()


def test_generate_batch_against_kdforge_serve_equals_online(server, tmp_path):
    common = ["--teacher", server.base_url, "--model", server.model, "--total", 6, "--max-tokens", 8,
              "--temperature", 0, "--price-input", 1, "--price-output", 2]
    env = cli_env(OPENAI_API_KEY=KEY)
    p = run_cli("generate", "--out", tmp_path / "b.jsonl", "--batch", "--batch-size", 4, "--batch-poll", 0.1,
                *common, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    p = run_cli("generate", "--out", tmp_path / "o.jsonl", *common, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    b = {r["id"]: r for r in lines(tmp_path / "b.jsonl")}
    o = {r["id"]: r for r in lines(tmp_path / "o.jsonl")}
    assert len(b) == 6 and b.keys() == o.keys()
    assert all(b[k]["teacher_text"] == o[k]["teacher_text"] for k in b)
    cost_b = sum(r["metadata"]["cost_usd"] for r in b.values())
    cost_o = sum(r["metadata"]["cost_usd"] for r in o.values())
    assert cost_b == pytest.approx(cost_o / 2, abs=1e-8)  # the discount, on the same tokens


def test_engine_starts_online_requests_before_waiting_batch_rows(tiny_model_dir):
    """Low priority: with one row of room, an online request submitted after three batch rows
    finishes before the two batch rows still waiting."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.serve.engine import Engine
    from kdforge.serve.sampling import SamplingParams

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok, max_batch_size=1)
    order, ids = [], tok("What is 1 plus 2?")["input_ids"]
    try:
        long, short = SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=2, temperature=0)
        emit = lambda name: (lambda d: order.append(name) if getattr(d, "finish_reason", None) else None)  # noqa: E731
        engine.submit([(ids, long, emit(f"batch{i}")) for i in range(3)], incremental=False, low=True)
        engine.submit([(ids, short, emit("online"))], incremental=False)
        deadline = time.monotonic() + 60
        while len(order) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()
    assert order.index("online") <= 1 and order[-2:] == ["batch1", "batch2"], order
