"""One training session: where a run is assembled, for `kdforge train` and the daemon alike.

`build_session(cfg)` turns a config into what the loop needs: device (and the process group under
`torchrun`), tokenizer, student (LoRA if configured), frozen teacher, the objective around them
(DDP- or FSDP-wrapped), AdamW, the LR schedule, bf16 autocast, the loop's settings and a stop
flag for SIGINT/SIGTERM. `Session.resume(path)` loads a checkpoint into it (plain, LoRA and FSDP
alike) and `Session.save(out, state, keep)` writes one; data is not part of a session, so the
daemon builds one before any batch exists and feeds it file after file.
"""

from __future__ import annotations

import gc
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kdforge.config import Config, LossSection, ModelSection, TeacherSection, TrainSection
from kdforge.errors import UsageError
from kdforge.train import checkpoint as ckpt
from kdforge.train.checkpoint import TrainState
from kdforge.train.loop import LoopConfig
from kdforge.train.objective import DistillObjective
from kdforge.train.schedule import LRMultiplier, apply_schedule, train_schedule


# ============================================================================ devices

def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, initialised_here). Starts the process group (gloo on CPU, NCCL on
    GPU) when launched by torchrun; one process takes `train.device`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world == 1:
        return rank, world, pick_device(device_name), started
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local), started
    return rank, world, torch.device("cpu"), started


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def amp_dtype_for(train: TrainSection, device: torch.device):
    """bf16 autocast on a GPU that supports it (train.bf16: auto|true|false); none on CPU."""
    want = train.bf16
    if device.type != "cuda" or want is False:
        return None
    if want == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


# ============================================================================ models

def load_student(section: ModelSection, tokenizer, seed: int, gradient_checkpointing: bool):
    """The student of the `model` section: `path` (any local causal LM) or the preset/numbers;
    LoRA if configured; activations recomputed in backward with `gradient_checkpointing`."""
    from transformers import AutoModelForCausalLM

    from kdforge.model.student import build_student

    if section.path:
        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[section.dtype]
        model = AutoModelForCausalLM.from_pretrained(section.path, dtype=dtype, trust_remote_code=False)
    else:
        model = build_student(section.model_cfg(), len(tokenizer), seed=seed, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if section.lora:
        from kdforge.model.adapters import with_lora
        from kdforge.model.student import peft_lora_config

        lora = section.lora
        model = with_lora(model, peft_lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_teacher(section: TeacherSection, loss: LossSection, device):
    """The frozen local teacher for dense KD, or None (CE, or top-k logprobs from the data)."""
    if not section.path or loss.kind == "ce":
        return None
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(section.path, dtype=torch.float32, trust_remote_code=False).to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_optimizer(model, train: TrainSection):
    """AdamW over the trainable parameters: matrices decay, norms and biases (group 1) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (CPU and CUDA); the per-tensor loop costs more than the
    # whole forward pass of a small student. Not with DTensor (FSDP) parameters.
    fused = not train.fsdp
    return torch.optim.AdamW(groups, lr=train.lr, betas=tuple(train.betas), fused=fused)


def _wrap_distributed(objective, fsdp: bool, device):
    if fsdp:  # FSDP2: shard each decoder layer, then the root (embeddings, head, loss)
        from torch.distributed.fsdp import fully_shard

        from kdforge.train.objective import base_lm

        for layer in base_lm(objective.lm).get_decoder().layers:
            fully_shard(layer)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)


# ============================================================================ signals

class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step and saves; its owner decides the exit
    (`kdforge train`: 130, the daemon: 0). A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum = None
        self._old: dict = {}

    def install(self):
        def handler(signum, frame):
            if self.signum is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.signum = signum
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old.setdefault(s, signal.getsignal(s))
            signal.signal(s, handler)
        return self

    def uninstall(self) -> None:
        """Give the handlers back (an in-process caller, e.g. a test or the demo, goes on)."""
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __call__(self) -> bool:
        return self.signum is not None


# ============================================================================ the session

def store_settings(cfg, prompt_only: bool = False) -> dict:
    """The token store's settings of a run's data (`Session.store_settings`): io.reasoning,
    loss.cross_tokenizer, and `prompt_only` for the daemon's batches."""
    settings = {"reasoning": cfg.io.reasoning, "alignment": {"cross_tokenizer": cfg.loss.cross_tokenizer}}
    return {**settings, "prompt_only": True} if prompt_only else settings


@dataclass
class Session:
    """Everything a run trains with. `model` is the student itself (PEFT-wrapped under LoRA),
    `objective` what the loop calls (DDP/FSDP-wrapped under torchrun)."""

    cfg: Config
    tokenizer: Any
    model: Any
    teacher: Any
    objective: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule: LRMultiplier
    device: torch.device
    amp_dtype: torch.dtype | None
    loop: LoopConfig
    base_model: str | None = None  # the folder the student was loaded from (model.path), if any
    rank: int = 0
    world: int = 1
    stop: StopFlag = field(default_factory=StopFlag)
    _owns_group: bool = False

    @property
    def fsdp(self) -> bool:
        return self.world > 1 and self.cfg.train.fsdp

    @property
    def with_topk(self) -> bool:
        """Whether training data must carry the teacher's top-k: a KD loss with no local teacher."""
        return self.cfg.loss.kind != "ce" and not self.cfg.teacher.path

    def store_settings(self, prompt_only: bool = False) -> dict:
        """What the token store of this run's data is keyed and built by, the same for `kdforge train`
        and the daemon: a thinking teacher's reasoning trained or not (io.reasoning), a teacher with
        another tokenizer carried or refused (loss.cross_tokenizer); `prompt_only`: prompt-only lines
        are records (the daemon's batches)."""
        return store_settings(self.cfg, prompt_only)

    def parameter_counts(self) -> tuple[int, int]:
        """(all parameters, trainable ones) of the student."""
        params = list(self.model.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    def set_schedule(self, schedule: LRMultiplier) -> None:
        """Reshape the LR schedule of every param group, keeping the step count."""
        self.schedule = schedule
        apply_schedule(self.scheduler, schedule)

    def resume(self, path: str | Path) -> TrainState:
        """Load weights (or adapter), optimizer, scheduler position and RNG from checkpoint
        `path`; the schedule's shape stays this session's. Returns the checkpoint's state."""
        path = Path(path)
        try:
            state = ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler,
                                         sharded=self.objective if self.fsdp else None)
        except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
            raise UsageError(f"{path} does not fit this config ({e}); a LoRA checkpoint needs model.lora set "
                             "as when it was trained, a full one needs no model.lora") from e
        apply_schedule(self.scheduler, self.schedule)
        return state

    def save(self, out: str | Path, state: TrainState, keep: int | None) -> Path | None:
        """Write checkpoint-{global_step} into `out` with the resolved config, keeping the newest
        `keep`. Every rank calls it (FSDP gathers shards); rank 0 writes and gets the path."""
        sd, osd = ckpt.gather_full_state(self.objective, self.optimizer) if self.fsdp else (None, None)
        path = None
        if self.rank == 0:
            path = ckpt.save_checkpoint(out, state, self.model, self.optimizer, self.scheduler, self.tokenizer,
                                        self.cfg.model_dump(mode="json"), keep,
                                        model_state_dict=sd, optimizer_state_dict=osd)
        self.barrier()
        return path

    def rebuild(self, base_model: str | None = None) -> None:
        """A fresh optimizer (and, given `base_model`, a new student on that folder, with a new
        adapter under LoRA): the daemon's consolidation. The schedule goes on at the same step."""
        if self.world > 1:
            raise RuntimeError("rebuild is for one process (the daemon), not a torchrun job")
        position = self.scheduler.state_dict()
        if base_model is not None:
            self.model = None  # free the old student before loading the new one
            train = self.cfg.train
            self.model = load_student(_on_base(self.cfg.model, base_model), self.tokenizer, train.seed,
                                      train.gradient_checkpointing).to(self.device)
            self.base_model = base_model
            self.objective = DistillObjective.from_config(self.cfg.loss, self.model, self.teacher)
        self.optimizer, self.scheduler = _optimizer(self.cfg.train, self.model, self.schedule)
        self.scheduler.load_state_dict(position)
        apply_schedule(self.scheduler, self.schedule)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self, in_step: bool = True) -> None:
        """Give back the signal handlers and tear down the process group this session started.
        Left to the interpreter's exit, gloo's threads and DDP's reducer die in any order and a
        rank aborts ("terminate called without an active exception") or hangs freeing them.
        `in_step`: every rank got here together (the run ended, or stopped, in step); then they
        meet once more and free the wrapped objective while the group still lives. After a
        failure on one rank no peer may come: skip the meeting, just leave. Safe to call twice."""
        self.stop.uninstall()
        if not (self._owns_group and dist.is_initialized()):
            return
        if in_step:
            dist.barrier()  # no rank tears down while another still talks
            self.objective = self.optimizer = self.scheduler = None  # DDP's reducer holds the group
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()
        self._owns_group = False


def _on_base(section: ModelSection, base_model: str) -> ModelSection:
    """The model section with the student loaded from `base_model` instead."""
    return section.model_copy(update={"path": base_model})


def _optimizer(train: TrainSection, model, schedule: LRMultiplier):
    optimizer = make_optimizer(model, train)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def build_session(cfg: Config, *, model_path: str | None = None, tokenizer=None,
                  schedule: LRMultiplier | None = None, save_steps: int | None = None,
                  install_signals: bool = True) -> Session:
    """Assemble a run from `cfg` (checked already: `config_checks.check_config`). Each part
    takes its own section; the session keeps the whole tree, which every checkpoint saves.

    `model_path` loads the student from that folder instead of `model.path` (the daemon's
    `daemon.base_model`, or a consolidated base); `tokenizer` replaces loading one from
    `io.tokenizer_path` / the model folder; `schedule` replaces the train section's (built with
    `train.max_steps`, or open-ended when the run counts epochs: set it with `set_schedule` once
    the data is known). No data is needed: the caller makes the DataStream."""
    from transformers.utils import logging as hf_logging

    from kdforge.data.dataset import load_tokenizer

    hf_logging.disable_progress_bar()  # no "Loading weights" bars between our log lines
    train = cfg.train
    rank, world, device, owns_group = setup_distributed(train.device)
    torch.manual_seed(train.seed)
    student = _on_base(cfg.model, model_path) if model_path is not None else cfg.model
    tokenizer = tokenizer or load_tokenizer(cfg.io.tokenizer_path or student.path)
    model = load_student(student, tokenizer, train.seed, train.gradient_checkpointing).to(device)
    from kdforge.train.cross_scoring import local_teacher  # another tokenizer: carried by bytes

    teacher = local_teacher(cfg, load_teacher(cfg.teacher, cfg.loss, device), tokenizer, print if rank == 0 else None)
    objective = DistillObjective.from_config(cfg.loss, model, teacher)
    if rank == 0 and objective.vocab_note():  # a wider (padded) teacher vocabulary: said once
        print(objective.vocab_note(), flush=True)
    if world > 1:  # wrap before the optimizer exists: FSDP replaces parameters with sharded ones
        objective = _wrap_distributed(objective, train.fsdp, device)
    schedule = schedule or train_schedule(train, train.max_steps)
    optimizer, scheduler = _optimizer(train, model, schedule)
    # the daemon saves at its own daemon.save_steps
    loop = LoopConfig.from_config(train, cfg.loss, save_steps=save_steps or train.save_steps)
    session = Session(cfg=cfg, tokenizer=tokenizer, model=model, teacher=teacher, objective=objective,
                      optimizer=optimizer, scheduler=scheduler, schedule=schedule, device=device,
                      amp_dtype=amp_dtype_for(train, device), loop=loop,
                      base_model=student.path, rank=rank, world=world, _owns_group=owns_group)
    if rank == 0 and cfg.model.lora and cfg.model.lora.target_modules is None:
        print(f"LoRA on {', '.join(lora_targets(model))} (model.lora.target_modules unset: PEFT's all-linear)")
    if install_signals:
        session.stop.install()
    return session


def lora_targets(model) -> list[str]:
    """The layer names a PEFT model's adapter targets, as its adapter_config.json will list them,
    then the parameters it adapts directly (`target_parameters`: Mixtral's fused experts, router)."""
    pc = model.peft_config["default"]
    return sorted(pc.target_modules) + sorted(pc.target_parameters or [])
