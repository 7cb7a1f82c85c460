"""`kdforge bench distill --quick`: the real benchmark (in-process teacher answers, `run_training`
per cell, kdforge eval scoring, spend counted two ways) on both shipped tasks, tiny."""

from __future__ import annotations

import json
import math

from conftest import cli_here


def test_bench_distill_quick(tmp_path):
    out = tmp_path / "bench"
    r = cli_here("bench", "distill", "--quick", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["plan"]["tasks"] == ["sort", "lang"]
    cells = res["cells"]
    assert {(c["task"], c["recipe"]) for c in cells} == {
        (t, rc) for t in ("sort", "lang") for rc in ("ce", "topk_t1", "onpolicy_rkl")}
    # the teachers: sort's near-certain teacher answers the held-out prompts; lang's is broad
    assert res["teacher"]["sort"]["accuracy"] >= 0.9
    assert res["teacher"]["lang"]["kl"] < 1e-4 and 2.0 < res["teacher"]["lang"]["perplexity"] < 6.0
    for c in cells:
        assert math.isfinite(c["quality"])
        assert c["answers"] == 100 and c["answer_tokens"] > 100 * 5
        if c["recipe"] == "onpolicy_rkl":  # scoring is priced on top of the answers
            assert c["on_policy_steps"] > 0 and c["scored_tokens"] > 0
            assert c["priced_tokens"] == c["answer_tokens"] + c["scored_tokens"]
        else:
            assert c["on_policy_steps"] == 0 and c["priced_tokens"] == c["answer_tokens"]
        if c["task"] == "sort":
            assert 0.0 <= c["quality"] <= 1.0
        else:  # a student 20 steps in is far from the teacher, but finite and positive
            assert 0.0 < c["kl"] < 10.0 and c["perplexity"] > res["teacher"]["lang"]["perplexity"]
    # same answers -> same answer spend for every recipe of a task
    for t in ("sort", "lang"):
        assert len({c["answer_tokens"] for c in cells if c["task"] == t}) == 1
    table = (out / "table.md").read_text()
    assert "### sort" in table and "### lang" in table and "Goals:" in table
    assert "| onpolicy_rkl | 100 |" in table and table in r.stdout
    for t in ("sort", "lang"):
        assert (out / f"{t}.png").stat().st_size > 5000
    # a rerun into the same --out keeps the scored cells (a long run stopped early continues)
    again = cli_here("bench", "distill", "--quick", "--out", out)
    assert again.returncode == 0 and "6 cells kept" in again.stderr, again.stderr[-2000:]
    assert json.loads((out / "results.json").read_text())["cells"] == cells


def test_bench_distill_bad_recipe(tmp_path):
    r = cli_here("bench", "distill", "--quick", "--recipes", "nope", "--out", tmp_path / "b")
    assert r.returncode == 2 and "unknown recipe 'nope'" in r.stderr


def test_a_budgets_teacher_answers_do_not_depend_on_the_other_budgets(tmp_path):
    """The first 60 answers (sampled: lang's teacher runs at T > 0) are the same file whether 60 is
    the largest budget or runs beside 130: the bench's budgets nest, so cells of a default run and
    of a --grid run with the same seed train on the same data."""
    import torch

    from kdforge.bench.run import _prepare
    from kdforge.bench.tasks import TASKS

    torch.set_num_threads(1)
    alone = _prepare(TASKS["lang"], [60], tmp_path / "a", log=lambda m: None)
    beside = _prepare(TASKS["lang"], [60, 130], tmp_path / "b", log=lambda m: None)
    assert alone["files"][60][0].read_bytes() == beside["files"][60][0].read_bytes()
    assert alone["files"][60][1:] == beside["files"][60][1:]  # and the same prompt/completion tokens
    assert len(beside["files"][130][0].read_text().splitlines()) == 130
