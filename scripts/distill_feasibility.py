"""Feasibility prototype for `kdforge demo`: can a student with <= 1/4 of the shipped teacher's
parameters reach >= 90% of its exact-match accuracy by distillation, in the demo's time?

Plain PyTorch, in one process (not the product: the demo goes through `kdforge serve`,
`kdforge generate` and `kdforge train`). Steps, each timed (wall seconds and CPU seconds):

1. teacher data: N train prompts of `kdforge.demo.task`, answered greedily by the shipped
   teacher (batched), keeping the top-k logprobs of every answer token;
2. two students of the same shape and seed, trained on the teacher's answers:
   CE only, and CE + sparse top-k forward KL (K+1 buckets: the teacher's top-k tokens plus a
   "rest" bucket holding the remaining probability mass, on both sides; T = 1), mixed as
   (1 - kd_weight) * CE + kd_weight * KL;
3. greedy exact-match accuracy of teacher and both students on the held-out eval prompts.

Run (repository root, venv active). CPU seconds on one thread, measured: full ~70 (teacher
data 5, each student 30, evals < 1), --fast ~35 (data 1.3, each student 15); wall time grows
with the load of shared cores. One torch thread by default (on shared cores two spin: 10x slower).

    python scripts/distill_feasibility.py                        # the demo's full settings
    python scripts/distill_feasibility.py --fast                 # the test suite's settings
    python scripts/distill_feasibility.py --steps 300 --seed 1   # any setting overridden
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdforge.demo import EVAL_FILE, TEACHER_DIR
from kdforge.demo.chat import example_ids, greedy_answers, prompt_text
from kdforge.demo.settings import FAST, FULL
from kdforge.demo.task import evaluate, make_prompts
from kdforge.model import ModelCfg, build_student

STUDENT_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
RUN_KEYS = ("n_samples", "steps", "batch_size", "lr", "warmup", "n_eval", "top_k", "kd_weight", "seed")


def parse_args() -> argparse.Namespace:
    """Defaults come from `kdforge.demo.settings` (FULL, or FAST with --fast); flags override."""
    p = argparse.ArgumentParser(description="Distillation feasibility prototype for kdforge demo.")
    p.add_argument("--teacher", type=Path, default=TEACHER_DIR)
    p.add_argument("--eval", type=Path, default=EVAL_FILE)
    p.add_argument("--fast", action="store_true", help="the --fast demo's settings")
    for k in RUN_KEYS:
        p.add_argument("--" + k.replace("_", "-"), type=type(getattr(FULL, k)), default=None,
                       help=f"full: {getattr(FULL, k)}, fast: {getattr(FAST, k)}")
    for k in STUDENT_KEYS:
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None,
                       help=f"student; full: {getattr(FULL.student, k)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    base = FAST if args.fast else FULL
    for k in RUN_KEYS:
        if getattr(args, k) is None:
            setattr(args, k, getattr(base, k))
    for k in STUDENT_KEYS:
        if getattr(args, k) is None:
            setattr(args, k, getattr(base.student, k))
    return args


class Clock:
    """Wall and CPU seconds since construction (CPU time counts all threads)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 1),
                "cpu_s": round(time.process_time() - self.cpu, 1)}


# ---------------------------------------------------------------- 1. teacher data


@torch.no_grad()
def teacher_samples(teacher, tok, prompts: list[str], top_k: int, batch_size: int = 250) -> list[dict]:
    """Greedy answers with the top-k (token id, logprob) of each answer token (EOS excluded,
    as an OpenAI-style server reports the content tokens only)."""
    teacher.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        seqs = [tok(prompt_text(tok, p), add_special_tokens=False)["input_ids"] for p in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
        mask = (ids != tok.pad_token_id).long()
        g = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
        logp = torch.stack(g.logits, 1).float().log_softmax(-1)  # (batch, new tokens, vocab)
        top_lp, top_id = logp.topk(top_k, -1)
        for b, p in enumerate(chunk):
            new = g.sequences[b, width:].tolist()
            n = new.index(tok.eos_token_id) if tok.eos_token_id in new else len(new)
            out.append({"prompt": p, "answer_ids": new[:n], "text": tok.decode(new[:n]),
                        "top_id": top_id[b, :n], "top_lp": top_lp[b, :n]})
    return out


def kd_tensors(tok, samples: list[dict], top_k: int) -> dict[str, torch.Tensor]:
    """Right-padded training tensors. Targets live in shifted space: position j predicts token
    j+1. `labels` covers answer + EOS (CE); `kd_mask` marks the answer tokens (top-k KL)."""
    rows = []
    for s in samples:
        ids, n_prompt = example_ids(tok, s["prompt"], s["text"])
        rows.append((ids, n_prompt, s))
    width = max(len(r[0]) for r in rows)
    n = len(rows)
    t = {"ids": torch.full((n, width), tok.pad_token_id), "mask": torch.zeros(n, width, dtype=torch.long),
         "labels": torch.full((n, width - 1), -100), "kd_mask": torch.zeros(n, width - 1, dtype=torch.bool),
         "top_id": torch.zeros(n, width - 1, top_k, dtype=torch.long),
         "top_lp": torch.full((n, width - 1, top_k), -1e4)}
    misaligned = 0
    for i, (ids, n_prompt, s) in enumerate(rows):
        t["ids"][i, :len(ids)] = torch.tensor(ids)
        t["mask"][i, :len(ids)] = 1
        t["labels"][i, n_prompt - 1:len(ids) - 1] = torch.tensor(ids[n_prompt:])
        answer = ids[n_prompt:-1]
        if answer != s["answer_ids"]:  # re-tokenised text differs from the generated tokens
            misaligned += 1
            continue
        m = len(answer)
        t["kd_mask"][i, n_prompt - 1:n_prompt - 1 + m] = True
        t["top_id"][i, n_prompt - 1:n_prompt - 1 + m] = s["top_id"]
        t["top_lp"][i, n_prompt - 1:n_prompt - 1 + m] = s["top_lp"]
    t["misaligned"] = misaligned
    return t


# ---------------------------------------------------------------- 2. students


def sparse_topk_kl(logits: torch.Tensor, top_id: torch.Tensor, top_lp: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student) over K+1 buckets, per position (nats).

    logits (..., V); top_id/top_lp (..., K): the teacher's top-k token ids and logprobs. The
    "rest" bucket holds 1 - sum(top-k) of each distribution."""
    s_lp = logits.float().log_softmax(-1).gather(-1, top_id)  # (..., K)
    p = top_lp.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - s_lp.exp().sum(-1)).clamp_min(1e-8)
    kl = (p * (top_lp - s_lp)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl


def train_student(cfg: ModelCfg, tok, data: dict, args, kd_weight: float) -> tuple:
    """Train one student from seed `args.seed`; returns (model, loss curve)."""
    model = build_student(cfg, vocab_size=len(tok), seed=args.seed, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, bos_token_id=None)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    n = data["ids"].size(0)
    order, pos, curve = torch.randperm(n, generator=gen), 0, []
    model.train()
    for step in range(args.steps):
        lr = args.lr * (step + 1) / args.warmup if step < args.warmup else \
            args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + args.batch_size > n:  # next epoch
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        width = int(data["mask"][idx].sum(1).max())  # trim the batch to its longest row
        logits = model(input_ids=data["ids"][idx, :width], attention_mask=data["mask"][idx, :width]).logits[:, :-1]
        labels = data["labels"][idx, :width - 1]
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        loss, kl = ce, torch.zeros(())
        if kd_weight > 0:
            kd_mask = data["kd_mask"][idx, :width - 1]
            kl = sparse_topk_kl(logits[kd_mask], data["top_id"][idx, :width - 1][kd_mask],
                                data["top_lp"][idx, :width - 1][kd_mask]).mean()
            loss = (1 - kd_weight) * ce + kd_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            curve.append({"step": step, "loss": round(loss.item(), 4), "ce": round(ce.item(), 4),
                          "kl": round(kl.item(), 4)})
    return model, curve


# ---------------------------------------------------------------- 3. main


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(str(args.teacher))
    teacher = AutoModelForCausalLM.from_pretrained(str(args.teacher))
    evals = [json.loads(line) for line in open(args.eval, encoding="utf-8")][:args.n_eval]
    res = {"settings": {k: v for k, v in vars(args).items() if not isinstance(v, Path)}}

    c = Clock()
    prompts = [r["prompt"] for r in make_prompts(args.n_samples, seed=args.seed, split="train")]
    samples = teacher_samples(teacher, tok, prompts, args.top_k)
    data = kd_tensors(tok, samples, args.top_k)
    res["teacher_data"] = {**c.read(), "samples": len(samples), "misaligned": data["misaligned"],
                           "answer_tokens": int(data["kd_mask"].sum())}
    print("teacher data:", res["teacher_data"], flush=True)

    c = Clock()
    res["teacher"] = {"params": teacher.num_parameters(),
                      "accuracy": evaluate(lambda ps: greedy_answers(teacher, tok, ps), evals), **c.read()}
    print("teacher eval:", res["teacher"], flush=True)

    cfg = ModelCfg(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                   n_kv_heads=args.n_kv_heads, vocab_size=None, ffn_dim=args.ffn_dim, max_seq_len=64)
    for name, w in (("ce", 0.0), ("kd", args.kd_weight)):
        c = Clock()
        student, curve = train_student(cfg, tok, data, args, w)
        train_t = c.read()
        c = Clock()
        acc = evaluate(lambda ps: greedy_answers(student, tok, ps), evals)
        res[name] = {"params": student.num_parameters(), "accuracy": acc, "train": train_t,
                     "eval": c.read(), "final_loss": curve[-1]}
        print(f"student {name}:", res[name], flush=True)

    t, ratio = res["teacher"], res["kd"]["params"] / res["teacher"]["params"]
    print(f"\nparams: teacher {t['params']:,}  student {res['kd']['params']:,} ({ratio:.3f}x)")
    print(f"exact match: teacher {t['accuracy']:.3f}  CE-only {res['ce']['accuracy']:.3f}  "
          f"KD {res['kd']['accuracy']:.3f}  ->  KD/teacher {res['kd']['accuracy'] / max(t['accuracy'], 1e-9):.3f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
