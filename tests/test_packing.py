"""Packed == padded: the same targets, teacher rows and loss, for every record format.

Packing puts examples back to back; the label at an example's first position would be predicted from
the previous example's last position, so it must never be a target (padded batches never use it: the
causal shift drops position 0). Drawn by hypothesis (derandomized profile from conftest) over mixes
of every record format, non-ASCII text and truncation that cuts prompts away.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from kdforge.data.dataset import IGNORE, KDDataset, collate
from kdforge.data.tokenizer import token_bytes
from kdforge.data.records import parse_record
from kdforge.train.objective import DistillObjective

WORDS = ["alpha", "bravo", "plus", "is", "café", "日本", "🎉", "naïve", "中文", "ß", "7", "?"]


@pytest.fixture(scope="module")
def tok_and_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoTokenizer.from_pretrained(str(tiny_model_dir)), AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir)).eval()


def kd_rows(tok, text: str, seed: int) -> list[dict]:
    """generate-style teacher_logprobs for `text` in `tok`'s own tokens (bytes included)."""
    g = torch.Generator().manual_seed(seed)
    tb = token_bytes(tok)
    rows = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        alts = [i] + torch.randint(0, len(tok), (3,), generator=g).tolist()
        lps = sorted((-torch.rand(len(alts), generator=g) * 4).tolist(), reverse=True)
        rows.append({"token": tok.decode([i]), "logprob": lps[0], "bytes": list(tb[i]),
                     "top": [{"token": tok.decode([j]), "logprob": lp, "bytes": list(tb[j])}
                             for j, lp in zip(alts, lps)]})
    return rows


texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)
FORMATS = ["kd", "prompt_completion", "messages", "alpaca", "text"]


def make_record(tok, fmt: str, prompt: str, response: str, seed: int) -> dict:
    if fmt == "kd":
        return {"prompt": prompt, "teacher_text": response, "teacher_logprobs": kd_rows(tok, response, seed)}
    if fmt == "prompt_completion":
        return {"prompt": prompt, "completion": response}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
    if fmt == "alpaca":
        return {"instruction": prompt, "input": "", "output": response}
    return {"text": response}


def targets(batch: dict) -> tuple[list[int], list[list[int]]]:
    """The target tokens in order and the teacher ids stored for each."""
    lab = batch["labels"][:, 1:]
    sel = lab != IGNORE
    rows = batch["topk_ids"][:, 1:][sel].tolist() if "topk_ids" in batch else []
    return lab[sel].tolist(), [[j for j in r if j >= 0] for r in rows]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recs=st.lists(st.tuples(st.sampled_from(FORMATS), texts, texts), min_size=2, max_size=6),
       max_len=st.sampled_from([8, 16, 64]), kind=st.sampled_from(["ce", "fkl"]))
def test_packed_equals_padded_for_every_record_format(tok_and_model, recs, max_len, kind):
    tok, model = tok_and_model
    rows = [make_record(tok, fmt, p, r, n) for n, (fmt, p, r) in enumerate(recs)]
    with_topk = kind != "ce" and any(fmt == "kd" for fmt, _, _ in recs)
    ds = KDDataset(None, tokenizer=tok, max_seq_length=max_len, with_topk=with_topk,
                   records=[parse_record(r) for r in rows])
    items = [ds[i] for i in range(len(ds))]
    padded = collate(items, tok.pad_token_id)
    packed = collate(items, tok.pad_token_id, packed_len=max_len * len(items))
    assert packed["input_ids"].shape[0] == 1  # every example in one row
    assert targets(packed) == targets(padded)
    obj = DistillObjective(model, kind if with_topk else "ce", chunk_size=None)
    with torch.no_grad():
        (ce_a, kd_a, n_a), (ce_b, kd_b, n_b) = obj(padded), obj(packed)
    assert n_a == n_b
    torch.testing.assert_close(ce_b, ce_a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kd_b, kd_a, rtol=1e-5, atol=1e-4)


def test_four_text_records_pack_to_the_padded_targets(tmp_path, tok_and_model):
    """The reproduction: 4 text records gave 24 targets padded and 27 packed."""
    tok, _ = tok_and_model
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in
                                               ["alpha bravo plus", "is café", "日本 🎉 naïve", "中文 ß 7 ?"]])
    ds = KDDataset(path, tokenizer=tok, max_seq_length=64)
    items = [ds[i] for i in range(4)]
    n_pad = len(targets(collate(items, tok.pad_token_id))[0])
    packed = collate(items, tok.pad_token_id, packed_len=256)
    assert len(targets(packed)[0]) == n_pad == sum(len(x["input_ids"]) - 1 for x in items)
