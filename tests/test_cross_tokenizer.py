"""Sparse top-k KD from a teacher with another tokenizer (issue 23 §1, SPEC "Teachers users really
have"): generate-format records whose `teacher_logprobs` are a coarse tokenizer's tokens (accents,
CJK, emoji), a student on a fine tokenizer. With `loss.cross_tokenizer: auto` (the default) the rows
are carried onto the student's tokens by bytes (data/align.py), the run trains and logs the share of
1:1 positions; `off` keeps the old refusal (exit 2 naming the file and line). Before: exit 2
("logit KD needs the teacher's tokenizer") whatever the setting."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import yaml

from conftest import cli_here, write_jsonl
from test_align import WORDS, _teacher_rows, toks  # noqa: F401  (toks: the two tokenizers, a fixture)

from kdforge.data.align import StudentPieces, align_rows, teacher_tokens
from kdforge.data.tokenizer import special_ids, token_bytes
from kdforge.errors import DataError


def _entry(b: bytes, lp: float) -> dict:
    return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}


def _records(tok, n: int = 24, seed: int = 0) -> list[dict]:
    """generate's records: prompt, answer and the teacher's (coarse tokenizer's) top-k rows."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        rows = [{**_entry(t.bytes, t.logprob), "top": [_entry(b, lp) for b, lp in t.top]}
                for t in _teacher_rows(tok, answer, rng)]
        out.append({"prompt": f"Say {i} — naïve 東京", "teacher_text": answer, "teacher_logprobs": rows})
    return out


@pytest.fixture(scope="module")
def tok_dirs(toks, tmp_path_factory):  # noqa: F811
    fine, coarse = toks
    d = tmp_path_factory.mktemp("toks")
    fine.save_pretrained(str(d / "fine"))
    coarse.save_pretrained(str(d / "coarse"))
    return d / "fine", d / "coarse"


def _dataset(path, tok, cross: str, tmp_path):
    from kdforge.data.dataset import KDDataset

    return KDDataset(path, tokenizer=tok, with_topk=True, settings={"alignment": {"cross_tokenizer": cross}},
                     store_dir=tmp_path / "store")


def test_the_dataset_carries_rows_onto_the_students_tokens(toks, tmp_path):  # noqa: F811
    fine, coarse = toks
    recs = _records(coarse)
    path = write_jsonl(tmp_path / "kd.jsonl", recs)
    ds = _dataset(path, fine, "auto", tmp_path)
    assert ds.misaligned == [] and ds.carried.records == len(recs)
    assert 0 < ds.carried.one_to_one < ds.carried.positions
    assert "aligned 1:1" in ds.carried.note()
    pieces = StudentPieces(token_bytes(fine), special_ids(fine))
    for i, r in enumerate(recs):
        ex = ds.example(i)
        want = align_rows(r["teacher_text"].encode(), ex.response_ids[:-1], pieces, teacher_tokens(r["teacher_logprobs"]))
        assert ex.topk_ids[:-1] == want.ids and ex.topk_ids[-1] == []  # the EOS: no teacher row
        for got, exp in zip(ex.topk_logprobs, want.logprobs):
            assert got == pytest.approx(exp, abs=2e-3)  # stored as fp16
        item = ds.item(i)  # rows sit on the response's positions of the whole sequence
        n_p = len(ex.prompt_ids)
        for t, row in enumerate(want.ids):
            assert item["topk_ids"][n_p + t, :len(row)].tolist() == row


def test_off_refuses_another_tokenizer_as_before(toks, tmp_path):  # noqa: F811
    fine, coarse = toks
    path = write_jsonl(tmp_path / "kd.jsonl", _records(coarse))
    with pytest.raises(DataError, match="logit KD needs the teacher's tokenizer") as e:
        _dataset(path, fine, "off", tmp_path)
    assert e.value.path and e.value.line == 1  # the CLI prints it and exits 2 (a DataError)


def test_same_tokenizer_records_are_not_carried(toks, tmp_path):  # noqa: F811
    _, coarse = toks
    path = write_jsonl(tmp_path / "kd.jsonl", _records(coarse))
    ds = _dataset(path, coarse, "auto", tmp_path)
    assert ds.misaligned == [] and ds.carried.records == 0 and ds.carried.note() is None


def _config(tmp_path, tok_dir, data, cross: str | None):
    loss = {"kind": "fkl", "kd_weight": 0.5, **({"cross_tokenizer": cross} if cross else {})}
    cfg = {"model": {"preset": "toy", "max_seq_len": 128},
           "io": {"tokenizer_path": str(tok_dir), "train_shards": [str(data)], "output_dir": str(tmp_path / "out")},
           "loss": loss,
           "train": {"micro_batch_size": 4, "seq_lengths": [128], "max_steps": 2, "lr": 3e-3, "save_steps": 2}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_training_across_tokenizers_runs_and_says_how_much_aligned_1to1(toks, tok_dirs, tmp_path):  # noqa: F811
    fine_dir, _ = tok_dirs
    data = write_jsonl(tmp_path / "kd.jsonl", _records(toks[1]))
    r = cli_here("train", "--config", _config(tmp_path, fine_dir, data, None))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "aligned 1:1" in r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    kd = [x["kd"] for x in rows if "kd" in x]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd)  # a KD term, not CE alone


# ----------------------------------------------------------------------------- the bench's langx cell

def test_langx_student_splits_the_teachers_words_and_bits_per_byte_is_its_nll_per_byte(tmp_path):
    """The bench's cross-tokenizer cell: the student's own BPE (24 merges) cuts the shipped lang
    teacher's word tokens into pieces, and bits per byte is the model's summed NLL of each answer
    and its EOS on its own tokens, over the answers' bytes (computed here by hand)."""
    import torch
    from transformers import AutoTokenizer

    from kdforge.bench.run import one_to_one_share
    from kdforge.bench.tasks import TASKS, bits_per_byte, load_teacher, student_tokenizer, teacher_answers, write_jsonl

    torch.set_num_threads(1)
    task = TASKS["langx"]
    student = AutoTokenizer.from_pretrained(str(student_tokenizer(task, tmp_path)))
    teacher, ttok = load_teacher(task)
    words = [" happy", " forest", " every", " lonely"]
    assert [len(ttok(w)["input_ids"]) for w in words] == [1, 1, 1, 1]
    assert all(len(student(w)["input_ids"]) >= 2 for w in words)
    rows = teacher_answers(teacher, ttok, task.train_prompts(6), 1.0, task.max_new_tokens, seed=3, top_k=task.top_k)
    assert all(len(e["top"]) == 20 for r in rows for e in r["teacher_logprobs"])
    assert 0.05 < one_to_one_share(rows, student_tokenizer(task, tmp_path)) < 0.95
    path = write_jsonl(tmp_path / "ev.jsonl", [{k: r[k] for k in ("prompt", "teacher_text", "teacher_logprobs")}
                                                for r in rows])
    nll = n_bytes = 0.0
    for r in rows:
        prompt = ttok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                          tokenize=False)
        p = ttok(prompt, add_special_tokens=False)["input_ids"]
        a = ttok(r["teacher_text"], add_special_tokens=False)["input_ids"] + [ttok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(teacher(torch.tensor([p + a])).logits[0].float(), -1)
        nll -= sum(float(logp[len(p) - 1 + t, i]) for t, i in enumerate(a))
        n_bytes += len(r["teacher_text"].encode("utf-8"))
    assert bits_per_byte(teacher, ttok, path) == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)


# ----------------------------------------------------------------------------- dense: teacher.path

@pytest.fixture(scope="module")
def coarse_teacher_dir(tok_dirs, tmp_path_factory):
    """A tiny random teacher model on the coarse tokenizer (an HF folder with its tokenizer)."""
    from kdforge.model import ModelCfg, write_student

    out = tmp_path_factory.mktemp("teacher")
    write_student(ModelCfg(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_head=16, vocab_size=None,
                           ffn_dim=64, max_seq_len=256), tok_dirs[1], out, seed=1)
    return out


@pytest.mark.parametrize("cross", ["auto", "off"])
def test_dense_kd_from_a_teacher_path_with_another_tokenizer(toks, tok_dirs, coarse_teacher_dir, tmp_path, cross):  # noqa: F811
    """Dense KD (teacher.path) on dataset steps, teacher on the coarse tokenizer, student on the fine
    one: auto scores the text in the teacher's tokens and trains on its carried top-K (a KD term on
    every step); off is exit 2 naming loss.cross_tokenizer."""
    data = write_jsonl(tmp_path / "kd.jsonl", [{k: r[k] for k in ("prompt", "teacher_text")} for r in _records(toks[1])])
    cfg = yaml.safe_load(_config(tmp_path, tok_dirs[0], data, cross).read_text())
    cfg["teacher"] = {"path": str(coarse_teacher_dir), "top_logprobs": 8}
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = cli_here("train", "--config", path)
    if cross == "off":
        assert r.returncode == 2 and "loss.cross_tokenizer" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
        return
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "its own tokenizer" in r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    kd = [x["kd"] for x in rows if "kd" in x]
    assert len(kd) == 2 and all(math.isfinite(v) and v > 0 for v in kd)


def test_data_build_says_how_much_of_another_tokenizers_rows_aligned_1to1(toks, tok_dirs, tmp_path):  # noqa: F811
    """`kdforge data build` on a teacher with another tokenizer prints train's carried line."""
    fine_dir, _ = tok_dirs
    data = write_jsonl(tmp_path / "kd.jsonl", _records(toks[1]))
    r = cli_here("data", "build", data, "--tokenizer", fine_dir, "--out", tmp_path / "st", check=True)
    assert re.search(r"not the student's in 24 records: .* \d+\.\d% of their [\d,]+ positions aligned 1:1", r.stdout)
    same = cli_here("data", "build", data, "--tokenizer", fine_dir, "--out", tmp_path / "st", check=True)
    assert "reused" in same.stdout and "aligned 1:1" in same.stdout  # read back from the store's meta
