"""`kdforge train`: config -> tokenizer, student, teacher, data, optimizer -> the loop -> checkpoints.

Setup, loop, save. Under `torchrun` it runs DDP (gloo on CPU, NCCL on GPU), or FSDP2 with
`train.fsdp: true` on GPU. SIGINT/SIGTERM finish the current step, save, and exit 130.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kdforge.config import Config, check_config
from kdforge.errors import ConfigError, Interrupted, UsageError
from kdforge.train import checkpoint as ckpt
from kdforge.train.checkpoint import TrainState
from kdforge.train.data_stream import DataStream, curriculum
from kdforge.train.loop import Hooks, LoopConfig, evaluate_loss, train_steps
from kdforge.train.objective import DistillObjective
from kdforge.train.schedule import LRMultiplier, make_scheduler


# ============================================================================ setup

def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device). Initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def amp_dtype_for(cfg: Config, device: torch.device):
    """bf16 autocast on a GPU that supports it (train.bf16: auto|true|false); none on CPU."""
    want = cfg.train.bf16
    if device.type != "cuda" or want is False:
        return None
    if want == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def load_student(cfg: Config, tokenizer, seed: int):
    """The student: `model.path` (any local causal LM) or the preset/numbers; LoRA if configured."""
    from transformers import AutoModelForCausalLM

    from kdforge.model.student import build_student

    if cfg.model.path:
        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[cfg.model.dtype]
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype)
    else:
        mc = cfg.model.model_cfg()
        model = build_student(mc, len(tokenizer), seed=seed, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.model.lora:
        from peft import LoraConfig, get_peft_model

        lc = cfg.model.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_teacher(cfg: Config, device):
    if not cfg.teacher.path or cfg.loss.kind == "ce":
        return None
    from transformers import AutoModelForCausalLM

    t = AutoModelForCausalLM.from_pretrained(cfg.teacher.path, dtype=torch.float32).to(device)
    t.eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def make_optimizer(model, cfg: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (CPU and CUDA); the per-tensor loop costs more than the
    # whole forward pass of a small student. Not with DTensor (FSDP) parameters.
    fused = not cfg.train.fsdp
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.betas), fused=fused)


def steps_per_epoch(n_examples: int, micro: int, accum: int, world: int) -> int:
    return max(1, -(-n_examples // (micro * accum * world)))


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume in (None, "", "none", "no"):
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(output_dir)
    p = Path(resume)
    if not ckpt.is_complete(p):
        found = ", ".join(c.name for c in ckpt.list_checkpoints(output_dir)) or "none"
        raise UsageError(f"--resume {p}: not a complete checkpoint folder (complete ones in "
                         f"{output_dir}: {found}); use --resume auto to take the newest")
    return p


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves, and we exit 130."""

    def __init__(self):
        self.signum = None

    def install(self):
        def handler(signum, frame):
            if self.signum is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.signum = signum
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handler)
        return self

    def __call__(self) -> bool:
        return self.signum is not None


@dataclass
class TrainResult:
    state: TrainState
    output_dir: Path
    reason: str
    last_checkpoint: Path | None


# ============================================================================ the run

def run_training(cfg: Config, resume: str | None = "auto", log=print,
                 raw_config: dict | None = None, stop_after: int | None = None) -> TrainResult:
    """Train per `cfg`; returns the final state. Raises ConfigError (2), Interrupted (130).

    `stop_after` ends the run early at that global step (saved), as if interrupted there: the
    schedule still spans the configured total, so a later resume continues the same curve."""
    from kdforge.data.dataset import KDDataset, load_tokenizer

    problems = check_config(cfg, for_run=True)
    if cfg.model.lora and not cfg.model.path:
        problems.append(("model.lora", "LoRA needs a pretrained base: set model.path (or drop model.lora)"))
    if problems:
        raise ConfigError(problems)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars between our log lines
    rank, world, device = setup_distributed()
    if world == 1:
        device = pick_device(cfg.train.device)
    out = Path(cfg.io.output_dir)
    t = cfg.train
    torch.manual_seed(t.seed)

    # ---------------------------------------------------------------- data + models
    tokenizer = load_tokenizer(cfg.io.tokenizer_path or cfg.model.path)
    with_topk = cfg.loss.kind != "ce" and not cfg.teacher.path
    max_len = max(t.seq_lengths)
    train_ds = KDDataset(cfg.io.train_shards, tokenizer=tokenizer, max_seq_length=max_len, with_topk=with_topk)
    if train_ds.misaligned and rank == 0:
        log(f"note: {len(train_ds.misaligned)} of {len(train_ds)} samples' teacher logprobs do not align "
            f"with their tokens (first: {train_ds.misaligned[0]}); they train with CE only")
    eval_ds = (KDDataset(cfg.io.eval_shards, tokenizer=tokenizer, max_seq_length=max_len, with_topk=with_topk)
               if cfg.io.eval_shards else None)
    model = load_student(cfg, tokenizer, t.seed).to(device)
    teacher = load_teacher(cfg, device)

    per_epoch = steps_per_epoch(len(train_ds), t.micro_batch_size, t.grad_accum, world)
    total = t.max_steps or max(1, int(round(t.epochs * per_epoch)))
    max_epochs = None if t.max_steps else t.epochs
    stream = DataStream(train_ds, t.micro_batch_size, t.seed, packing=t.packing, max_epochs=max_epochs)

    # Wrap before the optimizer exists: FSDP replaces parameters with sharded ones.
    objective = DistillObjective(model, cfg.loss.kind, cfg.loss.temperature, cfg.loss.beta,
                                 cfg.loss.chunk_size, teacher)
    fsdp = world > 1 and t.fsdp
    if world > 1:
        objective = _wrap_distributed(objective, cfg, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, t.schedule, t.warmup_steps, total, t.min_lr_ratio, t.decay_fraction)

    # ---------------------------------------------------------------- resume
    state = TrainState()
    start = resolve_resume(resume, out)
    if start is None and ckpt.list_checkpoints(out):
        raise UsageError(f"{out} already holds checkpoints ({ckpt.latest_checkpoint(out).name}); "
                         "continue with --resume auto, or choose a new --output-dir")
    if start is not None:
        if fsdp:
            state = _load_fsdp(start, objective, optimizer, scheduler)
        else:
            state = ckpt.load_checkpoint(start, model, optimizer, scheduler)
        if state.data_position:
            stream.restore(state.data_position)
        # The step count comes from the checkpoint, the schedule's shape from today's config
        # (so raising train.max_steps extends the cosine instead of idling at its floor).
        scheduler.lr_lambdas[0] = LRMultiplier(t.schedule, t.warmup_steps, total, t.min_lr_ratio,
                                               t.decay_fraction)
        log(f"Resuming from checkpoint: {start.name} (global_step {state.global_step})")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.cleanup_partial(out)
    amp_dtype = amp_dtype_for(cfg, device)

    # ---------------------------------------------------------------- hooks
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        _truncate_metrics(metrics_path, state.global_step)
    resolved = raw_config or cfg.model_dump(mode="json")
    stop = StopFlag().install()

    def save(st: TrainState):
        sd, osd = _full_state_dicts(objective, optimizer) if fsdp else (None, None)  # collective
        if rank == 0:
            path = ckpt.save_checkpoint(out, st, model, optimizer, scheduler, tokenizer, resolved,
                                        t.save_total_limit, model_state_dict=sd, optimizer_state_dict=osd)
            log(f"saved {path.name}")
        if world > 1:
            dist.barrier()

    progress = _Progress(total, state.global_step, log) if rank == 0 else None

    def on_log(rec):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({**rec, "time": time.time()}) + "\n")
            if "loss" in rec:
                progress.update(rec)
            else:
                log(f"step {rec['step']}: " + " ".join(f"{k}={v}" for k, v in rec.items() if k != "step"))

    evaluate = None
    if eval_ds is not None and t.eval_steps:
        evaluate = lambda: evaluate_loss(  # noqa: E731
            objective, lambda: DataStream(eval_ds, t.micro_batch_size, 0, name="eval"),
            max_len, t.eval_batches, device, amp_dtype)

    lc = LoopConfig(grad_accum=t.grad_accum, grad_clip=t.grad_clip, kd_weight=cfg.loss.kd_weight,
                    kind=cfg.loss.kind, save_steps=t.save_steps, eval_steps=t.eval_steps, log_steps=t.log_steps)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"train: {len(train_ds)} examples, {total} steps ({per_epoch}/epoch), global batch "
            f"{t.micro_batch_size}x{t.grad_accum}x{world}, params {n_params:,} ({n_train:,} trainable), "
            f"loss {cfg.loss.kind}, device {device}{', bf16' if amp_dtype else ''}")
    try:
        until = min(total, stop_after) if stop_after else total
        reason = train_steps(objective, optimizer, scheduler, stream, state, lc, until_step=until,
                             seq_len_at=curriculum(t.seq_lengths, total),
                             hooks=Hooks(on_log=on_log, save=save, evaluate=evaluate, should_stop=stop),
                             device=device, amp_dtype=amp_dtype)
    finally:
        if progress:
            progress.close()
    last = ckpt.latest_checkpoint(out)
    if reason == "stopped":
        raise Interrupted(f"stopped by signal at step {state.global_step}; saved {last}; "
                          f"resume with --resume auto")
    if rank == 0:
        log(f"done: step {state.global_step}, last checkpoint {last}")
    return TrainResult(state, out, reason, last)


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the metrics file is one clean curve."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
    from kdforge.atomic import atomic_write_text
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _wrap_distributed(objective, cfg: Config, device):
    if cfg.train.fsdp:  # FSDP2: shard each decoder layer, then the root (embeddings, head, loss)
        from torch.distributed.fsdp import fully_shard

        lm = objective.lm
        for layer in _decoder_layers(lm):
            fully_shard(layer)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)


def _decoder_layers(lm):
    from kdforge.train.objective import base_lm
    return list(base_lm(lm).get_decoder().layers)


def _full_state_dicts(objective, optimizer):
    """Gather FSDP shards into full state dicts on rank 0 (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(objective, options=opts)
    osd = get_optimizer_state_dict(objective, optimizer, options=opts)
    return {k.removeprefix("lm."): v for k, v in sd.items()}, osd


def _load_fsdp(path: Path, objective, optimizer, scheduler) -> TrainState:
    """Resume an FSDP run: every rank reads the full files and keeps its own shards."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    sd = {f"lm.{k}": v for k, v in load_file(str(path / "model.safetensors")).items()}
    set_model_state_dict(objective, sd, options=opts)
    osd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(objective, optimizer, osd, options=opts)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    ckpt.set_rng_state(torch.load(path / "rng_state.pth", map_location="cpu", weights_only=True))
    return ckpt.read_state(path)


class _Progress:
    """A rich progress line on a terminal (step, loss, tokens/s, ETA); plain log lines otherwise."""

    def __init__(self, total: int, start: int, log):
        self.total, self.log = total, log
        self.t0, self.start = time.perf_counter(), start
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, rec: dict) -> None:
        info = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec.get('tokens_per_s', 0):,.0f} tok/s"
        if self.bar:
            self.bar.update(self.task, completed=rec["step"], info=info)
            return
        done = rec["step"] - self.start
        eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - rec["step"])
        self.log(f"step {rec['step']}/{self.total} {info} eta {eta:.0f}s")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
