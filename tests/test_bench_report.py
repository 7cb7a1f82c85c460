"""bench/report.py: every "% of gap closed", "recommended" and "met" line comes from summarize,
_gap, _interp_log, _mark_recommended and goals. Checked here against values worked out by hand
(the comments show the arithmetic), plus generated points for the log-$ interpolation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.bench.report import _gap, _interp_log, _mark_recommended, goals, summarize


def cell(task, recipe, budget, quality, usd, **extra):
    return {"task": task, "recipe": recipe, "budget": budget, "quality": quality, "usd": usd,
            "priced_tokens": usd * 1000, "on_policy_steps": 0, **extra}


def by(rows, recipe, budget):
    (row,) = [r for r in rows if r["recipe"] == recipe and r["budget"] == budget]
    return row


# ---------------------------------------------------------------------------- _gap, _interp_log

def test_gap_is_the_share_of_the_ce_to_teacher_distance():
    assert _gap(0.85, 0.55, 1.0) == pytest.approx(0.30 / 0.45)
    assert _gap(1.5, 2.0, 0.0) == pytest.approx(0.25)  # KL: lower is better, the signs cancel
    assert _gap(0.4, 0.55, 1.0) == pytest.approx(-0.15 / 0.45)  # worse than CE: negative
    assert _gap(0.9, 0.7, 0.7) is None  # CE already at the teacher: no gap to close


def test_interp_log_is_linear_in_log_dollars():
    pts = [(1.0, 0.55), (10.0, 0.70), (100.0, 0.90)]
    assert _interp_log(pts, math.sqrt(10)) == pytest.approx(0.625)  # halfway in log between 1 and 10
    assert _interp_log(pts, 10 ** 1.25) == pytest.approx(0.75)  # a quarter of the way from 10 to 100
    assert _interp_log(list(reversed(pts)), 1.0) == pytest.approx(0.55)
    assert _interp_log(pts, 100.0) == pytest.approx(0.90)
    assert _interp_log(pts, 0.99) is None and _interp_log(pts, 101.0) is None
    assert _interp_log(pts, 0.0) is None and _interp_log([], 1.0) is None


def test_interp_log_just_past_the_top_point_is_the_top_point():
    # Within the 1e-9 tolerance above the costliest CE cell: that cell's quality (was the cheapest's, 0.55).
    pts = [(1.0, 0.55), (10.0, 0.70)]
    assert _interp_log(pts, 10.0 * (1 + 1e-10)) == pytest.approx(0.70)
    assert _interp_log(pts, 1.0 * (1 - 1e-10)) == pytest.approx(0.55)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-6, 1e6), st.floats(-10, 10)), min_size=1, max_size=6,
                unique_by=lambda p: p[0]),
       st.floats(0, 1), st.sampled_from([-1e-10, 0.0, 1e-10]))
def test_interp_log_stays_between_its_neighbours(points, where, nudge):
    pts = sorted(points)
    lo, hi = math.log(pts[0][0]), math.log(pts[-1][0])
    x = math.exp(lo + (hi - lo) * where) * (1 + nudge)
    y = _interp_log(points, x)
    if x < pts[0][0] * (1 - 1e-9) or x > pts[-1][0] * (1 + 1e-9):
        assert y is None
        return
    x_in = min(max(x, pts[0][0]), pts[-1][0])
    left = max((p for p in pts if p[0] <= x_in), key=lambda p: p[0])
    right = min((p for p in pts if p[0] >= x_in), key=lambda p: p[0])
    assert min(left[1], right[1]) - 1e-9 <= y <= max(left[1], right[1]) + 1e-9
    for px, py in pts:
        assert _interp_log(points, px) == pytest.approx(py, abs=1e-9)


# ---------------------------------------------------------------------------- _mark_recommended

def test_recommended_is_the_pareto_front_of_quality_against_dollars():
    rows = [{"recipe": "ce", "usd": 1.0, "mean": 0.55}, {"recipe": "topk_t2", "usd": 3.0, "mean": 0.60},
            {"recipe": "topk_t1", "usd": 5.0, "mean": 0.58},  # costs more than topk_t2 for less
            {"recipe": "dense", "usd": 0.1, "mean": 0.99},  # local only: never recommended
            {"recipe": "onpolicy_jsd", "usd": 10.0, "mean": 0.85}, {"recipe": "ce", "usd": 10.0, "mean": 0.70}]
    _mark_recommended(rows, higher=True)
    assert [r["recommended"] for r in rows] == [True, True, False, False, True, False]
    kl = [{"recipe": "ce", "usd": 1.0, "mean": 2.0}, {"recipe": "topk_t1", "usd": 2.0, "mean": 2.5},
          {"recipe": "topk_t2", "usd": 4.0, "mean": 1.5}]
    _mark_recommended(kl, higher=False)  # lower KL is better
    assert [r["recommended"] for r in kl] == [True, False, True]


# ---------------------------------------------------------------------------- summarize + goals

SORT = {
    "plan": {"tasks": ["sort"]}, "teacher": {"sort": {"quality": 1.0}},
    "cells": [cell("sort", "ce", 100, 0.5, 1.0), cell("sort", "ce", 100, 0.6, 1.0),
              cell("sort", "ce", 250, 0.7, 10.0), cell("sort", "ce", 250, 0.7, 10.0),
              cell("sort", "onpolicy_jsd", 100, 0.9, 10.0), cell("sort", "onpolicy_jsd", 100, 0.8, 10.0),
              cell("sort", "topk_t1", 250, 0.75, 10.0 * (1 + 1e-12)),
              cell("sort", "topk_t2", 100, 0.6, math.sqrt(10)),
              cell("sort", "dense", 250, 0.95, 0.5)],
}


def test_summarize_sort_by_hand():
    rows = summarize(SORT)
    assert [(r["recipe"], r["budget"]) for r in rows] == [  # recipe order of RECIPES, then budget
        ("ce", 100), ("ce", 250), ("topk_t1", 250), ("topk_t2", 100), ("dense", 250), ("onpolicy_jsd", 100)]
    ce100 = by(rows, "ce", 100)
    assert (ce100["seeds"], ce100["mean"], ce100["min"], ce100["max"]) == (2, pytest.approx(0.55), 0.5, 0.6)
    assert ce100["gap_answers"] == 0 and ce100["gap_spend"] == 0
    op = by(rows, "onpolicy_jsd", 100)
    assert op["mean"] == pytest.approx(0.85)
    assert op["gap_answers"] == pytest.approx(0.30 / 0.45)  # (0.85 - CE@100 0.55) / (1 - 0.55)
    assert op["ce_at_spend"] == pytest.approx(0.70) and op["gap_spend"] == pytest.approx(0.5)  # CE at $10: 0.70
    t1 = by(rows, "topk_t1", 250)
    assert t1["ce_at_spend"] == pytest.approx(0.70)  # a hair over CE's top $: CE's top cell
    assert t1["gap_spend"] == pytest.approx(0.05 / 0.30) and t1["gap_answers"] == pytest.approx(0.05 / 0.30)
    t2 = by(rows, "topk_t2", 100)
    assert t2["ce_at_spend"] == pytest.approx(0.625)  # halfway in log $ from 0.55 ($1) to 0.70 ($10)
    assert t2["gap_spend"] == pytest.approx(-0.025 / 0.375) and t2["gap_answers"] == pytest.approx(0.05 / 0.45)
    dense = by(rows, "dense", 250)
    assert dense["ce_at_spend"] is None and dense["gap_spend"] is None  # cheaper than every CE cell
    assert dense["gap_answers"] == pytest.approx(0.25 / 0.30)
    # $ order: dense 0.5 (local only), ce@100 1.0, topk_t2 3.16, then at $10 on-policy 0.85 > ce 0.70 > ...
    assert {(r["recipe"], r["budget"]) for r in rows if r["recommended"]} == {
        ("ce", 100), ("topk_t2", 100), ("onpolicy_jsd", 100)}
    assert goals(SORT, rows) == [
        "per answer, sort, 250 answers: best dense closes 83% of the CE-to-teacher gap (goal >= 90%): missed",
        "per priced token: 2 recommended non-CE cells comparable with CE at equal $, 1 below CE "
        "(sort topk_t2 100): missed",
        "per priced token, lang, off-policy top-k: not measured"]


LANG = {
    "plan": {"tasks": ["lang"]}, "teacher": {"lang": {"quality": 0.0, "perplexity": 3.0}},
    "cells": [cell("lang", "ce", 100, 2.0, 1.0, perplexity=9.0), cell("lang", "ce", 1000, 1.0, 100.0, perplexity=5.0),
              cell("lang", "topk_t1", 100, 1.5, 10.0, perplexity=7.0),
              cell("lang", "topk_t2", 100, 1.2, 10.0, perplexity=6.0),
              cell("lang", "topk_t2", 100, 1.4, 10.0, perplexity=8.0)],
}


def test_summarize_and_goals_lang_lower_is_better():
    rows = summarize(LANG)
    t1, t2 = by(rows, "topk_t1", 100), by(rows, "topk_t2", 100)
    assert t1["gap_answers"] == pytest.approx(0.25)  # (1.5 - 2.0) / (0 - 2.0)
    assert t1["ce_at_spend"] == pytest.approx(1.5) and t1["gap_spend"] == pytest.approx(0.0)  # $10: halfway 2 -> 1
    assert t2["mean"] == pytest.approx(1.3) and t2["perplexity"] == pytest.approx(7.0)
    assert t2["gap_spend"] == pytest.approx(0.2 / 1.5)  # (1.3 - 1.5) / (0 - 1.5)
    assert {(r["recipe"], r["budget"]) for r in rows if r["recommended"]} == {
        ("ce", 100), ("topk_t2", 100), ("ce", 1000)}  # at $10 topk_t2's 1.3 beats topk_t1's 1.5
    assert goals(LANG, rows) == [
        "per answer, sort, 250 answers: not measured (needs the sort task, budget 250, ce + another recipe)",
        "per priced token: 1 recommended non-CE cells comparable with CE at equal $, 0 below CE (none): met",
        "per priced token, lang, off-policy top-k at equal $: topk_t1@100 0%, topk_t2@100 13%; best 13% "
        "(goal >= 25%): missed"]


def test_goals_with_nothing_comparable_at_equal_spend_is_not_met():
    # Only CE and a local-only recipe: no recommended non-CE cell to compare. "0 below CE: met" would
    # claim a goal nothing measured.
    result = {"plan": {"tasks": ["sort"]}, "teacher": {"sort": {"quality": 1.0}},
              "cells": [cell("sort", "ce", 250, 0.7, 10.0), cell("sort", "dense", 250, 0.9, 10.0)]}
    lines = goals(result, summarize(result))
    assert lines[1].startswith("per priced token: not measured")
