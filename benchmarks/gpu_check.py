"""The GPU path in one command: bf16 training, MFU, memory against the estimate, KD memory,
DDP / FSDP2 resume parity, serving. Under 8 minutes on one GPU.

    python benchmarks/gpu_check.py --out gpu_check.json         # on a GPU machine
    python benchmarks/gpu_check.py --cpu --tiny --out x.json    # the same code on CPU, tiny (tests)

Sections (one table, one JSON file):
- train 125m / 1b: `kdforge.train.runner.run_training` on a synthetic KD data set (random words,
  a BPE tokenizer trained here), `train.packing: true`, bf16 autocast, seq 2048. tokens/s =
  micro_batch x seq_len / median step time (packed rows, padding counted: what the GPU computed),
  steps after the first 3 (kernels, allocator warm-up). MFU = tokens/s x (6 N + 12 L d_attn T)
  / peak, N = parameters without the input embedding, L layers, d_attn = heads x head_dim, T =
  seq_len (PaLM appendix B; the attention term counts the full T x T, not the causal half).
  Peak: the GPU's dense bf16 TFLOP/s from PEAK_TFLOPS by name, else a measured bf16 matmul.
  Peak memory (torch.cuda.max_memory_allocated) beside `kdforge estimate-memory`'s total.
- kd memory: dense-teacher KD loss forward+backward at vocab 128,256 over 2048 tokens, plain
  (`loss_sums` on full logits) vs `chunked_loss_sums`: peak allocated above the inputs; the two
  losses must agree.
- ddp / fsdp: `torchrun --nproc_per_node=<GPUs>` `kdforge train` 6 steps (checkpoints at 3 and
  6), then a second run resumed from checkpoint-3: its steps 4-6 must log the first run's losses
  (tolerance 1e-3 relative on GPU: bf16 kernels may reduce in another order). With one GPU the
  world size is 1, where kdforge trains without a DDP/FSDP wrapper (no process group).
- serve: `kdforge serve` on a random-init 125m Llama, completion tokens/s at concurrency
  1/16/64 (max_tokens 128, 5 s per cell), with `benchmarks/serve_throughput.py`'s client.

`--cpu --tiny`: the toy preset, seq 64, 4 steps, vocab 4096 for KD memory, world 1 DDP only,
the demo teacher served at c=1/4 for 0.3 s: it checks that the code runs, not the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "src"), str(HERE)]

# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets, without sparsity). Matched by name
# substring, first hit wins; an unlisted GPU gets a measured matmul peak instead.
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0),
               ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
               ("RTX 4090", 165.0), ("RTX 3090", 71.0))
KD_VOCAB, KD_TOKENS, KD_D = 128_256, 2048, 2048  # Llama-3 vocab, one 2048-token row, 1b's d_model


# ============================================================================ helpers

def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """KD records of random words (a Zipf-ish draw from 2,000 made-up words), 20-600 words."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    weights = [1 / (r + 1) for r in range(len(words))]

    def text(k: int) -> str:
        return " ".join(rng.choices(words, weights, k=k))

    return [{"prompt": text(rng.randint(10, 60)), "teacher_text": text(rng.randint(10, 540))} for _ in range(n)]


def build_data(work: Path, n: int, vocab: int) -> tuple[Path, Path]:
    """(tokenizer dir, train.jsonl) under `work`."""
    from kdforge.data.tokenizer import train_tokenizer

    records = synthetic_records(n)
    train_tokenizer([r["prompt"] + " " + r["teacher_text"] for r in records], vocab, work / "tokenizer")
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return work / "tokenizer", data


def train_cfg(work: Path, name: str, tok: Path, data: Path, preset: str, seq: int, micro: int, steps: int,
              gpu: bool, **train) -> dict:
    return {"model": {"preset": preset, "max_seq_len": seq},
            "io": {"tokenizer_path": str(tok), "train_shards": [str(data)], "output_dir": str(work / name)},
            "loss": {"kind": "ce"},
            "train": {"micro_batch_size": micro, "grad_accum": 1, "seq_lengths": [seq], "max_steps": steps,
                      "lr": 3e-4, "schedule": "constant", "save_steps": 10**6, "log_steps": 1, "packing": True,
                      "seed": 0, "device": "cuda" if gpu else "cpu", "bf16": gpu, **train}}


def read_metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def matmul_peak(torch, device: str, dtype) -> float:
    """Measured FLOP/s of a square matmul (8192 on GPU, 1024 on CPU), best of 5."""
    n = 8192 if device == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(torch, gpu: bool) -> tuple[float, str]:
    if gpu:
        name = torch.cuda.get_device_name(0)
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16 (datasheet)"
        f = matmul_peak(torch, "cuda", torch.bfloat16)
        return f, f"{name}: {f / 1e12:.0f} TFLOP/s measured bf16 matmul 8192^3"
    f = matmul_peak(torch, "cpu", torch.float32)
    return f, f"CPU: {f / 1e9:.1f} GFLOP/s measured fp32 matmul 1024^3"


# ============================================================================ sections

def check_training(work: Path, tok: Path, data: Path, args, peak: float) -> list[dict]:
    import torch

    from kdforge.config import from_dict
    from kdforge.model.memory import estimate
    from kdforge.preflight.machine import model_cfg, training_setup
    from kdforge.train.runner import run_training

    gpu = not args.cpu
    runs = [("toy", 64, 4, 4)] if args.tiny else [("125m", 2048, 8, 30), ("1b", 2048, 4, 30)]
    rows = []
    for preset, seq, micro, steps in runs:
        cfg = from_dict(train_cfg(work, f"train-{preset}", tok, data, preset, seq, micro, steps, gpu), "gpu_check")
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run_training(cfg, resume="none", log=lambda m: None)
        recs = read_metrics(Path(cfg.io.output_dir))
        warm = 1 if args.tiny else 3
        step_s = statistics.median(r["tokens"] / r["tokens_per_s"] for s, r in recs.items() if s > warm)
        mc, _ = model_cfg(cfg, None)
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(str(Path(cfg.io.output_dir) / f"checkpoint-{steps}"))
        n_all = mc.num_params(hf.vocab_size)
        n = n_all - hf.vocab_size * hf.hidden_size  # without the input embedding (a lookup, no FLOPs)
        attn = 12 * hf.num_hidden_layers * hf.num_attention_heads * hf.head_dim * seq
        tokens_s = micro * seq / step_s
        mfu = tokens_s * (6 * n + attn) / peak
        predicted = estimate(mc, training_setup(cfg, gpu), hf.vocab_size).total
        measured = torch.cuda.max_memory_allocated() if gpu else None
        rows.append(dict(section="train", name=f"{preset} packed seq {seq} x {micro}",
                         tokens_per_s=round(tokens_s, 1), mfu=round(mfu, 4), params=n_all, step_s=round(step_s, 4),
                         peak_memory_gb=round(measured / 1e9, 2) if measured else None,
                         estimate_gb=round(predicted / 1e9, 2), loss_last=recs[steps]["loss"]))
    return rows


def check_kd_memory(args) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from kdforge.train.losses import chunked_loss_sums, loss_sums

    gpu = not args.cpu
    dev, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    v, n, d = (4096, 64, 64) if args.tiny else (KD_VOCAB, KD_TOKENS, KD_D)
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device=dev, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, device=dev, dtype=dtype) / d**0.5).requires_grad_(True)
    t_hidden, t_weight = torch.randn(n, d, device=dev, dtype=dtype), torch.randn(v, d, device=dev, dtype=dtype) / d**0.5
    targets = torch.randint(0, v, (n,), device=dev)
    rows, losses = [], {}
    for name in ("plain", "chunked 512"):
        hidden.grad = weight.grad = None
        gc.collect()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        if name == "plain":
            with torch.no_grad():
                t_logits = F.linear(t_hidden, t_weight)
            s = loss_sums(F.linear(hidden, weight), targets, kind="fkl", teacher_logits=t_logits)
        else:
            s = chunked_loss_sums(hidden, weight, targets, chunk_size=512, kind="fkl",
                                  teacher_hidden=t_hidden, teacher_lm_head_weight=t_weight)
        (0.5 * s.ce + 0.5 * s.kd).backward()
        losses[name] = float(s.kd.detach())
        peak = (torch.cuda.max_memory_allocated() - base) if gpu else None
        rows.append(dict(section="kd memory", name=f"{name}, vocab {v}, {n} tokens",
                         peak_memory_gb=round(peak / 1e9, 3) if peak is not None else None, kd=round(losses[name], 5)))
    agree = abs(losses["plain"] - losses["chunked 512"]) <= 2e-2 * abs(losses["plain"]) + 1e-4
    rows[-1]["ok"] = agree
    return rows


def check_parallel(work: Path, tok: Path, data: Path, args) -> list[dict]:
    """torchrun kdforge train 6 steps, then resumed from checkpoint-3: steps 4-6 must match."""
    import torch

    gpu = not args.cpu
    world = max(torch.cuda.device_count(), 1) if gpu else 1
    modes = ["ddp"] if args.tiny else ["ddp", "fsdp"]
    preset, seq, micro = ("toy", 64, 2) if args.tiny else ("125m", 1024, 4)
    tol = 1e-5 if args.cpu else 1e-3
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                "-m", "kdforge", "train"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    rows = []
    for mode in modes:
        outs = {}
        for run in ("full", "resumed"):
            name = f"{mode}-{run}"
            cfg = train_cfg(work, name, tok, data, preset, seq, micro, 6, gpu, save_steps=3, fsdp=mode == "fsdp")
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            extra = ["--resume", str(work / f"{mode}-full" / "checkpoint-3")] if run == "resumed" else []
            t0 = time.perf_counter()
            p = subprocess.run([*torchrun, "--config", str(path), *extra], env=env, capture_output=True, text=True,
                               timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"{mode} {run}: exit {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}")
            outs[run] = (read_metrics(work / name), time.perf_counter() - t0)
        full, resumed = outs["full"][0], outs["resumed"][0]
        diff = max(abs(full[s]["loss"] - resumed[s]["loss"]) / max(abs(full[s]["loss"]), 1e-9) for s in (4, 5, 6))
        rows.append(dict(section="parallel", name=f"{mode} world {world}, {preset} seq {seq}: resume at 3",
                         world=world, resume_loss_rel_diff=diff, ok=diff <= tol and sorted(resumed) == [4, 5, 6],
                         seconds=round(outs["full"][1] + outs["resumed"][1], 1)))
    return rows


def check_serve(work: Path, args) -> list[dict]:
    from kdforge.model import PRESETS, write_student
    from kdforge.serve import launch
    from serve_throughput import EXAMPLE_TEACHER, run_cell

    if args.tiny:
        model_dir, levels, seconds, max_tokens = EXAMPLE_TEACHER, (1, 4), 0.3, 16
    else:
        model_dir = write_student(replace(PRESETS["125m"]), EXAMPLE_TEACHER, work / "serve-125m", seed=0)
        levels, seconds, max_tokens = (1, 16, 64), 5.0, 128
    extra = ["--device", "cpu"] if args.cpu else []
    rows = []
    with launch(model_dir, log_path=work / "serve.log", extra_args=extra) as server:
        asyncio.run(run_cell(server.base_url, server.model, 2, 0.0, max_tokens, first=1_000_000))  # warm-up
        for c in levels:
            tokens, n, wall, err = asyncio.run(run_cell(server.base_url, server.model, c, seconds, max_tokens, 0))
            rows.append(dict(section="serve", name=f"{model_dir.name} c={c} max_tokens {max_tokens}",
                             tokens_per_s=round(tokens / wall, 1), requests=n, ok=err is None and tokens > 0,
                             error=err))
    return rows


# ============================================================================ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the table as JSON here")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (fp32, no CUDA memory numbers)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: checks the code runs (the test suite)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    args = ap.parse_args()
    import tempfile

    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run on a GPU machine, or add --cpu --tiny to check the code on CPU")
    work = args.work or Path(tempfile.mkdtemp(prefix="kdforge-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    peak, peak_note = peak_flops(torch, not args.cpu)
    tok, data = build_data(work, 300 if args.tiny else 3000, 512 if args.tiny else 8000)
    rows = []
    for section in (lambda: check_training(work, tok, data, args, peak), lambda: check_kd_memory(args),
                    lambda: check_parallel(work, tok, data, args), lambda: check_serve(work, args)):
        t = time.perf_counter()
        got = section()
        got[0]["section_s"] = round(time.perf_counter() - t, 1)  # wall seconds of the whole section
        rows += got
    load = os.getloadavg()
    print(f"peak: {peak_note}")
    print("MFU = tokens/s x (6 N + 12 L d_attn T) / peak; N = parameters without the input embedding")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {time.perf_counter() - t0:.0f} s in all\n")
    cols = ["section", "name", "tokens_per_s", "mfu", "peak_memory_gb", "estimate_gb", "kd", "resume_loss_rel_diff",
            "ok", "section_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    if args.out:
        args.out.write_text(json.dumps(dict(peak_flops=peak, peak=peak_note, load=load, rows=rows,
                                            device=torch.cuda.get_device_name(0) if not args.cpu else "cpu",
                                            seconds=round(time.perf_counter() - t0, 1)), indent=1))
    if not all(r.get("ok", True) for r in rows):
        raise SystemExit("a check failed (ok False above)")


if __name__ == "__main__":
    main()
