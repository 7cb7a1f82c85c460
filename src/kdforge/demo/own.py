"""The demo's students with a tokenizer of their own (`kdforge demo --student-tokenizer own`).

The shipped teacher's tokenizer (300 tokens) makes each spaced letter one token (" q") and "user",
"assistant" one token each. The students' own are byte-level BPEs trained here
(`kdforge tokenizer train`'s trainer), deterministic, with other merges and other ids:
- `own_tokenizer(out)` (student-own): 290 tokens trained on the task's answers and a few prompts;
  it merges " q" too (with another id), not "user" or "assistant" (u s e r, a s s i s t an t);
- `own_tokenizer(out, split_letters=True)` (student-own-bytes, benchmark only): 300 tokens trained
  on sorted letters written together ("admqx"): merges ("ad", "mq", ...) no spaced letter ever
  uses, so " q" is " " + "q" and an answer is twice the teacher's tokens: every answer letter's row
  is carried from inside a teacher token (conditioned on the space already emitted).
Nothing about the teacher's ids carries over: the teacher scores the student's text in its own
tokens and its rows come back by bytes (`train/cross_scoring.py`).
"""

from __future__ import annotations

from pathlib import Path

from kdforge.demo.task import make_prompts


def own_tokenizer(out: str | Path, split_letters: bool = False) -> Path:
    """Train a student's own tokenizer into `out` (the same files every time)."""
    from kdforge.data.tokenizer import train_tokenizer

    recs = make_prompts(2000, 5, "train")
    if split_letters:
        texts, size = ["user", "assistant", "Sort:"] * 200 + ["".join(r["answer"].split()) for r in recs], 300
    else:
        texts, size = ["user", "assistant"] * 5 + [r["answer"] for r in recs] + [r["prompt"] for r in recs[:50]], 290
    train_tokenizer(texts, size, out, min_frequency=2)
    return Path(out)
