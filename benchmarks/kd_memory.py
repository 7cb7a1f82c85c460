"""Peak CPU memory of dense-teacher KD: plain `loss_sums` vs `chunked_loss_sums`.

Each variant runs in a fresh subprocess (so one variant's freed-but-cached memory cannot hide
another's peak) and reports the growth of ru_maxrss (peak resident set) across one forward +
backward of the loss: student and teacher lm_head matmuls, the loss, and the gradients w.r.t. the
hidden states and the student head. Inputs are allocated, and a 16-token warm-up is run, before the
baseline is read, so the number is the loss's own working memory (plus the [V, D] weight gradient,
the same in every variant).

Each variant runs twice. "live" sets MALLOC_MMAP_THRESHOLD_=1 MiB so every large tensor is its own
mmap, returned to the OS when freed: RSS then follows the tensors alive at once. "glibc" keeps the
default allocator, whose dynamic threshold (up to 32 MiB) lets freed chunk-sized buffers stay on the
heap: what a default process shows, allocator caching included.

    OMP_NUM_THREADS=2 python benchmarks/kd_memory.py            # vocab 32k, seq 1024, batch 1
    python benchmarks/kd_memory.py --kind jsd --temperature 2 --chunk-sizes 64 256 1024
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from kdforge.train.losses import chunked_loss_sums, loss_sums

    torch.manual_seed(0)
    n, v, d = args.batch * args.seq, args.vocab, args.d_model
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) / d**0.5).requires_grad_(True)
    teacher_hidden = torch.randn(n, 2 * d)
    teacher_weight = torch.randn(v, 2 * d) / (2 * d) ** 0.5
    targets = torch.randint(0, v, (n,))
    kw = {"kind": args.kind, "temperature": args.temperature}

    def step(m: int):
        if args.chunk_size == 0:  # plain: full logits, as the loop builds them for loss_sums
            with torch.no_grad():
                teacher_logits = F.linear(teacher_hidden[:m], teacher_weight)
            s = loss_sums(F.linear(hidden[:m], weight), targets[:m], teacher_logits=teacher_logits, **kw)
        else:
            s = chunked_loss_sums(hidden[:m], weight, targets[:m], chunk_size=args.chunk_size,
                                  teacher_hidden=teacher_hidden[:m], teacher_lm_head_weight=teacher_weight, **kw)
        (0.5 * s.ce + 0.5 * s.kd).backward()
        return s

    step(16)  # warm-up: kernels, thread pools, the weight's .grad buffer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    s = step(n)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (after - before) / 1024, "seconds": seconds, "kd": s.kd.item(), "ce": s.ce.item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--kind", default="fkl", choices=["fkl", "rkl", "jsd"])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)  # worker mode; 0 = plain
    args = ap.parse_args()
    if args.chunk_size is not None:
        print(json.dumps(worker(args)))
        return

    n = args.batch * args.seq
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    base = [sys.executable, __file__, "--vocab", str(args.vocab), "--seq", str(args.seq),
            "--batch", str(args.batch), "--d-model", str(args.d_model),
            "--kind", args.kind, "--temperature", str(args.temperature)]
    print(f"dense KD {args.kind}, T={args.temperature}: N={n} tokens (batch {args.batch} x seq {args.seq}), "
          f"V={args.vocab}, d_model={args.d_model}; one fp32 [N, V] tensor = {n * args.vocab * 4 / 2**20:.0f} MiB")
    print(f"{'variant':<14}{'live MiB':>10}{'x plain':>9}{'glibc MiB':>11}{'x plain':>9}"
          f"{'fwd+bwd s':>11}{'kd sum':>12}")
    plain = None
    for chunk in [0, *args.chunk_sizes]:
        runs = []
        for malloc in ({"MALLOC_MMAP_THRESHOLD_": str(2**20)}, {}):
            out = subprocess.run([*base, "--chunk-size", str(chunk)], env={**env, **malloc},
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        plain = plain or runs
        live, glibc = runs
        name = "plain" if chunk == 0 else f"chunked {chunk}"
        print(f"{name:<14}{live['peak_mib']:>10.0f}{live['peak_mib'] / plain[0]['peak_mib']:>9.2f}"
              f"{glibc['peak_mib']:>11.0f}{glibc['peak_mib'] / plain[1]['peak_mib']:>9.2f}"
              f"{live['seconds']:>11.2f}{live['kd']:>12.2f}")

if __name__ == "__main__":
    main()
