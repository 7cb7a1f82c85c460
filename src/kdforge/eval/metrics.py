"""The per-answer numbers of `kdforge eval`: exact match, SQuAD-style token F1, perplexity.

Pure functions over strings and token lists; the token-level losses (CE, KL) come from the
trainer's own `DistillObjective` (see `kdforge.eval.run`), never from a second implementation.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

# exp() of a CE above this (nats) overflows a float: the perplexity is then reported as infinite.
_MAX_LOG = 709.0


def matches(prediction: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace (the demo's `task.check` rule)."""
    return prediction.strip() == reference.strip()


def token_f1(prediction: Sequence[int], reference: Sequence[int]) -> float:
    """Bag-of-tokens F1 (SQuAD's rule, over tokenizer ids instead of words): 2PR / (P + R) of the
    multiset overlap. Both empty: 1.0; one empty: 0.0."""
    if not prediction or not reference:
        return float(len(prediction) == len(reference))
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    p, r = common / len(prediction), common / len(reference)
    return 2 * p * r / (p + r)


def perplexity(ce: float) -> float:
    """exp(ce), ce in nats per token; inf where it overflows."""
    return math.exp(ce) if ce < _MAX_LOG else math.inf


def mean(values: Sequence[float]) -> float | None:
    """Arithmetic mean, None for no values (a number that was not measured is not 0)."""
    return sum(values) / len(values) if values else None
