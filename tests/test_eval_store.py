"""`kdforge eval` reads its eval file through the token store (SPEC "KD data at scale"): the first
eval builds it beside the data, a second eval of the same bytes maps it and tokenises nothing, and
the numbers are byte-identical to eval's in-memory encoding. Real tiny model and tokenizer; records
carry stored top-k rows, non-ASCII prompts, and prompt-with-answer lines that are not KD records."""

from __future__ import annotations

import json
from dataclasses import replace

from conftest import synthetic_records, write_jsonl
from test_eval import NON_ASCII, student, topk_rows  # noqa: F401 (fixture)

from kdforge.data import store
from kdforge.data.dataset import KDDataset
from kdforge.eval import evaluate_loaded, load_eval_data
from kdforge.eval.data import read_eval_file


def _eval_file(model, tok, tmp_path):
    rows = []
    for i, r in enumerate(synthetic_records(6) + [{"prompt": p, "teacher_text": "réponse 日本 😀"} for p in NON_ASCII]):
        rows.append({**r, "teacher_logprobs": topk_rows(model, tok, r["prompt"], r["teacher_text"])} if i % 2 else r)
        if i % 3 == 0:
            rows.append({"prompt": f"Combien font {i} + 1 ? 東京", "answer": str(i + 1)})  # asked, not a KD record
    return write_jsonl(tmp_path / "eval — données.jsonl", rows)


def _numbers(res) -> str:
    return json.dumps(res.to_json(with_answers=True) | {"seconds": 0}, sort_keys=True)


def test_second_eval_maps_the_store_and_numbers_are_unchanged(student, tmp_path):  # noqa: F811
    model, tok = student
    path = _eval_file(model, tok, tmp_path)
    before = store.BUILD_COUNT["n"]
    first = load_eval_data(path, tok)
    assert store.BUILD_COUNT["n"] == before + 1, "the first eval builds the eval file's store"
    assert first.scored.store_info is not None and first.scored.store_info.path.parent == tmp_path / ".kdforge-store"
    second = load_eval_data(path, tok)
    assert store.BUILD_COUNT["n"] == before + 1, "a second eval of the same bytes must not tokenise again"
    assert not second.scored.store_info.built
    assert all(r.record.teacher_logprobs is None for r in second.records if r.record)  # the store holds them
    kd = [r.record for r in read_eval_file(path) if r.record is not None]  # as eval read them before
    in_memory = replace(second, scored=KDDataset(None, tokenizer=tok, max_seq_length=4096, with_topk=True, records=kd))
    got = evaluate_loaded(model, tok, second, max_new_tokens=4)
    want = evaluate_loaded(model, tok, in_memory, max_new_tokens=4)
    assert got.kl_teacher == "topk" and got.n_answer == 3 and got.n_scored == len(kd)
    assert _numbers(got) == _numbers(want)


def test_max_records_cut_reads_in_memory_and_counts_right(student, tmp_path):  # noqa: F811
    model, tok = student
    path = _eval_file(model, tok, tmp_path)
    before = store.BUILD_COUNT["n"]
    data = load_eval_data(path, tok, max_records=4)
    assert store.BUILD_COUNT["n"] == before and len(data) == 4
    assert [data.example(i).prompt_ids for i in range(4)] == [load_eval_data(path, tok).example(i).prompt_ids
                                                              for i in range(4)]
