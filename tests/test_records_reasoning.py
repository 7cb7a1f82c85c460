"""A thinking teacher's record (issue 23 item 2): `teacher_reasoning` is read whole and checked, and
`Record.training_response` gives what the student learns under `io.reasoning` (think | drop), in
the chat template's own thinking format where the template has one."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from hypothesis import given
from hypothesis import strategies as st

from kdforge.data.records import THINK_FORMAT, parse_record

# A template with its own thinking format (as Qwen3's renders `reasoning_content`), made distinct
# from kdforge's default so the test can tell which one was used.
OWN_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}"
    "{{ '<reason>' + m['reasoning_content'] + '</reason>' }}{% endif %}"
    "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PLAIN_TEMPLATE = OWN_TEMPLATE.replace("reasoning_content", "thinking")  # never set: no thinking format

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40).filter(str.strip)


def _rec(reasoning="Étape 1: 考える 🤔", answer="Die Antwort ist 42.", prompt="Warum? なぜ?"):
    obj = {"id": "x", "prompt": prompt, "teacher_text": answer, "messages": [{"role": "user", "content": prompt}]}
    if reasoning is not None:
        obj["teacher_reasoning"] = reasoning
    return parse_record(obj)


def test_think_trains_thinking_then_answer_and_drop_the_answer_alone():
    rec = _rec()
    assert rec.reasoning == "Étape 1: 考える 🤔"
    assert rec.training_response() == "<think>\nÉtape 1: 考える 🤔\n</think>\n\nDie Antwort ist 42."
    assert rec.training_response("drop") == "Die Antwort ist 42." == rec.response
    assert rec.thinking_prefix() == "<think>\nÉtape 1: 考える 🤔\n</think>\n\n" and rec.thinking_prefix("drop") == ""
    assert _rec(reasoning=None).training_response("think") == "Die Antwort ist 42."  # no thinking: the answer
    with pytest.raises(ValueError, match="io.reasoning"):
        rec.training_response("maybe")


@given(reasoning=TEXT, answer=TEXT)
def test_both_modes_keep_generated_text_whole(reasoning, answer):
    rec = _rec(reasoning, answer)
    assert rec.training_response("think") == THINK_FORMAT.format(reasoning=reasoning, answer=answer)
    assert rec.training_response("drop") == answer


def test_a_template_with_its_own_thinking_format_is_used(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rec = _rec()
    tok.chat_template = OWN_TEMPLATE
    resp = rec.training_response("think", tok)
    assert resp == "<reason>Étape 1: 考える 🤔</reason>Die Antwort ist 42."
    assert rec.thinking_prefix("think", tok) == "<reason>Étape 1: 考える 🤔</reason>"
    # prompt as the template renders it + this response + the end of turn = the whole conversation
    head = tok.apply_chat_template(rec.prompt_messages, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(rec.prompt_messages + [{"role": "assistant", "content": rec.response,
                                                           "reasoning_content": rec.reasoning}], tokenize=False)
    assert full == head + resp + "<|im_end|>\n"
    assert rec.training_response("drop", tok) == rec.response
    tok.chat_template = PLAIN_TEMPLATE
    assert rec.training_response("think", tok) == THINK_FORMAT.format(reasoning=rec.reasoning, answer=rec.response)


@pytest.mark.parametrize("bad", [["a", "b"], 42, {"text": "x"}])
def test_a_reasoning_that_is_not_text_is_a_named_error(tmp_path, bad):
    with pytest.raises(ValueError, match="teacher_reasoning"):
        _rec(reasoning=bad)
    path = tmp_path / "d.jsonl"
    good = {"prompt": "p", "teacher_text": "a", "teacher_reasoning": "r"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"teacher_reasoning": bad}) + "\n")
    p = run_cli("data", "validate", path)
    assert p.returncode == 2 and f"{path}:2" in p.stderr and "teacher_reasoning" in p.stderr, p.stderr
