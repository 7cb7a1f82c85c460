"""The store's fast path for generate lines (data/rows.py) gives exactly what the general path
(json.loads, parse_record, align_record) gives: the same examples, rows, logprobs, bad-line messages
and misaligned records, on hand-picked and generated hostile lines."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.data import store
from kdforge.data.dataset import TokenMap, load_tokenizer
from kdforge.data.records import read_records
from kdforge.data.rows import TeacherRows, fast_record, layout
from kdforge.data.tokenizer import token_bytes

TEXTS = ["alpha echo", "café naïve déjà", "東京 中文 数据", "emoji 🎉 ok 🙂", "2 plus 3 is 5."]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def tm(tok):
    return TokenMap(tok)


def entries(tok, text: str, seed: int, k: int = 4, chosen_in_top: bool = True) -> list[dict]:
    tb = token_bytes(tok)
    rng = random.Random(seed)
    usable = [i for i, b in enumerate(tb) if b]
    rows = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        others = rng.sample([j for j in usable if j != i], k - 1)
        alts = ([i] if chosen_in_top else []) + others
        lps = sorted((-rng.random() * 25 for _ in alts), reverse=True)
        top = [{"token": tb[a].decode("utf-8", "replace"), "logprob": lp, "bytes": list(tb[a])}
               for a, lp in zip(alts, lps)]
        chosen = top[0] if chosen_in_top else {"token": tb[i].decode("utf-8", "replace"), "logprob": -0.5,
                                              "bytes": list(tb[i])}
        rows.append({**chosen, "top": top})
    return rows


def line(tok, text: str, seed: int = 0, **kw) -> dict:
    return {"id": f"r{seed}", "prompt": f"Q{seed} é 東京", "teacher_text": text,
            "teacher_logprobs": entries(tok, text, seed, **kw), "metadata": {"source": "ü"}}


def both_paths(tok, tmp_path, lines: list[str]):
    """(store built through the fast path, the general path's Encoded and bad lines)."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    info = store.ensure_store([path], tok, with_topk=True, root=tmp_path / "st", workers=1)
    built = store.Store.open(info.path)
    recs, problems = read_records(path, strict=False)
    for r in recs:
        r.metadata = {**r.metadata, "_path": str(path)}
    general = store.encode_records(recs, tok, with_topk=True, path=str(path))
    return built, general, [(str(path), p.line, store.bare_message(p)) for p in problems]


def assert_same(built, general, problems) -> None:
    for name in ("tokens", "examples", "row_len", "alt_ids", "alt_lp"):
        got, want = np.asarray(getattr(built, name)), getattr(general, name)
        if name == "examples":
            got, want = got[:, [1, 2, 6, 7]], want[:, [1, 2, 6, 7]]  # lengths, line, flags (offsets rebase)
        assert got.shape == want.shape and np.array_equal(got, want), name
    assert [tuple(p) for p in built.meta["problems"]] == problems
    assert [tuple(m)[1:] for m in built.meta["misaligned"]] == [m[1:] for m in general.misaligned]


def test_canonical_lines_take_the_fast_path(tok, tm):
    """A generate line (json.dumps, or compact) takes the fast path; its rows are align_record's."""
    obj = line(tok, "café naïve déjà 🎉")
    for text in (json.dumps(obj), json.dumps(obj, separators=(",", ":"), ensure_ascii=False)):
        rec = fast_record(text.encode(), tm.by_raw)
        assert isinstance(rec.teacher_logprobs, TeacherRows) and rec.prompt == "Q0 é 東京"
        assert rec.metadata == {"source": "ü"} and rec.id == "r0"


@pytest.mark.parametrize("change", [
    lambda e: e.pop("bytes"),                         # no bytes: mapped by text on the general path
    lambda e: e.update(bytes=None),
    lambda e: e.update(bytes=[300]),                   # not a byte
    lambda e: e.update(logprob=0.5),                   # not a logprob
    lambda e: e.update(logprob="-1"),
    lambda e: e.update(token=7),
    lambda e: e.update(top="x"),
    lambda e: e["top"][0].update(bytes=[True, 104]),    # a bool is no byte (records._check_token)
    lambda e: e["top"][0].update(bytes=[104, -1]),
    lambda e: e["top"][0].update(bytes={"0": 104}),
])
def test_irregular_entries_leave_the_fast_path(tok, tm, change):
    obj = line(tok, "alpha echo")
    change(obj["teacher_logprobs"][-1])
    assert fast_record(json.dumps(obj), tm.by_raw) is None


def test_bytes_of_no_student_token_take_the_aligner_without_a_second_parse(tok, tm):
    """Another tokenizer's bytes (no student token has them alone): the line is decoded once and its
    entries handed to align_record as json.loads gives them, bytes as a bytes object."""
    obj = line(tok, "café naïve déjà 🎉")
    obj["teacher_logprobs"] = coarse(obj["teacher_logprobs"])
    rec = fast_record(json.dumps(obj, ensure_ascii=False).encode(), tm.by_raw)
    want = json.loads(json.dumps(obj))["teacher_logprobs"]
    got = rec.teacher_logprobs
    assert isinstance(got, list) and len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["token"], g["logprob"], list(g["bytes"])) == (w["token"], w["logprob"], w["bytes"])
        assert [(a["token"], a["logprob"], list(a["bytes"])) for a in g["top"]] == \
               [(a["token"], a["logprob"], a["bytes"]) for a in w["top"]]


def test_layout_keeps_first_occurrences():
    row_len, ids, lps = layout(np.array([2, 0, 3]), np.array([5, 6, 9, 9, 4]), np.array([-1., -2., -3., -4., -5.]),
                               np.array([6, 8, 4]), np.array([-2.5, -0.1, -5.5]))
    assert row_len.tolist() == [2, 1, 2]
    assert ids.tolist() == [5, 6, 8, 9, 4] and lps.tolist() == [-1., -2., -0.1, -3., -5.]


HAND = [
    lambda tok: line(tok, "alpha echo", 1),
    lambda tok: line(tok, "東京 中文 数据", 2, chosen_in_top=False),
    lambda tok: {**line(tok, "emoji 🎉 ok 🙂", 3), "teacher_text": "emoji 🎉 ok 🙂 more"},   # rows of other text
    lambda tok: {**line(tok, "alpha echo", 4), "prompt": "   "},                                # empty prompt
    lambda tok: {**line(tok, "alpha echo", 5), "teacher_text": "  "},                          # empty answer
    lambda tok: {**line(tok, "alpha echo", 6), "teacher_reasoning": "hmm… 考虑"},
    lambda tok: {**line(tok, "alpha echo", 7), "teacher_reasoning": 3},
    lambda tok: {**line(tok, "2 plus 3 is 5.", 8), "messages": [{"role": "user", "content": "Hï"}]},
    lambda tok: {**line(tok, "2 plus 3 is 5.", 9), "messages": [{"role": "robot", "content": "x"}]},
    lambda tok: {**line(tok, "alpha echo", 10), "teacher_logprobs": []},
    lambda tok: {**line(tok, "café naïve déjà", 11), "teacher_logprobs": coarse(entries(tok, "café naïve déjà", 11))},
    lambda tok: {**line(tok, "東京 中文 数据", 12), "teacher_logprobs": coarse(entries(tok, "東京 中文 数据", 12, k=3))},
]


def test_hand_picked_lines_agree(tok, tmp_path):
    built, general, problems = both_paths(tok, tmp_path, [json.dumps(h(tok), ensure_ascii=False) for h in HAND])
    assert len(problems) == 4  # empty prompt, empty answer, reasoning 3, role robot
    assert built.meta["carried"][0] == 2 and general.carried == built.meta["carried"]  # the coarse teacher's
    assert_same(built, general, problems)


MUTATION = st.sampled_from(["none", "drop_bytes", "null_bytes", "compact", "spaced", "other_bytes", "byte_300",
                            "lp_slack", "lp_pos", "lp_int", "lp_nan", "top_null", "top_empty", "dup_alt",
                            "extra_key", "token_int", "top_missing", "foreign", "coarse", "bytes_bool"])


def coarse(lp: list[dict]) -> list[dict]:
    """The rows of a teacher whose tokens are pairs of the student's (another tokenizer): each pair's
    bytes joined, their logprobs added, alternatives that start with the first and end elsewhere."""
    out = []
    for i in range(0, len(lp), 2):
        pair = lp[i:i + 2]
        b = [x for e in pair for x in e.get("bytes") or []]
        alts = [{"token": a["token"] + pair[-1]["token"], "logprob": a["logprob"] - 0.5,
                 "bytes": list(a.get("bytes") or []) + (pair[-1].get("bytes") or [])}
                for a in (pair[0].get("top") or [])]
        out.append({"token": "".join(e["token"] for e in pair), "logprob": sum(e["logprob"] for e in pair),
                    "bytes": b, "top": alts})
    return out


def mutate(obj: dict, where: int, how: str, tb: list) -> str | None:
    """Apply `how` to an entry (or its first alternative); some mutations are textual: returns the
    line's text where the mutation is in the text."""
    lp = obj["teacher_logprobs"]
    e = lp[where % len(lp)]
    alt = (e.get("top") or [e])[0] if isinstance(e.get("top"), list) else e
    if how == "drop_bytes":
        alt.pop("bytes", None)
    elif how == "null_bytes":
        e["bytes"] = None
    elif how == "other_bytes":
        alt["bytes"] = list(tb[((alt.get("bytes") or [0])[0] + 7) % 200 + 3] or b"a")
    elif how == "byte_300":
        alt["bytes"] = [300]
    elif how == "lp_slack":
        alt["logprob"] = 5e-5
    elif how == "lp_pos":
        e["logprob"] = 0.3
    elif how == "lp_int":
        alt["logprob"] = -2
    elif how == "top_null":
        e["top"] = None
    elif how == "top_missing":
        e.pop("top", None)
    elif how == "top_empty":
        e["top"] = []
    elif how == "dup_alt":
        e["top"] = [*(e.get("top") or [e]), dict((e.get("top") or [e])[-1], logprob=-30.0)]
    elif how == "extra_key":
        alt["x"] = {"ü": [1]}
    elif how == "token_int":
        alt["token"] = 5
    elif how == "foreign":  # bytes no student token has alone: the line leaves TeacherRows
        alt["bytes"] = list("🎉é東京".encode()) + list(alt.get("bytes") or [])
    elif how == "bytes_bool":
        alt["bytes"] = [True, 104]
    elif how == "coarse":
        obj["teacher_logprobs"] = coarse(lp)
    text = json.dumps(obj, ensure_ascii=False)
    if how == "compact":
        return json.dumps(obj, separators=(",", ":"))
    if how == "spaced":
        return text.replace('"bytes": [', '"bytes": [ ', 1)
    if how == "lp_nan":
        return text.replace('"logprob": ', '"logprob": NaN, "_": ', 1)
    return text


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(st.tuples(st.sampled_from(TEXTS), st.integers(0, 50), st.booleans(),
                                st.lists(st.tuples(st.integers(0, 40), MUTATION), max_size=3)),
                      min_size=1, max_size=6))
def test_generated_hostile_lines_agree(tok, tmp_path_factory, lines):
    """Generated lines with hostile entries: the fast path never differs from the general one."""
    tb = token_bytes(tok)
    out = []
    for text, seed, in_top, muts in lines:
        obj = line(tok, text, seed, chosen_in_top=in_top)
        s = json.dumps(obj, ensure_ascii=False)
        for where, how in muts:
            s = mutate(json.loads(s), where, how, tb)
        out.append(s)
    built, general, problems = both_paths(tok, tmp_path_factory.mktemp("rows"), out)
    assert_same(built, general, problems)


def test_whitespace_around_and_between_lines_agrees(tok, tmp_path):
    """Lines read as views of the chunk (no copy): ASCII whitespace around a line, blank and
    whitespace-only lines, a line padded with an ideographic space (U+3000, stripped as text only)
    give the general path's examples and line numbers."""
    lines = [json.dumps(line(tok, t, i), ensure_ascii=False) for i, t in enumerate(TEXTS)]
    padded = [" \t" + lines[0] + "  ", "", "   \t", lines[1] + "\x0b", "\u3000" + lines[2] + "\u3000", "\x0c",
              lines[3], lines[4] + " "]
    built, general, problems = both_paths(tok, tmp_path, padded)
    assert len(built.examples) == 5 and np.asarray(built.examples)[:, 6].tolist() == [1, 4, 5, 7, 8]
    assert_same(built, general, problems)


def _layout_reference(n_top, top_ids, top_lp, chosen_ids, chosen_lp):
    """align_record's rule written out: per row [top-k..., chosen], each id at its first place."""
    row_len, ids, lps, at = [], [], [], 0
    for n, c, clp in zip(n_top, chosen_ids, chosen_lp):
        seen = {}
        for i, lp in [*zip(top_ids[at:at + n], top_lp[at:at + n]), (c, clp)]:
            seen.setdefault(int(i), float(lp))
        at += n
        row_len.append(len(seen))
        ids += list(seen)
        lps += list(seen.values())
    return row_len, ids, lps


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 12), k=st.integers(1, 6), vocab=st.integers(1, 40), ragged=st.booleans(), seed=st.integers(0, 9999))
def test_layout_matches_the_rule_on_uniform_and_ragged_rows(rows, k, vocab, ragged, seed):
    """Uniform rows take the quick layout, ragged ones or rows repeating an id the general one: both
    give the rule's rows (a small vocabulary makes repeats and chosen-in-top common)."""
    rng = np.random.default_rng(seed)
    n_top = rng.integers(0, k + 1, rows) if ragged else np.full(rows, k)
    top_ids = rng.integers(0, vocab, int(n_top.sum()))
    top_lp = -rng.random(len(top_ids))
    chosen, chosen_lp = rng.integers(0, vocab, rows), -rng.random(rows)
    got = layout(n_top, top_ids, top_lp, chosen, chosen_lp)
    want = _layout_reference(n_top, top_ids, top_lp, chosen, chosen_lp)
    assert [g.tolist() for g in got] == [list(w) for w in want]
