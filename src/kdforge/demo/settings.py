"""The demo's numbers: how much teacher data, which students, how long to train them.

FULL is `kdforge demo`, FAST is `kdforge demo --fast` (the test suite's run). The budget is scarce
on purpose: with 2,000 teacher answers every recipe reaches the teacher (~99%) and the demo shows
nothing; with 250, CE alone stops near 80% and on-policy distillation (the student answers, the
teacher scores its tokens) reaches ~96-98% (../../shared/FINDINGS.md, benchmarks/onpolicy_sort.py,
`kdforge bench distill`: on-policy JSD 0.977 vs CE 0.803 at 250 answers, 600 steps, 3 seeds).
The teacher has 1,258,112 parameters (0.99 exact match on the 200 held-out prompts); the student
235,584 (0.187x).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kdforge.model import ModelCfg


def student_cfg() -> ModelCfg:
    """The student: 235,584 parameters at the teacher's vocab (300), under 1/4 of the teacher."""
    return ModelCfg(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=None,
                    ffn_dim=192, max_seq_len=64)


@dataclass(frozen=True)
class DemoSettings:
    """One demo run's settings; the student is trained once per recipe with them."""

    n_samples: int  # teacher answers generated (train split prompts, seed `seed`)
    steps: int  # optimizer steps per student
    batch_size: int  # sequences per step (<= 27 tokens each)
    n_eval: int  # held-out prompts scored (first n of assets/eval.jsonl)
    # CE-only exact match varies this much (max - min) across student seeds at this budget and
    # steps: a difference inside it is not called a win
    ce_spread: float
    kd_student: bool = True  # also train CE + sparse top-k forward KL on the stored logprobs
    lr: float = 3e-3  # peak AdamW lr; betas (0.9, 0.95), weight decay 0.1, grad clip 1.0
    warmup: int = 30  # steps of linear warmup, then cosine to lr / 10
    top_k: int = 5  # teacher logprobs kept per answer token
    kd_weight: float = 0.5  # loss = (1 - w) * CE + w * sparse top-k forward KL
    temperature: float = 1.0
    max_new_tokens: int = 24  # answers are <= 8 letters + EOS = 9 tokens
    # on-policy student: each step, with this probability, 32 pool prompts are answered by the
    # student (T 1, <= 12 tokens) and the teacher (in-process, dense) scores them: generalized JSD
    # (beta 0.5) on the student's own tokens; the other steps are CE on the teacher's answers
    on_policy_fraction: float = 0.5
    on_policy_tokens: int = 12
    n_pool: int = 5000  # on-policy prompts (train split, free: no teacher answer is generated)
    seed: int = 0
    student: ModelCfg = field(default_factory=student_cfg)


# ce_spread: bench distill (seeds 0-2) 0.790-0.815; benchmarks/onpolicy_sort.py (seeds 0-2) 0.79-0.815
FULL = DemoSettings(n_samples=250, steps=600, batch_size=32, n_eval=200, ce_spread=0.05)
FAST = DemoSettings(n_samples=250, steps=300, batch_size=32, n_eval=100, ce_spread=0.12, kd_student=False,
                    on_policy_fraction=0.3)
