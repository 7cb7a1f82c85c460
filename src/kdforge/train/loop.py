"""The training loop: a library function over (objective, optimizer, scheduler, data stream, state).

`kdforge train` and the daemon both call `train_steps`; the daemon calls it batch after batch with
the model kept loaded. The loop owns its data position (the stream's), so a new data file starts
at its first example whatever the global step (the Hugging Face Trainer fast-forward pitfall).

One optimizer step = `grad_accum` micro-batches per rank. Losses are summed per token and divided
by token counts of the whole global batch (all micro-batches, all ranks): CE by the target tokens,
KD by the target tokens that have teacher data (`DistillObjective.token_counts`), so grad_accum 4 x
micro 1 equals micro 4 and N ranks equal one. The logged loss applies the same rule
(`LossSums.loss`) to the step's all-reduced sums. On-policy steps log theirs as `loss_on_policy`,
`ce_on_policy` and `kd_on_policy` (another quantity: the divergence alone on the student's tokens),
off-policy steps as `loss`, `ce` and `kd`.

`train_steps` reads top to bottom: setup, the loop, the last save. Each step of the loop is
`_gather` (this rank's micro-batches; the teacher scores them where it must), `_forward_backward`
and `_optimizer_step`, then `_record` (state, metrics record), log, evaluate, save.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from kdforge.config import LossSection, TrainSection, default
from kdforge.errors import KdforgeError
from kdforge.train.checkpoint import TrainState
from kdforge.train.data_stream import DataStream
from kdforge.train.losses import LossSums
from kdforge.train.on_policy import OnPolicy
from kdforge.train.on_policy import prompts_of as on_policy_prompts


MAX_LOG_HISTORY = 10_000  # trainer_state.json keeps the newest entries; metrics.jsonl keeps all


@dataclass
class LoopConfig:
    """What the loop needs from the config. Build it with `from_config`; the keyword defaults,
    for tests and library callers, are the config tree's (declared in `kdforge.config` only)."""

    grad_accum: int = default(TrainSection, "grad_accum")
    grad_clip: float | None = default(TrainSection, "grad_clip")
    kd_weight: float = default(LossSection, "kd_weight")
    kind: str = default(LossSection, "kind")
    save_steps: int = default(TrainSection, "save_steps")
    eval_steps: int | None = default(TrainSection, "eval_steps")
    log_steps: int = default(TrainSection, "log_steps")

    @classmethod
    def from_config(cls, train, loss, **overrides) -> LoopConfig:
        """From the `train` and `loss` config sections; `overrides` replace fields (the daemon
        saves at `daemon.save_steps`, and evaluates never)."""
        fields = dict(grad_accum=train.grad_accum, grad_clip=train.grad_clip, kd_weight=loss.kd_weight,
                      kind=loss.kind, save_steps=train.save_steps, eval_steps=train.eval_steps,
                      log_steps=train.log_steps)
        return cls(**{**fields, **overrides})


@dataclass
class Hooks:
    """Callbacks the owner of the loop supplies; every one is optional."""

    on_log: Callable[[dict], None] | None = None  # every log_steps: the metrics record
    on_step: Callable[[TrainState, dict], None] | None = None  # after every optimizer step
    save: Callable[[TrainState], None] | None = None  # write a checkpoint
    evaluate: Callable[[], dict] | None = None  # -> {"eval_loss": ...}
    should_stop: Callable[[], bool] | None = None  # e.g. a signal arrived or .stop exists


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device) -> list[float]:
    if _world()[1] == 1:
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def _to(batch: dict, device) -> dict:
    return {key: tensor.to(device, non_blocking=True) for key, tensor in batch.items()}


def _autocast(device, amp_dtype: torch.dtype | None):
    """Mixed precision in `amp_dtype` on `device`'s type; nothing when None (float32 training)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype)


def train_steps(objective, optimizer, scheduler, stream: DataStream, state: TrainState,
                loop: LoopConfig, *, until_step: int | None, seq_len_at: Callable[[int], int],
                hooks: Hooks | None = None, device: torch.device | str = "cpu",
                amp_dtype: torch.dtype | None = None, on_policy: OnPolicy | None = None) -> str:
    """Train until `state.global_step == until_step` ("done"), the stream runs out ("exhausted"),
    or `hooks.should_stop()` ("stopped"). Saves at every `save_steps` and before returning
    (unless the last step was just saved). `objective` may be DDP-wrapped. Mutates `state`.

    `on_policy` (train/on_policy.py) makes some steps train on the student's own answers, scored
    by the teacher, instead of the dataset's micro-batches. A priced teacher's budget running out
    (BudgetExceededError) or a teacher that refuses, lies or stays down (KdforgeError) stops the
    run after saving the last finished step."""
    # ---- setup
    hooks = hooks or Hooks()
    rank, world = _world()
    device = torch.device(device)
    token_counts = _unwrap(objective).token_counts  # (target tokens, tokens with teacher data) per batch
    pace = _Pace()
    saved_at = state.global_step
    reason = "done"

    # ---- loop: gather, forward-backward, record
    while until_step is None or state.global_step < until_step:
        step = _gather(stream, state.global_step, seq_len_at(state.global_step), loop, on_policy, rank, world,
                       device)
        if step is None:
            reason = "exhausted"
            break
        if step.scored:  # on-policy, or teacher.url KD: the teacher scores before anything trains
            _score(step, on_policy, state, saved_at, hooks.save, rank, world)
        _count_tokens(step, token_counts, device)
        if step.tokens == 0:  # a step of examples with no target tokens: skip, keep position
            continue
        ce_sum, kd_sum = _forward_backward(objective, step, loop.kind, world, device, amp_dtype)
        lr, grad_norm = _optimizer_step(objective, optimizer, scheduler, loop.grad_clip)
        record = _record(step, state, stream, loop.kind, ce_sum, kd_sum, lr, grad_norm, rank, device)
        _report_scoring(step, on_policy, record, world, device)
        _log(record, step, state, loop.log_steps, pace, hooks.on_log)
        if hooks.on_step:
            hooks.on_step(state, record)
        _evaluate(state, loop.eval_steps, hooks)
        if hooks.save and state.global_step % loop.save_steps == 0:
            hooks.save(state)
            saved_at = state.global_step
        if _should_stop(hooks, world, device):
            reason = "stopped"
            break
        if stream.exhausted():
            reason = "exhausted"
            break

    # ---- save
    if hooks.save and state.global_step != saved_at:
        hooks.save(state)
    return reason


@dataclass
class _Step:
    """One optimizer step as this rank sees it: what `_gather` found, then the global token counts."""

    seq_len: int
    on_policy: bool  # the student's own answers: the divergence alone, logged under `*_on_policy` keys
    scored: bool  # the teacher scores this step over HTTP (on-policy, or teacher.url off-policy KD)
    micro_batches: list  # this rank's micro-batches (an on-policy step's prompt sets until scored)
    samples: int  # dataset examples the step took from the stream (all ranks': each walks them all)
    kd_weight: float
    tokens: int = 0  # target tokens of the whole global batch (all micro-batches, all ranks)
    kd_tokens: int = 0  # of those, the ones with teacher data

    @property
    def tag(self) -> str:
        """Its loss keys' suffix. An on-policy step's loss is another quantity (the divergence alone,
        on the student's own tokens): logged under its own keys, so no curve mixes the two kinds."""
        return "_on_policy" if self.on_policy else ""


@dataclass
class _Pace:
    """Tokens trained since the last logged step, for the record's tokens_per_s."""

    since: float = field(default_factory=time.perf_counter)
    tokens: int = 0

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        rate = round(self.tokens / max(now - self.since, 1e-9), 1)
        self.since, self.tokens = now, 0
        return rate


# ---- gather: this step's micro-batches, every rank walking the same global order

def _gather(stream: DataStream, global_step: int, seq_len: int, loop: LoopConfig, on_policy: OnPolicy | None,
            rank: int, world: int, device) -> _Step | None:
    """This rank's share of the step's `grad_accum * world` micro-batches; None when every rank's
    share is empty (the stream ran out). An on-policy step takes prompts: from on_policy.prompts
    (the dataset stays put) or from the micro-batches the dataset would have trained on."""
    is_on_policy = on_policy is not None and on_policy.is_on_policy(global_step)
    scored = is_on_policy or (on_policy is not None and on_policy.scores_data)
    n_micro = loop.grad_accum * world
    mine, samples = [], 0
    if is_on_policy and on_policy.uses_pool:
        prompt_sets = on_policy.pool_prompts(global_step, n_micro)
        mine = [prompt_sets[micro] for micro in range(n_micro) if micro % world == rank]
    else:
        for micro in range(n_micro):
            got = stream.next_micro_batch(seq_len)
            if got is None:
                break
            batch, n_examples = got
            samples += n_examples
            if micro % world == rank:
                mine.append(on_policy_prompts(batch) if is_on_policy else batch)
    empty = float(not mine)
    if world > 1:  # every rank must agree, or the collectives that follow would hang
        empty = _all_sum([empty], device)[0]
    if empty:
        return None
    # An on-policy step trains the divergence alone: the student's answer has no teacher text.
    return _Step(seq_len, is_on_policy, scored, mine, samples, kd_weight=1.0 if is_on_policy else loop.kd_weight)


def _score(step: _Step, on_policy: OnPolicy, state: TrainState, saved_at: int, save, rank: int, world: int) -> None:
    """The student answers and the teacher scores (on-policy), or teacher.url scores the records
    without stored top-k (off-policy): the step's micro-batches are replaced by scored ones.
    Nothing is trained yet if scoring stops here: the KdforgeError (budget, a refusing, lying or
    unreachable teacher) is raised after saving the last finished step, so a resume redoes this
    step whole."""
    try:
        step.micro_batches = (on_policy.replace(state.global_step, step.micro_batches, rank, world)
                              if step.on_policy else on_policy.score_missing(step.micro_batches, rank, world))
    except KdforgeError:
        if save and state.global_step != saved_at:
            save(state)
        raise


def _count_tokens(step: _Step, token_counts, device) -> None:
    """The global batch's token counts (all ranks), the denominators of its losses."""
    tokens = kd_tokens = 0
    for batch in step.micro_batches:
        batch_tokens, batch_kd_tokens = token_counts(batch)
        tokens += batch_tokens
        kd_tokens += batch_kd_tokens
    step.tokens, step.kd_tokens = (int(total) for total in _all_sum([float(tokens), float(kd_tokens)], device))


# ---- forward-backward: gradients of the step's loss, then one optimizer step

def _forward_backward(model, step: _Step, kind: str, world: int, device, amp_dtype) -> tuple[float, float]:
    """Backward through every micro-batch of the step, each loss divided by the whole global
    batch's token counts (so grad_accum and ranks do not change the gradient); returns this
    rank's summed CE and KD (float64 on the host, for the log)."""
    model.train()
    ce_sum = kd_sum = 0.0
    for index, batch in enumerate(step.micro_batches):
        batch = _to(batch, device)
        sync = index == len(step.micro_batches) - 1 or not hasattr(model, "no_sync")
        no_sync = contextlib.nullcontext() if sync else model.no_sync()
        # One `with` for forward and backward: DDP's no_sync() is a one-shot context manager
        # (entering it twice raised AttributeError under torchrun with grad_accum > 1).
        with no_sync:
            with _autocast(device, amp_dtype):
                sums = model(batch)
                loss = sums.loss(step.kd_weight, kind, step.tokens, step.kd_tokens) * world  # DDP averages ranks
            loss.backward()
        ce_sum += float(sums.ce.detach())
        kd_sum += float(sums.kd.detach())
    return ce_sum, kd_sum


def _optimizer_step(model, optimizer, scheduler, grad_clip: float | None) -> tuple[float, float | None]:
    """Clip, step the optimizer and the schedule, clear the gradients; returns the step's learning
    rate (read before the schedule moves) and the gradient norm before clipping (None unclipped)."""
    grad_norm = None
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_([param for param in model.parameters() if param.requires_grad], grad_clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


# ---- record: advance the state, log the step, evaluate, agree on stopping

def _record(step: _Step, state: TrainState, stream: DataStream, kind: str, ce_sum: float, kd_sum: float,
            lr: float, grad_norm: float | None, rank: int, device) -> dict:
    """Advance `state` by the finished step and return its metrics record: the losses by the
    backward's combine rule on the step's all-reduced sums. Raises FloatingPointError on a
    non-finite loss."""
    ce_global, kd_global, samples = _all_sum([ce_sum, kd_sum, float(step.samples if rank == 0 else 0)], device)
    step_sums = LossSums(torch.tensor(ce_global, dtype=torch.float64), torch.tensor(kd_global, dtype=torch.float64),
                         step.tokens, step.kd_tokens)
    state.global_step += 1
    state.samples_seen += int(samples)
    state.tokens_seen += step.tokens
    state.epoch = round(stream.epoch_float, 6)
    state.data_position = stream.position()
    means = step_sums.metrics(step.kd_weight, kind)  # the backward's combine rule, on the step's totals
    loss = means["loss"]
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {state.global_step}: lower train.lr "
                                 "or check the data (kdforge data validate)")
    tag = step.tag
    record = {"step": state.global_step, f"loss{tag}": round(loss, 6), f"ce{tag}": round(means["ce"], 6),
              "lr": lr, "tokens": step.tokens, "epoch": state.epoch, "seq_len": step.seq_len}
    if kind != "ce":
        record[f"kd{tag}"] = round(means["kd"], 6)
        record["kd_tokens"] = step.kd_tokens
    if grad_norm is not None:
        record["grad_norm"] = round(grad_norm, 6)
    return record


def _report_scoring(step: _Step, on_policy: OnPolicy | None, record: dict, world: int, device) -> None:
    """Add what the teacher scored and cost to `record` (on- and off-policy steps logged apart)."""
    if on_policy is None:
        return
    if step.scored and world > 1:  # every rank scored its own micro-batches: log the step's totals
        report = on_policy.last
        report.teacher_tokens, report.answer_tokens = (
            int(total) for total in _all_sum([float(report.teacher_tokens), float(report.answer_tokens)], device))
    record.update(on_policy.step_metrics(step.on_policy))


def _log(record: dict, step: _Step, state: TrainState, log_steps: int, pace: _Pace, on_log) -> None:
    """Every `log_steps` steps: the throughput since the last logged step into `record`, its
    summary into the bounded log history, and `record` to `on_log`."""
    pace.tokens += step.tokens
    if state.global_step % log_steps:
        return
    record["tokens_per_s"] = pace.tokens_per_s()
    state.log_history.append({key: record[key] for key in ("step", f"loss{step.tag}", "lr", "epoch")})
    # A daemon runs for months: keep trainer_state.json (rewritten at every save) bounded.
    del state.log_history[:-MAX_LOG_HISTORY]
    if on_log:
        on_log(record)


def _evaluate(state: TrainState, eval_steps: int | None, hooks: Hooks) -> None:
    """Every `eval_steps` steps: `hooks.evaluate`, its result logged beside the training records."""
    if not (eval_steps and hooks.evaluate and state.global_step % eval_steps == 0):
        return
    result = hooks.evaluate()
    state.log_history.append({"step": state.global_step, **result})
    if hooks.on_log:
        hooks.on_log({"step": state.global_step, **result})


def _should_stop(hooks: Hooks, world: int, device) -> bool:
    """Whether to stop after this step: `hooks.should_stop()` on any rank stops every rank."""
    stop = hooks.should_stop() if hooks.should_stop else False
    if world > 1:
        stop = _all_sum([float(stop)], device)[0] > 0
    return stop


def _unwrap(objective):
    """The DistillObjective under a DDP wrapper (FSDP2 shards it in place)."""
    return getattr(objective, "module", objective)


@torch.no_grad()
def evaluate_loss(objective, stream_factory: Callable[[], DataStream], seq_len: int, max_batches: int,
                  device, amp_dtype=None) -> dict:
    """Mean target-token CE (and KD) over the first `max_batches` micro-batches of a fresh stream."""
    objective.eval()
    stream = stream_factory()
    ce_total = 0.0
    n_tokens = 0
    for _ in range(max_batches):
        got = stream.next_micro_batch(seq_len)
        if got is None:
            break
        with _autocast(device, amp_dtype):
            sums = objective(_to(got[0], device))
        ce_total += float(sums.ce)
        n_tokens += sums.n_tokens
    objective.train()
    if n_tokens == 0:
        return {}
    return {"eval_loss": round(ce_total / n_tokens, 6), "eval_tokens": n_tokens}
