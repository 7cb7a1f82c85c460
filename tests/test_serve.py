"""`kdforge serve` against the official `openai` client: a real server subprocess on 127.0.0.1
serving the tiny random Llama (gibberish, but deterministic), plus the engine and loader in-process."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from conftest import cli_env, run_cli

from kdforge.serve import launch

KEY = "sk-test-serve-key"
CHAT = [{"role": "user", "content": "What is 12 plus 30?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    handle = launch(tiny_model_dir, env=cli_env(KDFORGE_TEST_KEY=KEY), api_key_env="KDFORGE_TEST_KEY")
    yield handle
    assert handle.stop() == 0 and not handle.alive(), "SIGTERM must shut the server down cleanly"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model_dir))


def chat_prompt_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# ---- the OpenAI surface ---------------------------------------------------------------------

def test_models_lists_the_folder_name(client, server, tiny_model_dir):
    ids = [m.id for m in client.models.list().data]
    assert ids == [tiny_model_dir.name] == [server.model]


def test_chat_text_usage_and_logprobs_shape(client, server, hf):
    _, tok = hf
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=3)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    content = c.logprobs.content
    assert r.usage.prompt_tokens == len(chat_prompt_ids(tok, CHAT))
    # every sampled token is counted; an eos ending the answer is sampled but not returned
    assert r.usage.completion_tokens == len(content) + (c.finish_reason == "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "".join(t.token for t in content) == c.message.content
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace") == c.message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [a.logprob for a in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert t.token == t.top_logprobs[0].token and t.logprob == pytest.approx(tops[0])  # greedy


def test_completions_legacy_logprobs_and_usage(client, server, hf):
    _, tok = hf
    prompt = "Sort these words: echo alpha"
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, top in zip(lp.tokens, lp.top_logprobs):
        assert token in top and 2 <= len(top) <= 3  # the sampled token is always listed
    assert r.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    assert r.usage.completion_tokens == len(lp.tokens) + (c.finish_reason == "stop")


def test_stream_assembles_to_the_non_streamed_text(client, server):
    kw = dict(model=server.model, messages=CHAT, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and len(text) > 0
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    kw = dict(model=server.model, prompt="What is 5 plus", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    text = "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True))
    assert text == whole.choices[0].text


def test_seed_makes_sampling_reproducible(client, server):
    kw = dict(model=server.model, messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.9)
    a, b = (client.chat.completions.create(**kw, seed=11).choices[0].message.content for _ in range(2))
    c = client.chat.completions.create(**kw, seed=12).choices[0].message.content
    assert a == b and a != c
    two = client.chat.completions.create(**kw, seed=11, n=2)  # n choices: seeds 11 and 12
    assert [ch.message.content for ch in two.choices] == [a, c] and [ch.index for ch in two.choices] == [0, 1]


def test_stop_string_cuts_the_text_before_it(client, server):
    kw = dict(model=server.model, prompt="What is 7 plus 8?", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    stop = full[6:9]
    r = client.completions.create(**kw, stop=[stop]).choices[0]
    assert r.text == full[: full.index(stop)] and r.finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(**kw, stop=[stop], stream=True))
    assert streamed == r.text


def test_logprobs_are_the_models_own_log_softmax(client, server, hf):
    """Sampled at temperature 1.3, yet the logprobs are the temperature-1 log-softmax."""
    model, tok = hf
    r = client.chat.completions.create(model=server.model, messages=CHAT, max_tokens=12, temperature=1.3, seed=3,
                                       logprobs=True, top_logprobs=5, extra_body={"return_token_ids": True})
    gen = r.choices[0].model_extra["token_ids"]
    prompt = r.model_extra["prompt_token_ids"]
    assert prompt == chat_prompt_ids(tok, CHAT) and len(gen) == len(r.choices[0].logprobs.content) > 0
    with torch.no_grad():
        logits = model(torch.tensor([prompt + gen])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)[len(prompt) - 1: len(prompt) - 1 + len(gen)]
    for k, (tid, entry) in enumerate(zip(gen, r.choices[0].logprobs.content)):
        assert entry.token == tok.decode([tid])
        assert entry.logprob == pytest.approx(ref[k, tid].item(), abs=1e-4)
        top_v, top_i = ref[k].topk(5)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(top_v.tolist(), abs=1e-4)
        assert [a.token for a in entry.top_logprobs] == [tok.decode([i]) for i in top_i.tolist()]


# ---- errors -------------------------------------------------------------------------------------

def test_wrong_or_missing_key_is_401(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=server.model, messages=CHAT, max_tokens=2)
    assert e.value.code == "invalid_api_key"
    r = httpx.get(server.base_url + "/models")  # no Authorization header at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("kw,param", [
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),  # without logprobs: true
    (dict(temperature=2.5), "temperature"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    (dict(max_tokens=10_000), "max_tokens"),  # past the 256-token context
])
def test_bad_request_is_400_naming_the_field(client, server, kw, param):
    args = dict(model=server.model, messages=CHAT, max_tokens=2) | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.param == param and e.value.body["message"]


def test_prompt_filling_the_context_is_400(client, server):
    with pytest.raises(openai.BadRequestError) as e:  # 256 prompt tokens leave no room in a 256 context
        client.completions.create(model=server.model, prompt=[5] * 256, max_tokens=None)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    assert e.value.code == "model_not_found"


def test_bad_model_folder_exits_2_with_the_fix(tmp_path):
    (tmp_path / "run" / "checkpoint-7").mkdir(parents=True)
    p = run_cli("serve", tmp_path / "run", "--port", "0", timeout=60)
    assert p.returncode == 2 and "checkpoint-7" in p.stderr


# ---- batching -------------------------------------------------------------------------------

def test_eight_concurrent_requests_share_the_engines_steps(client, server):
    """Requests sent together run in the same forward passes (continuous batching): some decode
    step during them sampled several rows at once. Read from the engine's own counters, not from
    wall time, which a shared 2-core machine makes meaningless."""
    prompts = [f"What is {i} plus {2 * i}?" for i in range(8)]

    def one(p: str):
        return client.completions.create(model=server.model, prompt=p, max_tokens=48, temperature=0)

    def steps() -> dict[int, int]:
        r = httpx.get(server.base_url.removesuffix("/v1") + "/stats", headers={"Authorization": f"Bearer {KEY}"})
        return {int(k): v for k, v in r.json()["rows_per_step"].items()}

    seq = [one(p) for p in prompts]
    before = steps()
    barrier = threading.Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        conc = list(pool.map(lambda p: (barrier.wait(), one(p))[1], prompts))
    during = {k: v - before.get(k, 0) for k, v in steps().items() if v > before.get(k, 0)}
    assert [r.choices[0].text for r in conc] == [r.choices[0].text for r in seq]
    assert max(during) >= 4, f"decode steps by rows sampled together: {during}"


@pytest.fixture(scope="module")
def engine(hf):
    from kdforge.serve.engine import Engine

    model, tok = hf
    eng = Engine(model, tok, max_batch_size=8)
    yield eng
    eng.close()


PROMPTS = ["hi", "What is 3 plus 4?", "Sort these words: alpha bravo charlie delta echo foxtrot golf", "What is 9"]


def test_padded_batch_gives_the_greedy_tokens_of_model_generate(engine, hf):
    from kdforge.serve.sampling import SamplingParams

    model, tok = hf
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    params = SamplingParams(max_tokens=30, temperature=0)
    batched = engine.generate(ids, params)
    for x, got in zip(ids, batched):
        ref = model.generate(torch.tensor([x]), max_new_tokens=30, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(x):].tolist()
        assert got.token_ids == [t for t in ref if t != tok.eos_token_id]
        assert engine.generate([x], params)[0].token_ids == got.token_ids


def test_requests_joining_a_running_batch_get_their_own_tokens(engine, hf):
    """A long request is mid-generation when shorter ones join (and leave) its batch."""
    from kdforge.serve.sampling import SamplingParams

    _, tok = hf
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    long_p, short_p = SamplingParams(max_tokens=200, temperature=0), SamplingParams(max_tokens=12, temperature=0)
    alone = [engine.generate([ids[0]], long_p)[0]] + [engine.generate([x], short_p)[0] for x in ids[1:]]

    got = {i: [] for i in range(len(ids))}
    started, done = threading.Event(), threading.Semaphore(0)

    def emit(i):
        def f(d):
            got[i].append(d)
            started.set()
            if d.finish_reason:
                done.release()
        return f

    engine.submit([(ids[0], long_p, emit(0))])
    assert started.wait(30)
    engine.submit([(x, short_p, emit(i)) for i, x in enumerate(ids[1:], 1)])
    for _ in ids:
        assert done.acquire(timeout=60)
    for i, ref in enumerate(alone):
        assert [t for d in got[i] for t in d.token_ids] == ref.token_ids


# ---- folders: adapters and LoRA checkpoints ----------------------------------------------------

def test_lora_checkpoint_folder_and_adapter_flag_load_the_merged_model(tiny_model_dir, tmp_path, hf):
    import shutil

    from peft import LoraConfig, get_peft_model

    from kdforge.serve.loader import load_served_model

    model, tok = hf
    ckpt = tmp_path / "checkpoint-5"
    torch.manual_seed(0)
    lora = get_peft_model(type(model).from_pretrained(str(tiny_model_dir)),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(str(ckpt))  # adapter_config.json names tiny_model_dir as its base
    tok.save_pretrained(str(ckpt))
    x = torch.tensor([tok("What is 1 plus 1?")["input_ids"]])
    with torch.no_grad():
        want = lora(x).logits
        assert not torch.allclose(want, model(x).logits, atol=1e-3)  # the adapter matters
        for served in (load_served_model(ckpt), load_served_model(tiny_model_dir, adapter=ckpt)):
            assert torch.allclose(served.model(x).logits, want, atol=1e-4)
    assert load_served_model(ckpt).name == "checkpoint-5"
    shutil.rmtree(ckpt)
