"""The benchmark's recipes: each is a kdforge training config (run by `run_training`, no loop of its own).

    ce            cross-entropy on the teacher's answers only
    topk_t1       CE + sparse top-k forward KL on the stored logprobs (top-5; langx: top-20 carried
                  onto the student's own tokens by bytes), T = 1 (kd_weight: the task's)
    topk_t2       the same at T = 2
    dense         CE + forward KL to the local teacher's full logits (`teacher.path`)
    onpolicy_rkl  half the steps CE on the answers, half on the student's own samples scored by
                  the local teacher (dense, in-process): reverse KL, as in FINDINGS.md
    onpolicy_jsd  the same with TRL's generalized JSD, beta 0.5
"""

from __future__ import annotations

from pathlib import Path

from kdforge.bench.tasks import Task

RECIPES = ("ce", "topk_t1", "topk_t2", "dense", "onpolicy_rkl", "onpolicy_jsd")
ON_POLICY_FRACTION = 0.5  # share of steps on-policy: the prototype's setting


def is_on_policy(recipe: str) -> bool:
    return recipe.startswith("onpolicy")


def _loss(task: Task, recipe: str) -> dict:
    if recipe == "ce":
        return {"kind": "ce"}
    if recipe in ("topk_t1", "topk_t2", "dense"):
        return {"kind": "fkl", "kd_weight": task.kd_weight, "temperature": 2.0 if recipe == "topk_t2" else 1.0}
    # on-policy: a dataset step is CE alone (kd_weight 0), an on-policy step the divergence alone
    return {"kind": "rkl", "kd_weight": 0.0} if recipe == "onpolicy_rkl" else {"kind": "jsd", "kd_weight": 0.0, "beta": 0.5}


def config(task: Task, recipe: str, data: Path, pool: Path, out: Path, steps: int, seed: int,
           tokenizer: Path | None = None) -> dict:
    """The training config dict of one cell; the student and optimiser are the demo's. `tokenizer`:
    the student's (default: the teacher's)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    st = task.student
    cfg = {
        "model": {"preset": None, "d_model": st.d_model, "n_layers": st.n_layers, "n_heads": st.n_heads,
                  "n_kv_heads": st.n_kv_heads, "d_head": st.d_head, "ffn_dim": st.ffn_dim,
                  "max_seq_len": st.max_seq_len},
        "io": {"tokenizer_path": str(tokenizer or task.teacher_dir), "train_shards": [str(data)], "output_dir": str(out)},
        "loss": _loss(task, recipe),
        "train": {"micro_batch_size": 32, "grad_accum": 1, "seq_lengths": [st.max_seq_len],
                  "max_steps": steps, "lr": 3e-3, "warmup_steps": min(30, steps // 10), "schedule": "cosine",
                  "min_lr_ratio": 0.1, "weight_decay": 0.1, "betas": [0.9, 0.95], "grad_clip": 1.0,
                  "save_steps": steps, "save_total_limit": 1, "seed": seed,
                  # every step's record in metrics.jsonl: the on-policy teacher tokens are summed from it
                  "log_steps": 1 if is_on_policy(recipe) else 50},
    }
    if recipe == "dense" or is_on_policy(recipe):
        cfg["teacher"] = {"path": str(task.teacher_dir)}
    if is_on_policy(recipe):
        cfg["on_policy"] = {"fraction": ON_POLICY_FRACTION, "max_new_tokens": task.max_new_tokens,
                            "temperature": 1.0, "prompts": [str(pool)]}
    return cfg
