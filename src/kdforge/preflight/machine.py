"""The parts that cost nothing: `config` (the seed's config validation) and `memory` (the
estimate for the configured student against this machine), and the shrunk student `training`
runs when the configured one cannot fit here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from kdforge.config import Config, check_config
from kdforge.model.memory import GB, MB, Estimate, Setup, alternatives, estimate, lora_setup
from kdforge.preflight.report import Item, failed, passed, warned

FIT_SHARE = 0.9  # of free memory a training run may plan to use (allocator slack, the OS, the loader)
# A shrunk student only proves the pipeline: its three short runs must take seconds, even on CPU.
SHRUNK_MAX_PARAMS = 5_000_000
SHRUNK_MAX_SEQ, SHRUNK_MAX_BATCH, SHRUNK_MAX_ACCUM = 128, 2, 2


# ----------------------------------------------------------------------------- config

def check_config_item(cfg: Config, merged: dict) -> Item:
    """Every path exists or is marked as created later; batch and sequence lengths sane."""
    problems = check_config(cfg, for_run=False)
    io, t = cfg.io, cfg.train
    later = [s for s in io.train_shards + io.eval_shards if not Path(s).is_file()]
    out_dir = Path(io.output_dir)
    tok = io.tokenizer_path or (cfg.model.path and f"{cfg.model.path} (the model's own)")
    batch = t.micro_batch_size * t.grad_accum
    evidence = (f"tokenizer {tok}; train shards {len(io.train_shards)}"
                + (f" ({len(later)} not there yet: created by kdforge generate: {', '.join(later)})" if later else
                   " (all present)")
                + f"; output_dir {out_dir} ({'exists' if out_dir.exists() else 'created by the run'})"
                + f"; batch {t.micro_batch_size} x {t.grad_accum} = {batch}; sequence lengths {t.seq_lengths}"
                + (" (curriculum short to long)" if len(t.seq_lengths) > 1 else ""))
    if problems:
        fields = ", ".join(sorted({f for f, _ in problems}))
        return failed("config", evidence + "; problems: " + "; ".join(f"{f}: {m}" for f, m in problems),
                      f"fix {fields} in the config (kdforge config validate lists every problem)",
                      problems=[list(p) for p in problems])
    return passed("config", evidence, batch=batch, seq_lengths=t.seq_lengths, later=later)


# ----------------------------------------------------------------------------- memory

@dataclass
class Student:
    """The student the training part builds: the configured one, or a shrunk copy."""

    numbers: dict | None  # model section numbers for a shrunk student (None: as configured)
    setup: Setup
    note: str | None  # why it is not the configured student, said plainly


def free_memory() -> tuple[int, str]:
    """(bytes free, where): the GPU training would use, else this machine's available RAM."""
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on GPU 0 ({torch.cuda.get_device_name(0)})"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024, "available CPU RAM (no GPU)"
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free CPU RAM (no GPU)"


def training_setup(cfg: Config, on_gpu: bool) -> Setup:
    """How `kdforge train` would train this config here: dtype as the session picks it (bf16
    autocast on a GPU, fp32 on CPU), batch, longest sequence, LoRA, checkpointing."""
    if cfg.model.dtype != "auto":
        dtype = cfg.model.dtype
    else:
        dtype = "bfloat16" if on_gpu and cfg.train.bf16 is not False else "float32"
    return Setup(micro_batch=cfg.train.micro_batch_size, seq_len=max(cfg.train.seq_lengths), dtype=dtype,
                 gradient_checkpointing=cfg.train.gradient_checkpointing,
                 lora=lora_setup(cfg.model.lora))


def model_cfg(cfg: Config, tokenizer_vocab: int | None):
    """(ModelCfg, vocab) of the configured student (numbers, preset or `model.path`)."""
    from kdforge.model.memory import cfg_from_hf_config

    if cfg.model.path:
        mc = cfg_from_hf_config(json.loads((Path(cfg.model.path) / "config.json").read_text()))
    else:
        mc = cfg.model.model_cfg()
    return mc, mc.vocab_size or tokenizer_vocab or 32000


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


def check_memory(cfg: Config, tokenizer_vocab: int | None) -> tuple[Item, Student]:
    """The estimate (weights, gradients, optimizer, activations) against free memory here."""
    import torch

    free, where = free_memory()
    on_gpu = torch.cuda.is_available() and cfg.train.device in ("auto", "cuda")
    setup = training_setup(cfg, on_gpu)
    mc, vocab = model_cfg(cfg, tokenizer_vocab)
    est = estimate(mc, setup, vocab)
    room = int(free * FIT_SHARE)
    b = est.breakdown()
    evidence = (f"estimate {_size(est.total)} ({est.params:,} params; weights {_size(b['weights'])}, gradients "
                f"{_size(b['gradients'])}, optimizer {_size(b['optimizer'])}, activations {_size(b['activations'])} "
                f"at batch {setup.micro_batch} x {setup.seq_len} tokens, {setup.dtype}) vs {_size(free)} {where}")
    nums = dict(estimate_bytes=est.total, free_bytes=free, params=est.params, breakdown=b)
    if est.total <= room:
        return passed("memory", evidence + f": fits with {_size(room - est.total)} to spare", **nums), \
            Student(None, setup, None)
    fitting = [(label, e) for label, e in alternatives(mc, setup, vocab)[1:] if e.total <= room]
    fix = ("train it on a machine with at least " + _size(int(est.total / FIT_SHARE)) + " free"
           + ("; or here: " + "; ".join(f"{label} ({_size(e.total)})" for label, e in fitting[:3]) if fitting else "")
           + " (kdforge estimate-memory --config ... shows every option)")
    small, small_setup, small_est = shrink(mc, setup, vocab, room, on_gpu)
    note = (f"the configured student ({est.params:,} params, {_size(est.total)}) cannot fit this machine "
            f"({_size(free)} {where}); training runs the same architecture shrunk to {small.n_layers} layers, "
            f"d_model {small.d_model}, {small.n_heads} heads ({small.n_kv_heads} kv) x {small.d_head}, ffn "
            f"{small.ffn_dim} ({small_est.params:,} params, {_size(small_est.total)}) at batch "
            f"{small_setup.micro_batch} x {small_setup.seq_len} (grad_accum at most {SHRUNK_MAX_ACCUM}): it proves "
            "the pipeline, not the real run's memory")
    numbers = dict(dtype=cfg.model.dtype if on_gpu else "float32", preset=None, path=None, lora=None,
                   **{f: getattr(small, f) for f in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head",
                                                     "vocab_size", "ffn_dim", "rope_theta", "tie_embeddings")},
                   max_seq_len=max(small.max_seq_len, small_setup.seq_len))
    return warned("memory", evidence + ": does not fit", fix, **nums, shrunk=numbers), \
        Student(numbers, small_setup, note)


def shrink(mc, setup: Setup, vocab: int, room: int, on_gpu: bool):
    """The same architecture (GQA ratio, head size, vocab) with fewer layers and a smaller width,
    halved until it fits `room` bytes and is small enough to train 5 steps quickly."""
    c = mc.resolved(vocab)
    st = replace(setup, micro_batch=min(setup.micro_batch, SHRUNK_MAX_BATCH),
                 seq_len=min(setup.seq_len, SHRUNK_MAX_SEQ), lora=None, dtype=setup.dtype if on_gpu else "float32")
    while True:
        e: Estimate = estimate(c, st, vocab)
        if (e.total <= room and e.params <= SHRUNK_MAX_PARAMS) or (c.n_layers == 1 and c.d_model <= 64):
            return c, st, e
        heads = max(1, c.n_heads // 2)
        kv = max(1, min(heads, c.n_kv_heads // 2 if c.n_kv_heads > 1 else 1))
        while heads % kv:
            kv -= 1
        c = replace(c, n_layers=max(1, c.n_layers // 2), d_model=max(64, c.d_model // 2), n_heads=heads,
                    n_kv_heads=kv, ffn_dim=max(64, (c.ffn_dim // 2 + 63) // 64 * 64))
