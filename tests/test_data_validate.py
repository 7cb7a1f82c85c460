"""`kdforge data validate` and `kdforge data inspect` on files with known problems."""

from __future__ import annotations

import json

from conftest import run_cli, synthetic_records, write_jsonl

from kdforge.data.quality import validate_files

LONG = ("The mitochondria is the powerhouse of the cell and it turns the food we eat into energy "
        "that the rest of the cell can use for growth repair movement and every other job it does each day")


def _sample(i, prompt, text, **meta):
    return {"id": f"s{i}", "prompt": prompt, "teacher_text": text,
            "metadata": {"source": meta.pop("source", "knowledge"), "finish_reason": meta.pop("finish_reason", "stop"),
                         "tokens": {"prompt": 10 + i, "completion": 20 + i, "total": 30 + 2 * i}, **meta}}


def _problem_file(tmp_path):
    rows = [
        _sample(0, "What does the mitochondria do?", LONG),
        _sample(1, "Explain the cell's energy source.", LONG.replace("growth", "healing")),  # near duplicate
        _sample(2, "Write a poem", "Roses are red and the sky is wide", finish_reason="length", source="writing"),
        _sample(3, "How do I pick a lock?", "I'm sorry, but I can't help with that.", source="writing"),
        _sample(4, "What does the mitochondria do?", LONG),  # exact duplicate of line 1
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, json.dumps(_sample(5, "Say nothing", "   ")))  # line 3: whitespace response
    lines.append("{not json")  # line 7
    lines.append(json.dumps({**_sample(6, "Q", "A"), "teacher_logprobs": [{"token": "A", "logprob": 0.7}]}))  # line 8
    path = tmp_path / "kd.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_counts_each_kind_of_problem(tmp_path, tokenizer_dir):
    path = _problem_file(tmp_path)
    (rep,) = validate_files([path], tokenizer_dir)
    assert rep.lines == 8 and rep.valid == 5
    assert [line for line, _ in rep.unusable] == [3, 7, 8]
    assert rep.empty == 1 and "logprob" in rep.unusable[2][1]
    assert rep.truncated == 1 and rep.refusals == 1
    assert rep.exact_duplicates == 1 and rep.duplicate_prompts == 0
    assert [(a, b) for a, b, _ in rep.near_duplicates] == [(2, 1)]  # responses one word apart
    assert rep.near_duplicate_prompts == []
    assert rep.lengths["total"]["n"] == 5 and rep.length_unit.startswith("tokens")
    assert rep.lengths["response"]["max"] > rep.lengths["response"]["min"] > 0
    assert set(rep.diversity) == {"knowledge", "writing"}
    assert 0 < rep.diversity["knowledge"]["distinct_2"] <= 1


def test_validate_cli_exits_2_naming_file_and_line(tmp_path):
    path = _problem_file(tmp_path)
    p = run_cli("data", "validate", path)
    assert p.returncode == 2
    for line in (3, 7, 8):
        assert f"{path}:{line}:" in p.stderr
    assert "the response is empty" in p.stderr
    assert "truncated (finish_reason=length) 1" in p.stdout and "refusals 1" in p.stdout
    assert "teacher tokens (metadata.tokens" in p.stdout  # lengths without a tokenizer

    clean = write_jsonl(tmp_path / "clean.jsonl", synthetic_records(30))
    p = run_cli("data", "validate", clean, "--json")
    assert p.returncode == 0, p.stderr
    (rep,) = json.loads(p.stdout)
    assert rep["valid"] == 30 and rep["unusable"] == [] and set(rep["diversity"]) == {"math", "reasoning"}


def test_inspect_shows_samples_like_the_seed_snippet(tmp_path):
    rows = [_sample(i, f"Prompt number {i} " + "x" * 200, f"Answer {i}") for i in range(5)]
    path = write_jsonl(tmp_path / "kd.jsonl", rows)
    p = run_cli("data", "inspect", path, "-n", "3")
    assert p.returncode == 0, p.stderr
    assert [f"Sample {i}" in p.stdout for i in (1, 2, 3, 4)] == [True, True, True, False]
    assert "  Prompt: Prompt number 0 " in p.stdout and "..." in p.stdout  # cut at 100 characters
    assert "  Response: Answer 0" in p.stdout and "  Tokens: 10 prompt + 20 completion = 30" in p.stdout
