"""Train the teacher of `kdforge bench distill --task lang`: shipped in `src/kdforge/bench/assets/lang/`.

What: the stochastic-grammar language of `kdforge.bench.lang` (short sentences, a topic and a
mood per prompt, real branching at most words). Same recipe as scripts/train_example_teacher.py
(whose batching, loss and schedule this reuses): byte-level BPE + ChatML tokenizer trained on the
language (every word one token), a Llama GQA teacher from `ModelCfg`, plain PyTorch AdamW, fresh
grammar samples every step, cross-entropy on the answer tokens. The teacher learns the grammar's
distribution, so its next-token distribution is broad: held-out CE near the grammar's entropy.

    assets/lang/  model.safetensors, config.json, generation_config.json, tokenizer files,
                  training.json (settings, loss curve, held-out CE vs the grammar, wall time)

Run (repository root, project venv):  python scripts/train_bench_teacher.py [--steps 800]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kdforge.bench import lang
from kdforge.data.tokenizer import train_tokenizer
from kdforge.model import ModelCfg, build_student
from train_example_teacher import answer_loss, batch_tensors, lr_at  # same folder: sys.path[0]

ASSETS = Path(__file__).resolve().parents[1] / "src" / "kdforge" / "bench" / "assets" / "lang"


# The teacher's shape and schedule: a third of the sort teacher's parameters suffices for the grammar.
DEFAULTS = {"seed": 0, "vocab_size": 400, "d_model": 96, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
            "ffn_dim": 256, "steps": 800, "batch_size": 64, "lr": 2e-3, "warmup": 50, "weight_decay": 0.1,
            "threads": 1}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the bench's broad-distribution teacher.")
    p.add_argument("--out", type=Path, default=ASSETS)
    for name, value in DEFAULTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    # ---- tokenizer: trained on the language, plus the chat roles so each is one token
    texts = [t for r in lang.make_records(5000, seed=args.seed + 1000) for t in (r["prompt"], r["answer"])]
    tok = train_tokenizer(texts + ["user", "assistant"] * 50, args.vocab_size, args.out, min_frequency=2,
                          model_max_length=64)
    print(f"tokenizer: {len(tok)} tokens")

    # ---- data: fresh grammar samples every step; a held-out sample (another seed) for the CE
    train = lang.make_records(args.steps * args.batch_size, seed=args.seed)
    held = lang.make_records(512, seed=args.seed + 1)

    cfg = ModelCfg(**{k: getattr(args, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")},
                   vocab_size=None, max_seq_len=64)
    special = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": None}
    model = build_student(cfg, vocab_size=len(tok), seed=args.seed, **special)
    n_params = model.num_parameters()
    print(f"teacher: {n_params:,} parameters ({cfg})")
    # weight decay on matrices only (norm gains and biases keep theirs), as for the sort teacher
    groups = [{"params": [p for p in model.parameters() if (p.dim() >= 2) == matrix],
               "weight_decay": args.weight_decay if matrix else 0.0} for matrix in (True, False)]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))

    # ---- train
    model.train()
    curve = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        loss = answer_loss(model, *batch_tensors(tok, train[step * args.batch_size:(step + 1) * args.batch_size]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            curve.append({"step": step, "loss": round(loss.item(), 5)})
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:6.1f}s", flush=True)

    # ---- held-out CE (nats per answer token, EOS included): the teacher's fit to the grammar
    model.eval()
    with torch.no_grad():
        held_ce = answer_loss(model, *batch_tensors(tok, held)).item()
    print(f"held-out CE {held_ce:.4f} nats/token")
    model.generation_config.do_sample = True
    model.generation_config.max_new_tokens = 24
    model.save_pretrained(args.out)
    info = {"task": "stochastic grammar (kdforge.bench.lang)", "parameters": n_params, "model": vars(cfg),
            "args": {k: v for k, v in vars(args).items() if k != "out"}, "heldout_ce": round(held_ce, 5),
            "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__, "loss_curve": curve}
    (args.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
