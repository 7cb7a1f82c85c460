"""The shipped example behind `kdforge demo`: a synthetic task (`task`), a small trained teacher
with its tokenizer and held-out eval prompts (`assets/`), and the demo's settings (`settings`).

    assets/teacher/    a Llama GQA teacher as a Hugging Face folder (ChatML tokenizer inside),
                       trained by scripts/train_example_teacher.py; training.json says how well
    assets/eval.jsonl  held-out prompts with their exact answers
"""

from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_DIR = ASSETS / "teacher"
EVAL_FILE = ASSETS / "eval.jsonl"


def load_eval(n: int | None = None) -> list[dict]:
    """The first `n` (default all) held-out records: {"id", "prompt", "answer", "messages"}."""
    with open(EVAL_FILE, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n is not None else rows


def teacher_info() -> dict:
    """What the teacher's training wrote: parameters, eval exact match, settings, loss curve."""
    return json.loads((TEACHER_DIR / "training.json").read_text())
