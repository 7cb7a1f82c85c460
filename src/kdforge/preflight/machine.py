"""The parts that cost nothing: `config` (the seed's config validation) and `memory` (the
estimate for the configured student against this machine), and the shrunk student `training`
runs when the configured one cannot fit here. A `model.path` model (any family) is estimated as
`kdforge estimate-memory` does (traced from its config.json) and is never shrunk into another
architecture: when it does not fit, training runs it as it is at a smaller batch and sequence
(LoRA and gradient checkpointing if that is what it takes), or not at all.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

from kdforge.config import Config
from kdforge.config_checks import check_config
from kdforge.model.memory import (GB, MB, Estimate, LoraSetup, Setup, alternatives, estimate, estimate_model,
                                  hf_config, lora_field, lora_setup, model_alternatives)
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
    smaller: bool = False  # the configured model.path model at `setup`'s batch, sequence, LoRA, checkpointing
    skip: str | None = None  # why training cannot run here at all (a model.path model too big for any setup)
    skip_fix: str | None = None  # where it could

    @property
    def changed(self) -> bool:
        """Training runs something other than the configured student and setup."""
        return self.numbers is not None or self.smaller


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


GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")  # CUDA, ROCm, WSL's GPU


def trains_on_gpu(device: str = "auto") -> bool:
    """Whether `kdforge train` with this train.device puts the model on a GPU here. On Linux with no
    GPU device node, False without importing torch (seconds on a small machine)."""
    if device != "auto" and not device.startswith("cuda"):
        return False
    if sys.platform.startswith("linux") and not any(Path(p).exists() for p in GPU_NODES):
        return False
    import torch

    return torch.cuda.is_available()


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
    """(ModelCfg, vocab) of the configured kdforge student (numbers or preset; not `model.path`)."""
    mc = cfg.model.model_cfg()
    return mc, mc.vocab_size or tokenizer_vocab or 32000


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB"


def check_memory(cfg: Config, tokenizer_vocab: int | None) -> tuple[Item, Student]:
    """The estimate (weights, gradients, optimizer, activations) against free memory here."""
    free, where = free_memory()
    on_gpu = trains_on_gpu(cfg.train.device)
    setup = training_setup(cfg, on_gpu)
    room = int(free * FIT_SHARE)
    if cfg.model.path:
        return check_model_path_memory(cfg, setup, free, where, on_gpu)
    mc, vocab = model_cfg(cfg, tokenizer_vocab)
    est = estimate(mc, setup, vocab)
    evidence, nums = _evidence(est, setup, free, where)
    if est.total <= room:
        return passed("memory", evidence + f": fits with {_size(room - est.total)} to spare", **nums), \
            Student(None, setup, None)
    fix = _fix(est.total, [(label, e) for label, e in alternatives(mc, setup, vocab)[1:] if e.total <= room])
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


def _evidence(est, setup: Setup, free: int, where: str, what: str = "") -> tuple[str, dict]:
    """The memory item's evidence and numbers for an estimate (a student's or a model.path model's)."""
    b = est.breakdown()
    evidence = (f"estimate {_size(est.total)} ({what}{est.params:,} params; weights {_size(b['weights'])}, "
                f"gradients {_size(b['gradients'])}, optimizer {_size(b['optimizer'])}, activations "
                f"{_size(b['activations'])} at batch {setup.micro_batch} x {setup.seq_len} tokens, {setup.dtype}) "
                f"vs {_size(free)} {where}")
    return evidence, dict(estimate_bytes=est.total, free_bytes=free, params=est.params, breakdown=b)


def _fix(total: int, fitting: list, more: str = "") -> str:
    """Where it would fit, and which other setups fit here."""
    return ("train it on a machine with at least " + _size(int(total / FIT_SHARE)) + " free"
            + ("; or here: " + "; ".join(f"{label} ({_size(e.total)})" for label, e in fitting[:3]) if fitting
               else "") + more + " (kdforge estimate-memory --config ... shows every option)")


def check_model_path_memory(cfg: Config, setup: Setup, free: int, where: str, on_gpu: bool) -> tuple[Item, Student]:
    """`check_memory` for a `model.path` model of any family: traced from its config.json with the
    trainer's LoRA, as `kdforge estimate-memory --config` does. When it does not fit, training runs
    the same model at batch <= 2 x <= 128 tokens (then with LoRA r=8, then with gradient
    checkpointing, if that is what fits); when nothing fits, training is not run."""
    path = Path(cfg.model.path)
    targets = cfg.model.lora.target_modules if cfg.model.lora else None
    try:
        conf = hf_config(path)
        est = estimate_model(path, setup, targets, conf=conf)
    except (ValueError, OSError, KeyError) as e:  # PEFT's unknown target, a config.json transformers rejects
        field = lora_field(e) if setup.lora and isinstance(e, ValueError) else "model.path"
        return failed("memory", f"cannot build the model at {path} from its config.json: {e}",
                      f"fix {field} (kdforge estimate-memory --config ... says the same)"), Student(None, setup, None)
    room = int(free * FIT_SHARE)
    what = f"a {conf.model_type!r} model, "
    evidence, nums = _evidence(est, setup, free, where, what)
    if est.total <= room:
        return passed("memory", evidence + f": fits with {_size(room - est.total)} to spare", **nums), \
            Student(None, setup, None)
    small = replace(setup, micro_batch=min(setup.micro_batch, SHRUNK_MAX_BATCH),
                    seq_len=min(setup.seq_len, SHRUNK_MAX_SEQ), dtype=setup.dtype if on_gpu else "float32")
    tries = [small] + ([replace(small, lora=LoraSetup())] if small.lora is None else [])
    tries.append(replace(tries[-1], gradient_checkpointing=True))
    runs = [(st, estimate_model(path, st, targets if st.lora else None, conf=conf)) for st in tries]
    fits = [(st, e) for st, e in runs if e.total <= room]
    b0, e0 = runs[0]
    more = (f"; or train.micro_batch_size {b0.micro_batch} and train.seq_lengths up to {b0.seq_len} "
            f"({_size(e0.total)})" if e0.total <= room and b0 != setup else "")
    fix = _fix(est.total, [(label, e) for label, e in model_alternatives(path, setup, targets, conf)[1:]
                           if e.total <= room], more)
    item = warned("memory", evidence + ": does not fit", fix, **nums, smaller=None)
    if not fits:
        need = runs[-1][1].total
        why = (f"the configured model ({what}{est.params:,} params) cannot train here: even at batch "
               f"{runs[-1][0].micro_batch} x {runs[-1][0].seq_len} with LoRA and gradient checkpointing it needs "
               f"{_size(need)} ({_size(free)} {where}); a model.path model is not shrunk into another one")
        return item, Student(None, setup, None, skip=why,
                             skip_fix=f"run kdforge preflight --only training on a machine with at least "
                                      f"{_size(int(need / FIT_SHARE))} free")
    st, e = fits[0]
    how = ((f" with LoRA r={st.lora.r} (all-linear)" if st.lora and not setup.lora else "")
           + (" with gradient checkpointing" if st.gradient_checkpointing and not setup.gradient_checkpointing
              else ""))
    note = (f"the configured model ({what}{est.params:,} params, {_size(est.total)}) cannot fit this machine "
            f"({_size(free)} {where}); training runs the model as configured at batch {st.micro_batch} x "
            f"{st.seq_len}{how} ({_size(e.total)}, grad_accum at most {SHRUNK_MAX_ACCUM}): it proves the "
            "pipeline, not the real run's memory")
    item.numbers["smaller"] = dict(micro_batch=st.micro_batch, seq_len=st.seq_len,
                                   lora_r=st.lora.r if st.lora else None,
                                   gradient_checkpointing=st.gradient_checkpointing, estimate_bytes=e.total)
    return item, Student(None, st, note, smaller=True)


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
