"""Cross-tokenizer on-policy on the demo's sort task: the demo's on-policy student on the teacher's
tokenizer vs the same recipe on a tokenizer of its own (issue 23: >= 90% of the same-tokenizer result).

    python benchmarks/onpolicy_cross_tokenizer.py [--seeds 0 1 2] [--students student-op student-own]
                                                  [--fast] [--workdir DIR]

Each student is `kdforge demo`'s own (`demo.run.train_student`, FULL settings unless --fast): 250
greedy teacher answers (here made in-process, as `kdforge generate --temperature 0` would store
them), 600 steps of 32, half the steps on-policy (the student answers free train-split prompts at
T 1, the teacher loaded in-process scores them, generalized JSD beta 0.5), the other half CE on the
answers; greedy exact match on the 200 held-out prompts.
- `student-op`: the teacher's tokenizer (a spaced letter is one token, " q");
- `student-own`: its own byte-level BPE (`demo/own.py`: 290 tokens, other merges and ids; the spaced
  letters whole, the chat words in pieces); the teacher scores its text in the teacher's tokens and
  the rows are carried back by bytes (`train/cross_scoring.py`, `data/align.py`);
- `student-own-bytes`: an own BPE (300 tokens) whose merges no spaced letter uses: " q" is " " + "q",
  an answer twice the tokens, every letter's row carried from inside a teacher token;
- `student-ce`: CE alone, for the gap.

Prints exact match per seed, median, spread (max - min), and own / same (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _data(work: Path, n: int) -> Path:
    """The teacher's greedy answers to the demo's first n train prompts, as generate stores text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.demo import TEACHER_DIR
    from kdforge.demo.chat import greedy_answers
    from kdforge.demo.settings import FULL
    from kdforge.demo.task import make_prompts

    model = AutoModelForCausalLM.from_pretrained(str(TEACHER_DIR), dtype=torch.float32, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(str(TEACHER_DIR), trust_remote_code=False)
    prompts = make_prompts(n, FULL.seed, "train")
    answers = greedy_answers(model, tok, [r["prompt"] for r in prompts], FULL.max_new_tokens)
    path = work / "answers.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "teacher_text": a.strip()}) + "\n"
                            for r, a in zip(prompts, answers)))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--students", nargs="+", default=["student-op", "student-own"],
                    choices=["student-ce", "student-op", "student-own", "student-own-bytes"])
    ap.add_argument("--fast", action="store_true", help="the demo's --fast settings (300 steps)")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from kdforge.demo.run import train_student
    from kdforge.demo.settings import FAST, FULL
    from kdforge.demo.task import make_prompts

    torch.set_num_threads(1)
    s = FAST if a.fast else FULL
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kdforge-crosstok-"))
    work.mkdir(parents=True, exist_ok=True)
    data = _data(work, s.n_samples)
    pool = work / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in make_prompts(s.n_pool, s.seed + 1, "train")))
    print(f"{s.n_samples} teacher answers, {s.steps} steps; work dir {work}", flush=True)
    acc: dict[str, list[float]] = {}
    for seed in a.seeds:
        for name in a.students:
            run = work / f"seed{seed}"
            run.mkdir(exist_ok=True)
            t0 = time.perf_counter()
            r = train_student(a.fast, str(run), str(data), name, str(pool), seed=seed, log=lambda m: None)
            acc.setdefault(name, []).append(r["accuracy"])
            print(f"  {name} seed {seed}: exact match {r['accuracy']:.3f}, {r['on_policy_steps']} on-policy steps, "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    print("\n| student | exact match per seed | median | spread |\n|---|---|---:|---:|")
    for name, xs in acc.items():
        print(f"| {name} | {' / '.join(f'{x:.1%}' for x in xs)} | {statistics.median(xs):.1%} | "
              f"{max(xs) - min(xs):.1%} |")
    if "student-op" in acc and "student-own" in acc:
        ratio = statistics.median(acc["student-own"]) / max(statistics.median(acc["student-op"]), 1e-9)
        print(f"\nown tokenizer / same tokenizer (medians): {ratio:.1%} ({'meets' if ratio >= 0.9 else 'misses'} "
              "the >= 90% goal)")


if __name__ == "__main__":
    main()
