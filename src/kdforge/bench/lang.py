"""The broad task's language: short sentences from a small stochastic grammar with real branching.

    prompt (user message): "Tell: sea calm"
    answer:                "a quiet fish swims near the old boat ."

Why: on the sort task the teacher is near-certain (top-1 probability ~1), so its top-k carries
almost nothing beyond its text. Here most answer positions have several likely next words
(determiner, optional adjective, a topic's nouns, verbs, optional clauses): a teacher trained on
this language has a broad next-token distribution, which is where off-policy top-k KD is known
to pay (a sample shows one word; the teacher's top-k shows the distribution it was drawn from).

The prompt picks a topic (which nouns and verbs are likely) and a mood (which adjectives are);
everything else is drawn. Entropy is ~1.5-2.5 nats per sentence position of choice.
"""

from __future__ import annotations

import random

TOPICS = {
    "sea": (["fish", "boat", "wave", "crab", "shell", "gull"], ["swims", "floats", "dives", "sails"]),
    "farm": (["cow", "horse", "barn", "hen", "field", "dog"], ["runs", "eats", "sleeps", "walks"]),
    "city": (["car", "bus", "street", "shop", "tower", "cat"], ["waits", "moves", "stands", "shines"]),
    "forest": (["tree", "fox", "owl", "bear", "path", "deer"], ["hides", "grows", "climbs", "hunts"]),
    "sky": (["bird", "cloud", "star", "moon", "kite", "plane"], ["flies", "glows", "drifts", "turns"]),
}
MOODS = {
    "calm": ["quiet", "soft", "slow", "old", "small"],
    "happy": ["bright", "warm", "big", "kind", "young"],
    "sad": ["grey", "cold", "lonely", "tired", "dark"],
}
SHARED_NOUNS = ["child", "man", "light"]
DETS = (["the", "a", "one", "every"], [0.45, 0.3, 0.15, 0.1])
PREPS = ["near", "under", "over", "behind"]
TRANSITIVE = ["sees", "likes", "finds", "follows"]


def prompts() -> list[str]:
    """Every prompt of the task (15: topic x mood); held-out data are fresh samples of them."""
    return [f"Tell: {t} {m}" for t in TOPICS for m in MOODS]


def _np(rng: random.Random, topic: str, mood: str) -> list[str]:
    nouns = TOPICS[topic][0]
    out = [rng.choices(*DETS)[0]]
    if rng.random() < 0.5:
        out.append(rng.choice(MOODS[mood]))
    out.append(rng.choice(nouns) if rng.random() < 0.85 else rng.choice(SHARED_NOUNS))
    return out


def sentence(prompt: str, rng: random.Random) -> str:
    """One sentence of the language for `prompt` ("Tell: TOPIC MOOD"), drawn with `rng`."""
    topic, mood = prompt.split(": ", 1)[1].split()
    words = _np(rng, topic, mood)
    if rng.random() < 0.6:
        words.append(rng.choice(TOPICS[topic][1]))
        if rng.random() < 0.5:
            words += [rng.choice(PREPS)] + _np(rng, topic, mood)
    else:
        words += [rng.choice(TRANSITIVE)] + _np(rng, topic, mood)
    if rng.random() < 0.25:
        words += ["and", rng.choice(TOPICS[topic][1])]
    return " ".join(words) + " ."


def make_records(n: int, seed: int = 0) -> list[dict]:
    """`n` {"prompt", "answer"} records, prompts cycling through `prompts()` in a seeded order."""
    rng = random.Random(f"kdforge-bench-lang:{seed}")
    ps = prompts()
    return [{"prompt": (p := rng.choice(ps)), "answer": sentence(p, rng)} for _ in range(n)]
