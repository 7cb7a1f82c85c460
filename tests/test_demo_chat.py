"""The demo's chat prompts are the training data's: kdforge.demo.chat renders through dataset.prompt_text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kdforge.data.dataset import prompt_text as dataset_prompt_text
from kdforge.demo import TEACHER_DIR
from kdforge.demo.chat import example_ids, prompt_text

PROMPTS = ["Sort: q d m", "Trie : é ö ß — 漢字 🙂"]


@pytest.fixture()
def tok():
    return AutoTokenizer.from_pretrained(TEACHER_DIR)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_demo_prompt_is_the_datasets_with_the_chat_template(tok, prompt):
    assert tok.chat_template
    msgs = [{"role": "user", "content": prompt}]
    assert prompt_text(tok, prompt) == dataset_prompt_text(tok, msgs)
    assert prompt_text(tok, prompt) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_demo_prompt_without_a_template_is_the_datasets_fallback(tok, prompt):
    tok.chat_template = None
    msgs = [{"role": "user", "content": prompt}]
    assert prompt_text(tok, prompt) == dataset_prompt_text(tok, msgs) == f"User: {prompt}\nAssistant: "


def test_example_ids_start_with_the_rendered_prompt(tok):
    prompt, answer = PROMPTS[1], "ß é ö"
    ids, n_prompt = example_ids(tok, prompt, answer)
    rendered = tok(dataset_prompt_text(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False)
    assert ids[:n_prompt] == rendered["input_ids"]
    assert ids[-1] == tok.eos_token_id
