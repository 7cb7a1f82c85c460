"""On-policy `teacher_tokens` counts what the teacher scored, in ITS tokens (SPEC "On-policy
distillation": metrics carry "teacher tokens and $ spent"; a user compares them with the teacher's
bill). A teacher with another tokenizer re-tokenises the student's text (train/cross_scoring.py):
the count is its tokens, not the student's. Real tokenizers trained here, a tiny real student and
teacher, a real `kdforge serve` on 127.0.0.1 priced at $1 per million input tokens (so the $ it
charged, times a million, is the number of tokens it billed)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_cross_on_policy import _cfg, _priced, _seq, fine_tok_dir, other_tok_dir, served, teacher  # noqa: F401

PROMPTS = ["Trie ça: ü é — 東京の天気?", "Sort: q d m — café naïve 🙂"]


@pytest.fixture(scope="module")
def student(tmp_path_factory, fine_tok_dir):  # noqa: F811
    """A tiny random student on the fine tokenizer (many more tokens than the teacher for the same text)."""
    from kdforge.model import ModelCfg, write_student

    out = tmp_path_factory.mktemp("fine_student")
    write_student(ModelCfg(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_head=16, vocab_size=None,
                           ffn_dim=64, max_seq_len=256), fine_tok_dir, out, seed=0)
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), AutoTokenizer.from_pretrained(str(out))


def _on_policy(model, tok, **kw):
    from kdforge.config import OnPolicySection
    from kdforge.train.on_policy import OnPolicy

    return OnPolicy(OnPolicySection(fraction=1.0, max_new_tokens=10), 0, model, tok, micro_batch_size=2, **kw)


def _prompts(tok) -> list[list[list[int]]]:
    return [[_seq(tok, p, "", eos=False)[0] for p in PROMPTS]]


def test_over_http_another_tokenizer_counts_the_teachers_billed_tokens(student, served, tmp_path):  # noqa: F811
    """teacher.url with another tokenizer: teacher_tokens is the number of tokens the teacher billed
    ($ charged x 1e6 at $1/M), which is fewer than the student's (finer) tokens of the same text."""
    from kdforge.train.cross_scoring import CrossPricedScorer, over_http
    from kdforge.train.on_policy import StepScorer

    model, tok = student
    scorer = over_http(_cfg(served), StepScorer(_priced(served, tmp_path)), tok, None)
    assert isinstance(scorer.scorer, CrossPricedScorer)
    op = _on_policy(model, tok, scorer=scorer)
    batches = op.replace(3, _prompts(tok))
    student_count = int(batches[0]["attention_mask"].sum())
    billed = round(op.last.usd * 1e6)
    assert billed > 0 and op.last.cached == 0
    assert op.last.teacher_tokens == billed, (op.last.teacher_tokens, billed, student_count)
    assert op.last.teacher_tokens < student_count  # the student's tokenizer is the finer one
    # scoring the same step again: answered by the cache ($0), the teacher's count unchanged
    op.replace(3, _prompts(tok))
    assert op.last.cached == 2 and op.last.usd == 0 and op.last.teacher_tokens == billed
    op.close()


def test_over_http_the_same_tokenizer_still_counts_the_sent_ids(tiny_model_dir, served, tmp_path):
    """teacher.url with the student's tokenizer: teacher_tokens is the ids sent, which is the bill."""
    from kdforge.train.cross_scoring import over_http
    from kdforge.train.on_policy import StepScorer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    op = _on_policy(model, tok, scorer=over_http(_cfg(served), StepScorer(_priced(served, tmp_path)), tok, None))
    batches = op.replace(5, _prompts(tok))
    sent = int(batches[0]["attention_mask"].sum())
    assert op.last.teacher_tokens == sent == round(op.last.usd * 1e6)
    op.close()


def test_a_local_teacher_with_another_tokenizer_counts_its_own_tokens(student, teacher):  # noqa: F811
    """teacher.path with another tokenizer (a LocalCrossTeacher, as the session builds it): the count
    is the teacher's tokens of the text it scores; with the same tokenizer, the student's ids."""
    from kdforge.train.cross_scoring import LocalCrossTeacher, StudentSide

    model, tok = student
    tmodel, ttok = teacher
    local = LocalCrossTeacher(tmodel, ttok, StudentSide(tok), 5)
    op = _on_policy(model, tok, teacher=local)
    batch = op.replace(7, _prompts(tok))[0]
    rows = [batch["input_ids"][b][batch["attention_mask"][b].bool()].tolist() for b in range(2)]
    texts = [local.text(ids) for ids in rows]
    want = sum(len(ttok(t)["input_ids"]) for t in texts)
    assert "東京" in texts[0] and op.last.teacher_tokens == want
    assert want < sum(map(len, rows))
    same = _on_policy(model, tok, teacher=tmodel)  # a plain dense teacher: the ids it is given
    batch = same.replace(7, _prompts(tok))[0]
    assert same.last.teacher_tokens == int(batch["attention_mask"].sum())

