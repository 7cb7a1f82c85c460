"""Toy KD data for `kdforge smoke` and examples: short, checkable prompt/answer pairs in
generate's output format (no teacher needed)."""

from __future__ import annotations

import random

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa"]


def toy_records(n: int, seed: int = 0) -> list[dict]:
    """n deterministic records: additions, word sorting and word reversal."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            prompt, answer, source = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", "math"
        elif kind == 1:
            ws = rng.sample(WORDS, 4)
            prompt, answer, source = f"Sort these words: {' '.join(ws)}", " ".join(sorted(ws)), "reasoning"
        else:
            w = rng.choice(WORDS)
            prompt, answer, source = f"Spell '{w}' backwards.", w[::-1], "writing"
        out.append({"id": f"toy-{seed}-{i}", "prompt": prompt, "teacher_text": answer,
                    "metadata": {"source": source, "model": "toy"}})
    return out
