"""`SequenceOutput` on a real byte-level tokenizer (the demo teacher's, where é and 日 span several
tokens): the released deltas concatenate to the decoded text, never split a character, and stop
strings cut the text and its tokens where they start."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import REPO
from kdforge.serve.output import REPLACEMENT, SequenceOutput
from kdforge.serve.sampling import SamplingParams
from kdforge.serve.vocab import Vocab

TEXT = "héllo wörld 日本 stop here and more"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(REPO / "src" / "kdforge" / "demo" / "assets" / "teacher"))


def run(tok, stop=(), max_tokens=100):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    out = SequenceOutput(SamplingParams(max_tokens=max_tokens, stop=tuple(stop)), 3, frozenset({tok.eos_token_id}),
                         Vocab(tok).decode)
    deltas = []
    for t in ids + [tok.eos_token_id]:
        d = out.add(t, None)
        if d is not None:
            deltas.append(d)
        if out.finish_reason:
            break
    return ids, deltas


def test_deltas_spell_the_decoded_text_and_never_split_a_character(tok):
    ids, deltas = run(tok)
    assert "".join(d.text for d in deltas) == TEXT
    assert [t for d in deltas for t in d.token_ids] == ids
    assert all(REPLACEMENT not in d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == len(ids) + 1


def test_a_stop_string_cuts_text_and_tokens_where_it_starts(tok):
    ids, deltas = run(tok, stop=["stop"])
    text = "".join(d.text for d in deltas)
    assert text == TEXT[:TEXT.index("stop")]
    kept = [t for d in deltas for t in d.token_ids]
    # the tokens that start before the stop string stay (here " s" is one token: its " " is text)
    assert tok.decode(kept).startswith(text) and len(tok.decode(kept[:-1])) < len(text)
    assert deltas[-1].finish_reason == "stop"


def test_max_tokens_ends_with_length(tok):
    ids, deltas = run(tok, max_tokens=5)
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5
    assert "".join(d.text for d in deltas) == tok.decode(ids[:5])


def test_eos_is_named_on_the_last_delta_with_its_logprob_and_no_text(tok):
    """The eos that ends generation was sampled: the last delta names it (id and logprob) so the
    legacy format can list it, as OpenAI and vLLM do; its text never joins the completion."""
    from kdforge.serve.sampling import TokenLogprob

    ids = tok("日本 ok", add_special_tokens=False)["input_ids"]
    out = SequenceOutput(SamplingParams(max_tokens=100), 3, frozenset({tok.eos_token_id}), Vocab(tok).decode)
    lps = [TokenLogprob(t, -0.5) for t in ids] + [TokenLogprob(tok.eos_token_id, -1.25)]
    deltas = [d for t, lp in zip(ids + [tok.eos_token_id], lps) if (d := out.add(t, lp)) is not None]
    assert "".join(d.text for d in deltas) == "日本 ok" and deltas[-1].finish_reason == "stop"
    assert deltas[-1].eos == (tok.eos_token_id, lps[-1]) and all(d.eos is None for d in deltas[:-1])
    assert [t for d in deltas for t in d.token_ids] == ids and deltas[-1].completion_tokens == len(ids) + 1


def test_min_tokens_lets_no_stop_string_end_generation_early(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    out = SequenceOutput(SamplingParams(max_tokens=100, stop=("héllo",), min_tokens=len(ids)), 3,
                         frozenset({tok.eos_token_id}), Vocab(tok).decode)
    text = "".join(d.text for t in ids if (d := out.add(t, None)) is not None)
    assert out.finish_reason is None and text == TEXT
