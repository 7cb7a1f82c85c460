"""Chat-format encoding and batched greedy answering for the demo's models.

The demo's models speak ChatML (`kdforge.data.tokenizer.CHAT_TEMPLATE`): a prompt is one user
message, the answer is the assistant turn, ended by `<|im_end|>` (the EOS token). The prompt is
rendered by `kdforge.data.dataset.prompt_text`, the one rendering training and on-policy use.
"""

from __future__ import annotations

import torch

from kdforge.data import dataset


def prompt_text(tokenizer, prompt: str) -> str:
    """The chat text up to and including the assistant header (what the model continues): one user
    message through `dataset.prompt_text` (its plain fallback where the tokenizer has no template)."""
    return dataset.prompt_text(tokenizer, [{"role": "user", "content": prompt}])


def example_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + EOS, and the prompt's length in tokens.

    Training targets are ids[n_prompt:] (the answer and its `<|im_end|>`); the template's
    trailing newline after `<|im_end|>` is left out, as generation stops at EOS.
    """
    p = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return p + a + [tokenizer.eos_token_id], len(p)


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 24,
                   batch_size: int = 100) -> list[str]:
    """Greedy answers to `prompts` (decoded, special tokens dropped), batched with left padding."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    pad = tokenizer.pad_token_id
    for i in range(0, len(prompts), batch_size):
        seqs = [tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
                for p in prompts[i:i + batch_size]]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return out
