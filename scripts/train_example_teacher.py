"""Train the demo's teacher: the small model shipped in `src/kdforge/demo/assets/`.

What: the synthetic task of `kdforge.demo.task` (sort 3-8 letters). This script trains the
tokenizer (byte-level BPE + ChatML, `kdforge.data.tokenizer.train_tokenizer`; every letter is
one token), builds a Llama GQA teacher from `ModelCfg` (`kdforge.model.build_student`), trains
it with a plain PyTorch loop (AdamW, warmup + cosine, cross-entropy on the answer tokens only,
prompts in the chat template, fresh task samples every step), evaluates it greedily on the
held-out eval prompts and writes:

    assets/teacher/   model.safetensors, config.json, generation_config.json, tokenizer files
    assets/eval.jsonl held-out prompts with their exact answers ({"id","prompt","answer","messages"})
    assets/teacher/training.json  the settings, the loss curve, the accuracy, the wall time

How long: 1500 steps of 64 sequences, ~0.3 s of CPU a step on one thread: 452 CPU seconds
(7.5 minutes) measured; wall time grows when other jobs share the cores (24 minutes on a
2-core machine loaded ~3x over). One torch thread by default: on shared cores two threads spin
against each other (10x slower per step measured), and the result depends on the thread count.
Reproducible: seeded, single process, deterministic CPU kernels; a rerun with the defaults
wrote a bit-identical model.safetensors (torch 2.13.0+cpu). Held-out exact match: 0.99.

Run (from the repository root, in the project's venv):

    python scripts/train_example_teacher.py                              # writes the assets
    python scripts/train_example_teacher.py --out /tmp/teacher --steps 200  # a quick try
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kdforge.data.tokenizer import train_tokenizer
from kdforge.demo.chat import example_ids, greedy_answers
from kdforge.demo.task import evaluate, make_prompts
from kdforge.model import ModelCfg, build_student

ASSETS = Path(__file__).resolve().parents[1] / "src" / "kdforge" / "demo" / "assets"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the demo teacher and write its assets.")
    p.add_argument("--out", type=Path, default=ASSETS, help="assets folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=320, help="upper bound; BPE stops at ~300")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--ffn-dim", type=int, default=384)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--n-eval", type=int, default=200, help="held-out prompts written and scored")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; the shipped teacher used 1 (results depend on it)")
    return p.parse_args()


def batch_tensors(tokenizer, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 outside the answer."""
    seqs = [example_ids(tokenizer, r["prompt"], r["answer"]) for r in records]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (s, n_prompt) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, n_prompt:len(s)] = torch.tensor(s[n_prompt:])
    return ids, mask, labels


def answer_loss(model, ids, mask, labels) -> torch.Tensor:
    """Mean cross-entropy (nats/token) over answer tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def lr_at(step: int, args) -> float:
    """Linear warmup, then cosine from lr to lr/10 (per optimizer step)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0, cpu0 = time.time(), time.process_time()
    teacher_dir = args.out / "teacher"
    teacher_dir.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer: trained on task text, plus the chat roles so each is one token
    tok_recs = make_prompts(5000, seed=args.seed + 1000, split="train")
    texts = [t for r in tok_recs for t in (r["prompt"], r["answer"])] + ["user", "assistant"] * 50
    tok = train_tokenizer(texts, args.vocab_size, teacher_dir, min_frequency=2, model_max_length=64)
    print(f"tokenizer: {len(tok)} tokens")

    # ---- data: a fresh task sample for every training example; eval prompts held out
    train = make_prompts(args.steps * args.batch_size, seed=args.seed, split="train")
    evals = make_prompts(args.n_eval, seed=args.seed, split="eval")

    # ---- model
    cfg = ModelCfg(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                   n_kv_heads=args.n_kv_heads, vocab_size=None, ffn_dim=args.ffn_dim, max_seq_len=64)
    model = build_student(cfg, vocab_size=len(tok), seed=args.seed, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, bos_token_id=None)
    n_params = model.num_parameters()
    print(f"teacher: {n_params:,} parameters ({cfg})")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    # ---- train
    model.train()
    curve = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        batch = train[step * args.batch_size:(step + 1) * args.batch_size]
        loss = answer_loss(model, *batch_tensors(tok, batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            curve.append({"step": step, "loss": round(loss.item(), 5), "lr": g["lr"]})
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {g['lr']:.2e}  {time.time() - t0:6.1f}s",
                  flush=True)
    train_s, train_cpu_s = time.time() - t0, time.process_time() - cpu0

    # ---- eval (greedy, exact match) and save
    acc = evaluate(lambda ps: greedy_answers(model, tok, ps), evals)
    print(f"held-out exact match: {acc:.3f} on {len(evals)} prompts")
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 24
    model.save_pretrained(teacher_dir)
    with open(args.out / "eval.jsonl", "w", encoding="utf-8") as f:
        for r in evals:
            f.write(json.dumps(r) + "\n")
    info = {"task": "sort letters (kdforge.demo.task)", "parameters": n_params, "model": vars(cfg),
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "eval_exact_match": acc, "n_eval": len(evals),
            "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu_s, 1),
            "torch": torch.__version__, "loss_curve": curve}
    (teacher_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
