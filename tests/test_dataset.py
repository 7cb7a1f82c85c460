"""The KD dataset: every record format, response-only labels, truncation, top-k alignment, errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_here, write_jsonl
from kdforge.data import KDDataset
from kdforge.data.dataset import IGNORE, collate
from kdforge.errors import DataError

FORMATS = [
    {"prompt": "What is 2 plus 3?", "teacher_text": "2 plus 3 is 5."},
    {"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."},
    {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                  {"role": "assistant", "content": "2 plus 3 is 5."}]},
    {"instruction": "What is 2 plus 3?", "input": "", "output": "2 plus 3 is 5."},
]


def test_every_chat_format_gives_the_same_example(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "f.jsonl", FORMATS)
    ds = KDDataset(path, tokenizer_dir, 128)
    items = [ds[i] for i in range(len(ds))]
    for it in items[1:]:
        assert torch.equal(it["input_ids"], items[0]["input_ids"])
        assert torch.equal(it["labels"], items[0]["labels"])
    tok = ds.tokenizer
    x = items[0]
    labelled = x["labels"][x["labels"] != IGNORE]
    # labels are exactly the response tokens and the closing EOS
    assert tok.decode(labelled) == "2 plus 3 is 5." + tok.eos_token
    prompt_part = x["input_ids"][x["labels"] == IGNORE]
    assert "What is 2 plus 3?" in tok.decode(prompt_part) and "<|im_start|>assistant" in tok.decode(prompt_part)


def test_text_records_train_on_every_token(tmp_path, tokenizer_dir):
    ds = KDDataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha bravo charlie"}]), tokenizer_dir, 64)
    x = ds[0]
    assert torch.equal(x["labels"], x["input_ids"])


def test_truncation_keeps_the_response(tmp_path, tokenizer_dir):
    long_prompt = " ".join(["What is 12 plus 34?"] * 40)
    ds = KDDataset(write_jsonl(tmp_path / "l.jsonl", [{"prompt": long_prompt, "teacher_text": "12 plus 34 is 46."}]),
                   tokenizer_dir, 32)
    x = ds[0]
    assert len(x["input_ids"]) == 32
    tok = ds.tokenizer
    assert tok.decode(x["labels"][x["labels"] != IGNORE]) == "12 plus 34 is 46." + tok.eos_token
    assert ds.truncated == 1


@pytest.mark.parametrize("line,reason", [
    ("{not json", "invalid JSON"),
    ('{"prompt": "hi"}', "unknown record format"),
    ('{"prompt": "hi", "teacher_text": "   "}', "response is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "assistant"),
    ('[1, 2]', "expected a JSON object"),
])
def test_unusable_line_names_file_and_line(tmp_path, tokenizer_dir, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FORMATS[0]) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        KDDataset(path, tokenizer_dir, 64)
    assert f"{path}:2:" in str(e.value) and reason in str(e.value)
    # the daemon's lenient mode keeps the good line and reports the bad one
    ds = KDDataset(path, tokenizer_dir, 64, strict=False)
    assert len(ds) == 1 and len(ds.problems) == 1 and ds.problems[0].line == 2


def test_train_cli_reports_bad_line_with_exit_2(tmp_path, tokenizer_dir):
    from train_helpers import train_config

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(FORMATS[0]) + "\n" + '{"prompt": 1, "teacher_text": "x"}\n')
    r = cli_here("train", "--config", train_config(tmp_path, tokenizer_dir, data))
    assert r.returncode == 2
    assert f"{data}:2:" in r.stderr and "needs 'prompt' (string)" in r.stderr


def _topk_record(tokenizer, text: str, k: int = 3) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = []
    for n, i in enumerate(ids):
        alts = [i] + [j for j in range(5, 5 + k) if j != i][: k - 1]
        rows.append({"token": tokenizer.decode([i]), "logprob": -0.1,
                     "top": [{"token": tokenizer.decode([j]), "logprob": -0.1 - m} for m, j in enumerate(alts)]})
    return {"prompt": "Sort these words: echo alpha", "teacher_text": text, "teacher_logprobs": rows}


def test_topk_logprobs_align_to_response_tokens(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rec = _topk_record(tok, "alpha echo")
    ds = KDDataset(write_jsonl(tmp_path / "k.jsonl", [rec]), tokenizer_dir, 64, with_topk=True)
    x = ds[0]
    resp = (x["labels"] != IGNORE).nonzero().flatten()
    # every response token (but the EOS) has the teacher's row, whose first id is the token itself
    for pos in resp[:-1]:
        assert x["topk_ids"][pos, 0] == x["input_ids"][pos]
        assert x["topk_logprobs"][pos, 0] == pytest.approx(-0.1, abs=0.1 * 2**-11)  # fp16 storage: |lp| * 2^-11
    assert (x["topk_ids"][resp[-1]] == -1).all()  # EOS: no teacher row
    assert (x["topk_ids"][x["labels"] == IGNORE] == -1).all()
    batch = collate([x, x], tok.pad_token_id)
    assert batch["topk_ids"].shape[:2] == batch["input_ids"].shape


def test_topk_from_another_tokenizer_is_a_clear_error_with_cross_tokenizer_off(tmp_path, tokenizer_dir):
    rec = {"prompt": "hi", "teacher_text": "alpha echo",
           "teacher_logprobs": [{"token": "alp", "logprob": -0.1, "top": []},
                                {"token": "ha echo", "logprob": -0.2, "top": []}]}
    with pytest.raises(DataError, match="same tokenizer"):
        KDDataset(write_jsonl(tmp_path / "k.jsonl", [rec]), tokenizer_dir, 64, with_topk=True,
                  settings={"alignment": {"cross_tokenizer": "off"}})
    # auto (the default): carried onto the student's tokens by bytes (tests/test_cross_tokenizer.py)
    ds = KDDataset(write_jsonl(tmp_path / "k2.jsonl", [rec]), tokenizer_dir, 64, with_topk=True)
    assert ds.carried.records == 1 and not ds.misaligned


# ---------------------------------------------------------------- hostile teacher_logprobs, CE-only rows


@pytest.mark.parametrize("lp,reason", [
    ([1, 2], "'teacher_logprobs[0]' must be an object"),
    ([{"logprob": -0.1}], "'teacher_logprobs[0]' needs 'token'"),
    ([{"token": "alpha"}], "'teacher_logprobs[0]' needs 'logprob'"),
    ([{"token": "alpha", "logprob": "low"}], "'teacher_logprobs[0].logprob' must be a finite number"),
    ([{"token": "alpha", "logprob": float("nan")}], "'teacher_logprobs[0].logprob' must be a finite number"),
    ([{"token": "alpha", "logprob": float("inf")}], "'teacher_logprobs[0].logprob' must be a finite number"),
    ([{"token": "alpha", "logprob": 0.5}], "'teacher_logprobs[0].logprob' must be <= 0"),
    ([{"token": "alpha", "logprob": -0.1, "top": [3]}], "'teacher_logprobs[0].top[0]' must be an object"),
    ([{"token": "alpha", "logprob": -0.1, "top": {"a": 1}}], "'teacher_logprobs[0].top' must be a list"),
    ([{"token": "alpha", "logprob": -0.1, "top": [{"token": "a", "logprob": float("-inf")}]}],
     "'teacher_logprobs[0].top[0].logprob' must be a finite number"),
    ([{"token": "alpha", "logprob": -0.1, "bytes": [300]}], "'teacher_logprobs[0].bytes' must be a list of"),
])
def test_malformed_teacher_logprobs_are_data_errors(tmp_path, tokenizer_dir, lp, reason):
    """Never AttributeError/TypeError (they crash-loop the daemon): a DataError naming file:line."""
    from transformers import AutoTokenizer

    good = _topk_record(AutoTokenizer.from_pretrained(str(tokenizer_dir)), "alpha echo")
    path = tmp_path / "bad.jsonl"
    line = json.dumps({"prompt": "hi", "teacher_text": "alpha", "teacher_logprobs": lp})
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        KDDataset(path, tokenizer_dir, 64, with_topk=True)
    assert f"{path}:2:" in str(e.value) and reason in str(e.value)
    ds = KDDataset(path, tokenizer_dir, 64, with_topk=True, strict=False)  # the daemon's lenient mode
    assert len(ds) == 1 and ds.problems[0].line == 2


def test_text_lines_with_sparse_kd_train_ce_only_and_are_counted(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = [_topk_record(tok, "alpha echo"), {"text": "bravo charlie"}, FORMATS[1]]
    ds = KDDataset(write_jsonl(tmp_path / "m.jsonl", rows), tokenizer_dir, 64, with_topk=True)
    assert ds.ce_only == 2  # the text line and the prompt/completion line: no teacher rows
    for i in (1, 2):
        x = ds[i]
        assert (x["topk_ids"] == -1).all() and x["topk_ids"].shape[0] == x["input_ids"].shape[0]
    assert (ds[0]["topk_ids"] >= 0).any()
    collate([ds[0], ds[1], ds[2]], tok.pad_token_id)


def test_sparse_kd_without_any_teacher_rows_is_an_error(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "bravo charlie"}, FORMATS[1]])
    with pytest.raises(DataError, match="no teacher_logprobs"):
        KDDataset(path, tokenizer_dir, 64, with_topk=True)
