"""`kdforge demo --student-tokenizer own`: the student's own tokenizer (demo/own.py) and what the
demo says about each student (issue 23 Done-when, issue 24 §5)."""

from __future__ import annotations

import filecmp

from conftest import cli_here


def test_own_tokenizers_are_deterministic_and_not_the_teachers(tmp_path):
    """Both own tokenizers come out the same every time and differ from the teacher's: other ids
    for the same bytes; student-own keeps a spaced letter whole, student-own-bytes splits it."""
    from transformers import AutoTokenizer

    from kdforge.demo import TEACHER_DIR
    from kdforge.demo.own import own_tokenizer
    from kdforge.train.cross_scoring import same_tokenizer

    teacher = AutoTokenizer.from_pretrained(str(TEACHER_DIR))
    text = "<|im_start|>user\nSort: q d m<|im_end|>\n<|im_start|>assistant\nd m q<|im_end|>"
    for split, letter in ((False, ["Ġq"]), (True, ["Ġ", "q"])):
        a = own_tokenizer(tmp_path / f"a{split}", split_letters=split)
        if not split:
            b = own_tokenizer(tmp_path / f"b{split}", split_letters=split)
            assert filecmp.cmp(a / "tokenizer.json", b / "tokenizer.json", shallow=False)
        tok = AutoTokenizer.from_pretrained(str(a))
        assert not same_tokenizer(tok, teacher)
        pieces = tok.convert_ids_to_tokens(tok(" q")["input_ids"])
        assert pieces == letter
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and ids != teacher(text)["input_ids"]
        assert len(tok) <= 300  # the student's embedding stays the teacher-tokenizer student's size


def test_student_lines_say_real_losses_never_a_zero_final_loss():
    """The per-student line names the last dataset step's CE and, on-policy, the last on-policy
    divergence: never 'final loss 0.0000' (an on-policy step's loss has no CE in it)."""
    from kdforge.demo.run import _student_line

    base = {"steps": 300, "tokens": 1234, "seconds": 12.0, "accuracy": 0.8, "scored_tokens": 5000}
    op = _student_line({**base, "model": "student-op", "on_policy_steps": 90, "final_ce": 0.0123, "final_kd": 0.0})
    ce = _student_line({**base, "model": "student-ce", "on_policy_steps": 0, "final_ce": 0.0456, "final_kd": None})
    assert "final CE 0.012 nats/token, last on-policy JSD 0.0000" in op and "90 on-policy steps" in op
    assert "final CE 0.046 nats/token; exact match 80.0%" in ce and "on-policy" not in ce
    assert "final loss" not in op + ce
    tiny = _student_line({**base, "model": "student-ce", "on_policy_steps": 0, "final_ce": 2.13e-05, "final_kd": None})
    assert "final CE 2.1e-05 nats/token" in tiny  # a CE that rounds to 0.000 is still shown (the demo's CE student)


def test_demo_help_says_how_many_students():
    r = cli_here("demo", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "train three students" in text and "two with --fast" in text and "--student-tokenizer" in text


def test_an_unknown_student_tokenizer_is_exit_2(tmp_path):
    r = cli_here("demo", "--fast", "--student-tokenizer", "mine", "--workdir", tmp_path / "w")
    assert r.returncode == 2 and "--student-tokenizer" in r.stdout + r.stderr, r.stdout + r.stderr
