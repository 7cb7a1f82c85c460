"""Cross-tokenizer alignment (kdforge.data.align): a teacher's top-k rows carried onto the student's
tokens by bytes. Hand-picked cases with exact numbers (finer, coarser, a split UTF-8 character, the
rest bucket), and hypothesis over two real byte-level BPE tokenizers trained here, one with few
merges and one with many, on generated non-ASCII text: every carried row is a valid (sub)
distribution, rows are 1:1 exactly where the two tokenizations coincide, and with the same
tokenizer on both sides the rows are the dataset's same-tokenizer rows."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.data.align import AlignError, StudentPieces, TeacherToken, align_rows, teacher_tokens
from kdforge.data.tokenizer import special_ids, token_bytes

WORDS = ["hello", "help", "world", "café", "naïve", "über", "日本語", "東京", "🙂", "🎉ok", "ab", "abc",
         "straße", "élan", "ça", "北京市", "mañana", "the", "then", "there"]


def _corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """(fine, coarse): byte-level BPEs with 12 and ~300 merges, trained here on accented, CJK and
    emoji text: the coarse one's word tokens split into several of the fine one's pieces."""
    from kdforge.data.tokenizer import train_tokenizer

    fine = train_tokenizer(_corpus(), 272, tmp_path_factory.mktemp("fine"), min_frequency=1)
    coarse = train_tokenizer(_corpus(), 600, tmp_path_factory.mktemp("coarse"), min_frequency=1)
    return fine, coarse


def _pieces(tok) -> StudentPieces:
    return StudentPieces(token_bytes(tok), special_ids(tok))


def _teacher_rows(tok, text: str, rng: random.Random, k: int = 6) -> list[TeacherToken]:
    """The teacher's tokens of `text` with a made-up top-k row each: the chosen token and k - 1
    random others of its vocabulary, masses drawn at random with some left uncovered (the rest)."""
    table = token_bytes(tok)
    plain = [i for i, b in enumerate(table) if b and i not in special_ids(tok)]
    out = []
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        others = rng.sample(plain, k)
        outcomes = [i] + [j for j in others if j != i][:k - 1]
        w = [rng.random() + 0.01 for _ in outcomes]
        cover = rng.uniform(0.5, 1.0)
        lps = [math.log(x / sum(w) * cover) for x in w]
        top = [(table[j], lp) for j, lp in zip(outcomes, lps)]
        rng.shuffle(top)
        out.append(TeacherToken(table[i], lps[0], tuple(top[: k - 1])))  # the chosen may be left out
    return out


def _boundaries(table, ids) -> list[tuple[int, bytes]]:
    out, at = [], 0
    for i in ids:
        out.append((at, table[i]))
        at += len(table[i])
    return out


TEXT = st.lists(st.one_of(st.sampled_from(WORDS),
                          st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=6)),
                min_size=1, max_size=6).map(" ".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, seed=st.integers(0, 2**16))
def test_carried_rows_are_valid_distributions_and_one_to_one_where_tokenizations_coincide(toks, text, seed):
    fine, coarse = toks
    rng = random.Random(seed)
    for student, teacher_tok in ((fine, coarse), (coarse, fine)):  # student finer, then coarser
        pieces = _pieces(student)
        teacher = _teacher_rows(teacher_tok, text, rng)
        sids = student(text, add_special_tokens=False)["input_ids"]
        rows = align_rows(text.encode("utf-8"), sids, pieces, teacher)
        assert rows.positions == len(sids)
        same = set(_boundaries(token_bytes(teacher_tok), teacher_tok(text, add_special_tokens=False)["input_ids"]))
        expect_1to1 = sum(1 for b in _boundaries(pieces.table, sids) if b in same)
        assert rows.one_to_one == expect_1to1, text
        for t, (ids, lps, sid) in enumerate(zip(rows.ids, rows.logprobs, sids)):
            assert len(ids) == len(set(ids)) == len(lps), (text, t)
            assert all(0 <= i < len(student) for i in ids)
            assert all(math.isfinite(x) and x <= 0 for x in lps), (text, t, lps)
            assert math.fsum(math.exp(x) for x in lps) <= 1 + 1e-9, (text, t, lps)
            assert sid in ids, (text, t)  # the student's actual piece always carries the chosen mass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, seed=st.integers(0, 2**16))
def test_same_tokenizer_rows_are_the_teacher_rows_unchanged(toks, text, seed):
    """Both sides one tokenizer: every position 1:1, each row the teacher's alternatives by id in
    its order, the chosen token last when the top-k left it out (the dataset's rows)."""
    _, coarse = toks
    rng = random.Random(seed)
    pieces = _pieces(coarse)
    teacher = _teacher_rows(coarse, text, rng)
    sids = coarse(text, add_special_tokens=False)["input_ids"]
    rows = align_rows(text.encode("utf-8"), sids, pieces, teacher)
    assert rows.one_to_one == len(sids)
    for t, (tok, sid) in enumerate(zip(teacher, sids)):
        want_ids, want_lps = [], []
        for b, lp in [*tok.top, (tok.bytes, tok.logprob)]:
            j = sid if b == tok.bytes else pieces.exact(b)
            if j not in want_ids:
                want_ids.append(j)
                want_lps.append(lp)
        assert rows.ids[t] == want_ids and rows.logprobs[t] == want_lps


# ----------------------------------------------------------------------------- hand-picked, exact numbers

def _table(*pieces: bytes) -> StudentPieces:
    return StudentPieces(list(pieces))


def test_finer_student_conditions_on_the_prefix_inside_the_teacher_word():
    """Teacher words hello 0.5 / help 0.3 / world 0.1 (0.1 uncovered); student pieces he+llo."""
    pieces = _table(b"he", b"llo", b"lp", b"wor", b"ld", b"h", b"e")
    lp = math.log
    teacher = [TeacherToken(b"hello", lp(0.5), ((b"hello", lp(0.5)), (b"help", lp(0.3)), (b"world", lp(0.1))))]
    rows = align_rows(b"hello", [0, 1], pieces, teacher)
    assert rows.one_to_one == 0
    got0 = dict(zip(rows.ids[0], map(math.exp, rows.logprobs[0])))
    assert got0 == pytest.approx({0: 0.8, 3: 0.1})  # he (hello + help), wor; 0.1 stays in the rest
    # After "he": only hello / help are possible; their masses rescaled so the rest keeps its 0.1.
    got1 = dict(zip(rows.ids[1], map(math.exp, rows.logprobs[1])))
    assert got1 == pytest.approx({1: 0.5 * 0.9 / 0.8, 2: 0.3 * 0.9 / 0.8})
    assert sum(got1.values()) == pytest.approx(0.9)


def test_an_alternative_that_ends_at_the_prefix_leaves_its_mass_in_the_rest():
    """After the student's "th": the teacher's "then" continues with "en" (first piece "e"), but its
    "th" alone is followed by another teacher token, unknown here: its 0.2 stays in the rest."""
    pieces = _table(b"th", b"e", b"n", b"t", b"h")
    lp = math.log
    teacher = [TeacherToken(b"the", lp(0.6), ((b"the", lp(0.6)), (b"then", lp(0.2)), (b"th", lp(0.2))))]
    rows = align_rows(b"the", [0, 1], pieces, teacher)
    assert dict(zip(rows.ids[0], map(math.exp, rows.logprobs[0]))) == pytest.approx({0: 1.0})
    assert dict(zip(rows.ids[1], map(math.exp, rows.logprobs[1]))) == pytest.approx({1: 0.8})


def test_coarser_student_piece_gets_the_product_of_the_teacher_tokens_it_spans():
    """Student piece 'hello' spans teacher 'hel' + 'lo'; the first teacher position's other
    alternatives go to their first student pieces."""
    pieces = _table(b"hello", b"help", b"h", b"x")
    lp = math.log
    teacher = [TeacherToken(b"hel", lp(0.7), ((b"hel", lp(0.7)), (b"x", lp(0.2)))),
               TeacherToken(b"lo", lp(0.5), ((b"lo", lp(0.5)), (b"p", lp(0.4))))]
    rows = align_rows(b"hello", [0], pieces, teacher)
    got = dict(zip(rows.ids[0], map(math.exp, rows.logprobs[0])))
    assert got == pytest.approx({0: 0.7 * 0.5, 3: 0.2})


def test_a_piece_ending_inside_a_teacher_token_counts_the_alternatives_that_start_with_it():
    pieces = _table(b"ab", b"c", b"a", b"b")
    lp = math.log
    teacher = [TeacherToken(b"a", lp(0.9), ((b"a", lp(0.9)),)),
               TeacherToken(b"bc", lp(0.4), ((b"bc", lp(0.4)), (b"bd", lp(0.3)), (b"e", lp(0.2))))]
    rows = align_rows(b"abc", [0, 1], pieces, teacher)
    assert dict(zip(rows.ids[0], map(math.exp, rows.logprobs[0]))) == pytest.approx({0: 0.9 * 0.7})
    # "c" inside "bc" after the prefix "b": bc and bd are possible, rescaled to keep the 0.1 uncovered
    assert dict(zip(rows.ids[1], map(math.exp, rows.logprobs[1]))) == pytest.approx({1: 0.4 * 0.9 / 0.7})


def test_a_split_multibyte_character_aligns_by_bytes():
    """'é' is C3 A9: the teacher holds it whole in 'café', the student as 'caf' + C3 + A9 (each a
    piece whose text alone is U+FFFD)."""
    e1, e2 = "é".encode()[:1], "é".encode()[1:]
    pieces = _table(b"caf", e1, e2, b"cafe", b"c")
    lp = math.log
    teacher = [TeacherToken("café".encode(), lp(0.6), (("café".encode(), lp(0.6)), (b"cafe", lp(0.3))))]
    rows = align_rows("café".encode(), [0, 1, 2], pieces, teacher)
    assert dict(zip(rows.ids[0], map(math.exp, rows.logprobs[0]))) == pytest.approx({0: 0.6, 3: 0.3})
    assert dict(zip(rows.ids[1], map(math.exp, rows.logprobs[1]))) == pytest.approx({1: 0.6 * 0.9 / 0.9})
    assert rows.ids[2] == [2] and math.exp(rows.logprobs[2][0]) == pytest.approx(0.6 * 0.9 / 0.6)


def test_a_teacher_token_holding_half_a_character_is_placed_by_its_bytes():
    """The teacher split 'é' across two tokens (byte-level BPE does), the student holds it whole."""
    e1, e2 = "é".encode()[:1], "é".encode()[1:]
    pieces = _table("é".encode(), b"x")
    teacher = teacher_tokens([{"token": "\ufffd", "logprob": -0.1, "bytes": list(e1)},
                              {"token": "\ufffd", "logprob": -0.2, "bytes": list(e2)}])
    rows = align_rows("é".encode(), [0], pieces, teacher)
    assert rows.ids == [[0]] and rows.logprobs[0][0] == pytest.approx(-0.3)


def test_entries_without_bytes_use_their_text_unless_it_is_lossy():
    assert teacher_tokens([{"token": "日本", "logprob": -0.5, "top": [{"token": "\ufffd", "logprob": -1.0}]}]) \
        == [TeacherToken("日本".encode(), -0.5, ())]
    with pytest.raises(AlignError, match="no bytes"):
        teacher_tokens([{"token": "\ufffd", "logprob": -0.5}])


@pytest.mark.parametrize("teacher_bytes", [[b"hel", b"lo!"], [b"hel"], [b"<s>", b"hello"]])
def test_tokens_that_spell_other_bytes_are_refused(teacher_bytes):
    """A teacher that spells another text (a BOS included in its tokens, a cut answer) is an
    AlignError: the caller trains that record with CE only, never on shifted rows."""
    pieces = _table(b"hello")
    teacher = [TeacherToken(b, -0.1) for b in teacher_bytes]
    with pytest.raises(AlignError, match="do not spell"):
        align_rows(b"hello", [0], pieces, teacher)


def test_special_tokens_never_receive_carried_mass():
    """A teacher alternative spelling the student's EOS text followed by more is not the stop
    token: its first piece is the plain "<"."""
    pieces = StudentPieces([b"a", b"b", b"<|im_end|>", b"<"], special={2})
    teacher = [TeacherToken(b"ab", -0.1, ((b"ab", -0.1), (b"<|im_end|>\n", -3.0)))]
    rows = align_rows(b"ab", [0, 1], pieces, teacher)
    assert rows.ids[0] == [0, 3]
    assert pieces.first_piece(b"<|im_end|>") == 3
