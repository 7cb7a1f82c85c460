"""`kdforge serve` against what real clients send (issue 22, "Real clients"): lm-eval's
loglikelihood request when the generated token is eos, the sampling parameters a local model
honours (each checked against a greedy decode with the same rule applied by hand), the ones it
refuses (400 naming them), and vLLM's /tokenize and /detokenize. A real server subprocess on
127.0.0.1 with the tiny random Llama and the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from conftest import cli_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.serve import launch

KEY = "sk-test-conformance-key"
NON_ASCII = ["Café au lait, naïve façade", "日本語のテキスト", "emoji 🎉🚀 ok", "What is 3 plus 4?"]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    handle = launch(tiny_model_dir, env=cli_env(KDFORGE_TEST_KEY=KEY), api_key_env="KDFORGE_TEST_KEY")
    yield handle
    assert handle.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url.removesuffix("/v1"), timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def raw_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def reference_greedy(model, prompt: list[int], n: int, shape, eos: set[int] = frozenset()) -> list[int]:
    """Greedy decoding of `n` tokens where `shape(logits, generated, all_ids)` returns the logits
    to take the argmax of: each sampling parameter's rule written out by hand."""
    ids, gen = list(prompt), []
    for _ in range(n):
        logits = shape(raw_logits(model, ids)[-1].clone(), list(gen), list(ids))
        t = int(logits.argmax())
        gen.append(t)
        ids.append(t)
        if t in eos:
            break
    return gen


def complete(client, server, prompt, **kw):
    kw = {"max_tokens": 12, "temperature": 0} | kw
    extra = {k: kw.pop(k) for k in ("top_k", "min_tokens", "repetition_penalty", "ignore_eos",
                                    "return_token_ids") if k in kw}
    return client.completions.create(model=server.model, prompt=prompt, extra_body=extra, **kw)


# ---- lm-eval's loglikelihood: the eos entry ------------------------------------------------------

@pytest.mark.parametrize("text", NON_ASCII)
def test_echo_loglikelihood_lists_the_generated_eos(client, server, hf, text):
    """lm-eval sends echo, max_tokens 1, logprobs 1 and reads token_logprobs[ctxlen:-1]: the last
    entry must be the generated token even when it is eos (it was dropped, so lm-eval summed one
    token short). logit_bias +100 makes the one generated token eos."""
    model, tok = hf
    ids = tok(text)["input_ids"]
    r = complete(client, server, text, max_tokens=1, logprobs=1, echo=True, logit_bias={str(tok.eos_token_id): 100},
                 return_token_ids=True)
    c, lp = r.choices[0], r.choices[0].logprobs
    assert c.finish_reason == "stop" and r.usage.completion_tokens == 1
    assert c.text == tok.decode(ids, clean_up_tokenization_spaces=False)  # the eos adds no text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) \
        == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.tokens[-1] == tok.decode([tok.eos_token_id]) and lp.text_offset[-1] == len(c.text)
    ref = torch.log_softmax(raw_logits(model, ids), -1)
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1, tok.eos_token_id]), abs=1e-4)  # raw, no bias
    # lm-eval's continuation sum (context = first token): every prompt token after it, exactly
    want = sum(float(ref[j - 1, ids[j]]) for j in range(1, len(ids)))
    assert sum(lp.token_logprobs[1:-1]) == pytest.approx(want, abs=1e-3)
    assert c.model_extra["token_ids"] == [tok.eos_token_id]


def test_streamed_eos_entry_equals_the_non_streamed_one(client, server, hf):
    _, tok = hf
    kw = dict(max_tokens=4, logprobs=2, echo=True, logit_bias={str(tok.eos_token_id): 100})
    whole = complete(client, server, "日本 café", **kw).choices[0].logprobs
    toks, lps = [], []
    for ch in complete(client, server, "日本 café", stream=True, **kw):
        if ch.choices and ch.choices[0].logprobs:
            toks += ch.choices[0].logprobs.tokens
            lps += ch.choices[0].logprobs.token_logprobs
    assert toks == whole.tokens and lps == pytest.approx(whole.token_logprobs, abs=1e-6)
    assert toks[-1] == tok.decode([tok.eos_token_id])


# ---- honoured sampling parameters ----------------------------------------------------------------

PROMPT = "What is 12 plus 30?"


def gen_ids(client, server, **kw) -> list[int]:
    r = complete(client, server, PROMPT, return_token_ids=True, **kw)
    return r.choices[0].model_extra["token_ids"]


def test_logit_bias_minus_100_removes_the_greedy_token(client, server, hf):
    model, tok = hf
    prompt = tok(PROMPT)["input_ids"]
    plain = gen_ids(client, server, max_tokens=1)
    banned = gen_ids(client, server, max_tokens=1, logit_bias={str(plain[0]): -100})
    assert banned != plain
    assert banned == reference_greedy(model, prompt, 1, lambda lg, g, a: lg.index_add(
        0, torch.tensor([plain[0]]), torch.tensor([-100.0])))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.integers(0, 511), st.floats(-100, 100, allow_nan=False), min_size=1, max_size=6))
def test_generated_logit_bias_moves_greedy_as_the_sum(client, server, hf, bias):
    model, tok = hf
    prompt = tok(PROMPT)["input_ids"]
    eos = {tok.eos_token_id}

    def shape(lg, g, a):
        for t, b in bias.items():
            lg[t] += b
        return lg

    want = reference_greedy(model, prompt, 4, shape, eos)
    assert gen_ids(client, server, max_tokens=4, logit_bias={str(k): v for k, v in bias.items()}) == want


@pytest.mark.parametrize("kw", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"presence_penalty": -1.5},
                                {"frequency_penalty": 0.7, "presence_penalty": 0.4}])
def test_presence_and_frequency_penalties_follow_openais_formula(client, server, hf, kw):
    """logit[t] -= frequency * count(t in generated) + presence * (count > 0)."""
    model, tok = hf
    prompt = tok(PROMPT)["input_ids"]

    def shape(lg, g, a):
        for t in set(g):
            lg[t] -= kw.get("frequency_penalty", 0) * g.count(t) + kw.get("presence_penalty", 0)
        return lg

    want = reference_greedy(model, prompt, 24, shape, {tok.eos_token_id})
    got = gen_ids(client, server, max_tokens=24, **kw)
    assert got == want and got != gen_ids(client, server, max_tokens=24)


def test_repetition_penalty_follows_transformers_rule_over_prompt_and_output(client, server, hf):
    """vLLM / transformers: a seen token's logit is divided by the penalty (multiplied if negative)."""
    model, tok = hf
    prompt = tok(PROMPT)["input_ids"]

    def shape(lg, g, a):
        for t in set(a):
            lg[t] = lg[t] * 1.8 if lg[t] < 0 else lg[t] / 1.8
        return lg

    want = reference_greedy(model, prompt, 24, shape, {tok.eos_token_id})
    got = gen_ids(client, server, max_tokens=24, repetition_penalty=1.8)
    assert got == want and got != gen_ids(client, server, max_tokens=24)


def test_top_k_1_samples_the_greedy_token_whatever_the_seed(client, server):
    greedy = gen_ids(client, server, max_tokens=8)
    sampled = [gen_ids(client, server, max_tokens=8, temperature=1.0, seed=s) for s in range(4)]
    assert any(s != greedy for s in sampled)  # the random model's distribution is broad
    assert all(gen_ids(client, server, max_tokens=8, temperature=1.0, seed=s, top_k=1) == greedy for s in range(4))


def test_min_tokens_delays_eos_and_ignore_eos_runs_to_max_tokens(client, server, hf):
    _, tok = hf
    eos = {str(tok.eos_token_id): 100}
    assert complete(client, server, PROMPT, logit_bias=eos).usage.completion_tokens == 1
    r = complete(client, server, PROMPT, logit_bias=eos, min_tokens=5, return_token_ids=True)
    ids = r.choices[0].model_extra["token_ids"]
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 6
    assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1] and len(ids) == 6
    r = complete(client, server, PROMPT, logit_bias=eos, ignore_eos=True, max_tokens=7)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "héllo 日本"}],
                                          max_tokens=5, temperature=0, logit_bias=eos,
                                          extra_body={"min_tokens": 3})
    assert chat.usage.completion_tokens == 4 and chat.choices[0].finish_reason == "stop"


# ---- refused parameters --------------------------------------------------------------------------

REFUSED = [("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
           ("tool_choice", "required"), ("best_of", 3), ("min_p", 0.1), ("guided_json", {"type": "object"}),
           ("use_beam_search", True), ("stop_token_ids", [5]), ("typical_p", 0.5), ("modalities", ["audio"])]


@pytest.mark.parametrize("field,value", REFUSED, ids=[f for f, _ in REFUSED])
@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_parameter_that_cannot_be_honoured_is_400_naming_it(http, server, route, field, value):
    body = {"model": server.model, "max_tokens": 2, field: value}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if route == "chat" else {"prompt": "hi"}
    r = http.post(f"/v1/{'chat/' if route == 'chat' else ''}completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_values_that_change_nothing_are_accepted(client, server):
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, response_format={"type": "text"}, user="u1",
                                       presence_penalty=0, frequency_penalty=0,
                                       extra_body={"tools": [], "best_of": 1, "min_p": 0, "skip_special_tokens": True})
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("kw,param", [({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"3": 101}}, "logit_bias"),
                                      ({"logit_bias": {"999999": 1}}, "logit_bias"), ({"presence_penalty": 2.5}, "presence_penalty"),
                                      ({"frequency_penalty": -3}, "frequency_penalty"), ({"top_k": -2}, "top_k"),
                                      ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 50}, "min_tokens")])
def test_bad_sampling_values_are_400_naming_the_field(http, server, kw, param):
    r = http.post("/v1/completions", json={"model": server.model, "prompt": "hi", "max_tokens": 4} | kw)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ---- vLLM's /tokenize and /detokenize --------------------------------------------------------------

@pytest.mark.parametrize("text", NON_ASCII)
def test_tokenize_and_detokenize_round_trip(http, server, hf, text):
    _, tok = hf
    r = http.post("/tokenize", json={"model": server.model, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == tok(text)["input_ids"] and body["count"] == len(body["tokens"])
    assert body["max_model_len"] > 0
    strs = http.post("/tokenize", json={"prompt": text, "return_token_strs": True,
                                        "add_special_tokens": False}).json()
    assert strs["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    assert len(strs["token_strs"]) == strs["count"]
    back = http.post("/detokenize", json={"model": server.model, "tokens": strs["tokens"]}).json()
    assert back["prompt"] == text


def test_tokenize_chat_messages_matches_the_chat_routes_prompt(client, http, server):
    msgs = [{"role": "user", "content": "Ça va? 日本"}]
    r = http.post("/tokenize", json={"model": server.model, "messages": msgs}).json()
    usage = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=1).usage
    assert r["count"] == usage.prompt_tokens


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, "model"), ("/detokenize", {"tokens": [-1]}, "tokens"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens"), ("/detokenize", {"tokens": "abc"}, "tokens")])
def test_bad_tokenize_requests_are_4xx_naming_the_field(http, path, body, param):
    r = http.post(path, json=body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param


def test_tokenize_needs_the_key(server):
    r = httpx.post(server.base_url.removesuffix("/v1") + "/tokenize", json={"prompt": "a"})
    assert r.status_code == 401 and json.loads(r.text)["error"]["code"] == "invalid_api_key"
