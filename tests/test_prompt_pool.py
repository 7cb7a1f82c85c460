"""On-policy prompt pools (on_policy.prompts) are compact: flat int32 ids + offsets, ~4 bytes a token,
with the same prompts, in the same order, as tokenising each rendered prompt alone; the step's draw
from the pool is the draw a list of lists gives. Real tokenizer, text and JSONL prompt files with
accents, CJK and emoji."""

from __future__ import annotations

import json

import numpy as np

from kdforge.config import OnPolicySection
from kdforge.data.dataset import load_tokenizer, prompt_text
from kdforge.teacher.prompts import read_prompt_file
from kdforge.train import on_policy
from kdforge.train.on_policy import OnPolicy, PromptPool, read_prompt_pool

PROMPTS = ["Trie: é ü ß à", "並べ替えて: 日本 語 東京", "Sort these words: 😀 👍🏽 echo", "What is 2 plus 2?"]


def _files(tmp_path):
    txt = tmp_path / "invites — liste.txt"
    txt.write_text("\n".join(PROMPTS * 3) + "\n\n", encoding="utf-8")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Sois bref."},
                                                      {"role": "user", "content": p}]}, ensure_ascii=False) + "\n"
                             for p in PROMPTS), encoding="utf-8")
    return [str(txt), str(jsonl)]


def _one_by_one(files, tok) -> list[list[int]]:
    out = []
    for f in files:
        for p in read_prompt_file(f):
            msgs = [{"role": r, "content": c} for r, c in p.messages]
            out.append(tok(prompt_text(tok, msgs), add_special_tokens=False)["input_ids"])
    return out


def test_pool_is_flat_int32_and_equals_one_by_one(tokenizer_dir, tmp_path, monkeypatch):
    tok = load_tokenizer(str(tokenizer_dir))
    files = _files(tmp_path)
    want = _one_by_one(files, tok)
    monkeypatch.setattr(on_policy, "_POOL_BATCH", 5)  # several tokenizer batches, one cut mid-file
    pool = read_prompt_pool(files, tok)
    assert isinstance(pool, PromptPool) and pool.ids.dtype == np.int32
    assert len(pool) == len(want) == 16 and [pool[i] for i in range(len(pool))] == want
    assert pool[-1] == want[-1]
    n_tokens = sum(map(len, want))
    assert pool.nbytes() == 4 * n_tokens + 8 * (len(want) + 1)


def test_draws_from_a_compact_pool_equal_a_list_pool(tokenizer_dir, tmp_path):
    tok = load_tokenizer(str(tokenizer_dir))
    files = _files(tmp_path)
    sec = OnPolicySection(fraction=0.5)
    compact = OnPolicy(sec, 3, None, tok, micro_batch_size=3, prompt_pool=read_prompt_pool(files, tok))
    listed = OnPolicy(sec, 3, None, tok, micro_batch_size=3, prompt_pool=_one_by_one(files, tok))
    assert compact.uses_pool and listed.uses_pool
    for step in (0, 1, 7, 1000):
        assert compact.pool_prompts(step, 4) == listed.pool_prompts(step, 4)
    assert not OnPolicy(sec, 3, None, tok, micro_batch_size=3, prompt_pool=PromptPool.of([])).uses_pool
