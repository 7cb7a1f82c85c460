"""The demo's synthetic task: sort a handful of letters.

    prompt (user message): "Sort: q d m a x"
    answer:                "a d m q x"

Why this task:
- One right answer, checked exactly (string equality after `strip`), so exact-match accuracy
  is a clean number for teacher and students alike.
- Every letter is one token: letters are space-separated, and the byte-level pre-tokenizer
  cuts " q" off as a word of its own, so no BPE merge can glue two letters together.
- A tiny transformer learns it well: each answer token is "the smallest prompt letter above
  the previous answer letter" -- an attention lookup plus a comparison. Addition needs carry
  chains (hard for a ~0.3M-parameter student in a few minutes of CPU) and a made-up knowledge
  base can only be learnt for the facts the teacher happened to be asked about.
- Answers are short (3-8 letters), so generating from the teacher over HTTP and training the
  students fit in the demo's minutes on 2 CPU cores.

Train and eval splits are disjoint by letter *set*: a set of letters belongs to one split
only (a hash decides), so no eval answer ever appears in training data, in any order.
"""

from __future__ import annotations

import hashlib
import random
import string
from typing import Callable, Sequence

ALPHABET = string.ascii_lowercase
MIN_LETTERS, MAX_LETTERS = 3, 8  # letters per prompt, inclusive
EVAL_SHARE = 10  # one letter set in 10 belongs to the eval split
SPLITS = ("train", "eval")


def split_of(letters: Sequence[str]) -> str:
    """The split a set of letters belongs to ("train" or "eval"); order does not matter."""
    key = "".join(sorted(letters)).encode()
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return "eval" if h % EVAL_SHARE == 0 else "train"


def make_record(letters: Sequence[str], rid: str) -> dict:
    """A prompt record: {"id", "prompt", "answer", "messages"} (messages = the chat prompt)."""
    prompt = "Sort: " + " ".join(letters)
    return {"id": rid, "prompt": prompt, "answer": " ".join(sorted(letters)),
            "messages": [{"role": "user", "content": prompt}]}


def make_prompts(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct prompt records of `split`, the same for the same (n, seed, split).

    Letters in a prompt are distinct; the prompt list has no repeated prompt. A longer list
    with the same seed starts with the shorter one (records are drawn one by one).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"kdforge-demo-sort:{split}:{seed}")
    out, seen = [], set()
    while len(out) < n:
        letters = rng.sample(ALPHABET, rng.randint(MIN_LETTERS, MAX_LETTERS))
        key = "".join(letters)
        if key in seen or split_of(letters) != split:
            continue
        seen.add(key)
        out.append(make_record(letters, f"{split}-{seed}-{len(out)}"))
    return out


def check(record: dict, answer_text: str) -> bool:
    """True when `answer_text` is the exact answer (surrounding whitespace ignored)."""
    return answer_text.strip() == record["answer"]


def evaluate(generate_fn: Callable[[list[str]], list[str]], records: list[dict]) -> float:
    """Exact-match accuracy in [0, 1] of `generate_fn` (prompt strings -> answer strings,
    called once with every prompt so that it can batch) over `records`."""
    if not records:
        raise ValueError("no eval records")
    answers = generate_fn([r["prompt"] for r in records])
    if len(answers) != len(records):
        raise ValueError(f"generate_fn returned {len(answers)} answers for {len(records)} prompts")
    return sum(check(r, a) for r, a in zip(records, answers)) / len(records)
