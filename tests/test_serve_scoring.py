"""Token scoring in `kdforge serve` (SPEC "serve: scoring tokens"), through the official `openai`
client against a real server: `echo` + `logprobs` (+ `max_tokens: 0`), prompts as strings or
token ids, vLLM's `prompt_logprobs`, bytes per token. Every logprob is checked against the tiny
model's own fp32 log-softmax computed here with transformers."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from test_serve import KEY, client, hf, server  # noqa: F401 - module fixtures reused here

# Accents, CJK, emoji: the fixture tokenizer (byte-level BPE trained on ASCII) splits the
# non-ASCII characters into single-byte tokens, so most tokens here are UTF-8 fragments.
TEXTS = ["Café crème brûlée, s'il vous plaît", "日本語のテキストを採点する", "emoji 😀👍🏽 and What is 3 plus 4?"]


def reference(model, ids: list[int]) -> torch.Tensor:
    """(T-1, V) log-softmax that scores tokens 1..T-1 of `ids`, fp32, straight from the model."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def stats(server) -> dict:  # noqa: F811
    r = httpx.get(server.base_url.removesuffix("/v1") + "/stats", headers={"Authorization": f"Bearer {KEY}"})
    return r.json()


def check_scored(lp, ids: list[int], ref: torch.Tensor, k: int, tok) -> None:
    """Legacy logprobs of an echoed prompt against the reference."""
    assert lp.tokens == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(ref[j - 1, ids[j]].item(), abs=1e-4)
        top_v = ref[j - 1].topk(k).values.tolist() if k else []
        alts = lp.top_logprobs[j]
        assert lp.tokens[j] in alts and len(alts) <= k + 1
        # keys are token strings, which collide for byte fragments: compare the values as a set
        allowed = top_v + [lp.token_logprobs[j]]
        assert all(any(v == pytest.approx(a, abs=1e-4) for a in allowed) for v in alts.values())


# ---- echo + logprobs + max_tokens 0 --------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_echo_scores_a_non_ascii_prompt_exactly(client, server, hf, text):  # noqa: F811
    model, tok = hf
    ids = tok(text)["input_ids"]
    r = client.completions.create(model=server.model, prompt=text, echo=True, logprobs=5, max_tokens=0)
    c = r.choices[0]
    lp = c.logprobs
    assert c.text == text and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    check_scored(lp, ids, reference(model, ids), 5, tok)
    # the bytes are exact where the token strings cannot be: they concatenate to the prompt
    tb = lp.model_extra["tokens_bytes"]
    assert b"".join(bytes(b) for b in tb) == text.encode("utf-8")
    if not text.isascii():
        assert any("\ufffd" in t for t in lp.tokens), "expected byte-fragment tokens"
    # text_offset: where each token's first character starts in the echoed text
    for off, b_before in zip(lp.text_offset, [b"".join(bytes(b) for b in tb[:j]) for j in range(len(tb))]):
        assert off == len(b_before.decode("utf-8", "ignore"))


def test_prompt_forms_and_token_ids_score_the_same(client, server, hf):  # noqa: F811
    """A string, a list of strings, a list of ids and a list of id lists: each scores exactly its
    own tokens, in the order given (n=1: one choice per prompt)."""
    model, tok = hf
    ids = [tok(t)["input_ids"] for t in TEXTS]
    kw = dict(model=server.model, echo=True, logprobs=3, max_tokens=0)
    by_strings = client.completions.create(prompt=TEXTS, **kw).choices
    by_ids = client.completions.create(prompt=ids, **kw).choices
    one_id_list = client.completions.create(prompt=ids[1], **kw).choices
    assert len(by_strings) == len(by_ids) == 3 and len(one_id_list) == 1
    for i, x in enumerate(ids):
        ref = reference(model, x)
        for c in (by_strings[i], by_ids[i]):
            assert c.index == i and c.text == TEXTS[i]
            check_scored(c.logprobs, x, ref, 3, tok)
    assert one_id_list[0].logprobs.token_logprobs == by_ids[1].logprobs.token_logprobs


def test_a_prompt_filling_the_whole_context_can_be_scored(client, server):  # noqa: F811
    r = client.completions.create(model=server.model, prompt=[5] * 256, echo=True, logprobs=0, max_tokens=0)
    assert len(r.choices[0].logprobs.tokens) == 256
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt=[5] * 257, echo=True, logprobs=0, max_tokens=0)
    assert e.value.code == "context_length_exceeded"


def test_echo_with_generation_puts_the_prompt_first(client, server, hf):  # noqa: F811
    model, tok = hf
    text = TEXTS[0]
    ids = tok(text)["input_ids"]
    r = client.completions.create(model=server.model, prompt=text, echo=True, logprobs=2, max_tokens=6,
                                  temperature=0, extra_body={"return_token_ids": True})
    c = r.choices[0]
    gen = c.model_extra["token_ids"]
    lp = c.logprobs
    assert c.text.startswith(text) and len(lp.tokens) == len(ids) + len(gen)
    ref = reference(model, ids + gen)
    for j, t in enumerate(ids + gen):
        if j:
            assert lp.token_logprobs[j] == pytest.approx(ref[j - 1, t].item(), abs=1e-4)
    assert lp.text_offset[len(ids)] == len(text)  # the completion starts right after the echo
    assert lp.text_offset == sorted(lp.text_offset)
    plain = client.completions.create(model=server.model, prompt=text, max_tokens=6, temperature=0)
    assert c.text == text + plain.choices[0].text


def test_streamed_echo_assembles_to_the_non_streamed_answer(client, server):  # noqa: F811
    kw = dict(model=server.model, prompt=TEXTS[2], echo=True, logprobs=1, max_tokens=8, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = [ch.choices[0] for ch in client.completions.create(**kw, stream=True)]
    assert "".join(ch.text for ch in chunks) == whole.text
    assert [t for ch in chunks for t in ch.logprobs.token_logprobs] == whole.logprobs.token_logprobs
    assert [o for ch in chunks for o in ch.logprobs.text_offset] == whole.logprobs.text_offset


def test_echo_without_logprobs_and_with_n_choices(client, server):  # noqa: F811
    kw = dict(model=server.model, prompt=TEXTS[0], max_tokens=4, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    r = client.completions.create(**kw, echo=True, n=2)
    assert [c.text for c in r.choices] == [TEXTS[0] + plain] * 2 and all(c.logprobs is None for c in r.choices)


# ---- vLLM's prompt_logprobs ----------------------------------------------------------------------

def test_vllm_prompt_logprobs_give_ids_ranks_and_the_top_k(client, server, hf):  # noqa: F811
    model, tok = hf
    text = TEXTS[1]
    ids = tok(text)["input_ids"]
    r = client.completions.create(model=server.model, prompt=text, max_tokens=0, extra_body={"prompt_logprobs": 4})
    c = r.choices[0]
    assert c.text == "" and c.logprobs is None  # no echo asked: only the vLLM field
    plp = c.model_extra["prompt_logprobs"]
    ref = reference(model, ids)
    assert len(plp) == len(ids) and plp[0] is None
    for j in range(1, len(ids)):
        row = ref[j - 1]
        own = plp[j][str(ids[j])]
        assert own["logprob"] == pytest.approx(row[ids[j]].item(), abs=1e-4)
        assert own["rank"] == 1 + int((row > row[ids[j]]).sum())
        assert own["decoded_token"] == tok.decode([ids[j]])
        top_v, top_i = row.topk(4)
        for rank, (i, v) in enumerate(zip(top_i.tolist(), top_v.tolist()), 1):
            assert plp[j][str(i)]["logprob"] == pytest.approx(v, abs=1e-4)
            assert plp[j][str(i)]["rank"] in (rank, own["rank"])
        assert len(plp[j]) <= 5


def test_echo_and_prompt_logprobs_together_keep_their_own_k(client, server):  # noqa: F811
    """One pass scores the prompt for the larger K; each format shows only its own."""
    r = client.completions.create(model=server.model, prompt=TEXTS[2], echo=True, logprobs=1, max_tokens=0,
                                  extra_body={"prompt_logprobs": 6})
    c = r.choices[0]
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs[1:])
    plp = c.model_extra["prompt_logprobs"]
    assert all(6 <= len(d) <= 7 for d in plp[1:])
    for j, d in enumerate(plp[1:], 1):  # the same numbers in both formats
        own = next(v for v in d.values() if v["decoded_token"] == c.logprobs.tokens[j])
        assert own["logprob"] == pytest.approx(c.logprobs.token_logprobs[j], abs=1e-6)


# ---- batching --------------------------------------------------------------------------------------

def test_scoring_goes_through_the_engine_in_one_batch(client, server, hf):  # noqa: F811
    """The prompts of one scoring request are prefilled together: one forward pass for all."""
    _, tok = hf
    before = stats(server)
    client.completions.create(model=server.model, prompt=TEXTS + ["hi"], echo=True, logprobs=1, max_tokens=0)
    after = stats(server)
    assert after["prefills"] - before["prefills"] == 1
    assert after["prompt_tokens_scored"] - before["prompt_tokens_scored"] == sum(
        len(tok(t)["input_ids"]) for t in TEXTS + ["hi"])


# ---- chat: bytes per token --------------------------------------------------------------------------

def test_chat_logprobs_carry_bytes_for_tokens_and_alternatives(client, server, hf):  # noqa: F811
    """Chat's `bytes` (OpenAI's field) for sampled tokens and alternatives. A sampled token's bytes
    equal what echo reports for the same id, and echo's bytes are checked against the prompt's
    own UTF-8 above, so fragments are exact here too."""
    r = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": TEXTS[1]}],
                                       max_tokens=24, temperature=1.0, seed=5, logprobs=True, top_logprobs=4,
                                       extra_body={"return_token_ids": True})
    c = r.choices[0]
    content = c.logprobs.content
    gen = c.model_extra["token_ids"]
    echoed = client.completions.create(model=server.model, prompt=gen, echo=True, max_tokens=0, logprobs=0)
    assert [t.bytes for t in content] == echoed.choices[0].logprobs.model_extra["tokens_bytes"]
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace") == c.message.content
    for t in content:
        assert len(t.top_logprobs) == 4
        for a in t.top_logprobs:
            assert a.bytes and all(0 <= b < 256 for b in a.bytes)
            assert bytes(a.bytes).decode("utf-8", "replace") == a.token


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,param", [
    (dict(echo=True, logprobs=21, max_tokens=0), "logprobs"),
    (dict(max_tokens=0, extra_body={"prompt_logprobs": 21}), "prompt_logprobs"),
    (dict(max_tokens=0), "max_tokens"),  # nothing to generate and nothing to score
    (dict(max_tokens=0, logprobs=2), "max_tokens"),  # logprobs without echo: still nothing
])
def test_bad_scoring_request_is_400_naming_the_field(client, server, kw, param):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model, prompt="hi", **kw)
    assert e.value.param == param and e.value.body["message"]


def test_chat_refuses_prompt_logprobs_rather_than_ignoring_it(client, server):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       extra_body={"prompt_logprobs": 2})
    assert e.value.param == "prompt_logprobs" and "/v1/completions" in e.value.body["message"]
