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
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from kdforge.errors import KdforgeError
from kdforge.train.checkpoint import TrainState
from kdforge.train.data_stream import DataStream
from kdforge.train.losses import LossSums
from kdforge.train.on_policy import OnPolicy
from kdforge.train.on_policy import prompts_of as on_policy_prompts


MAX_LOG_HISTORY = 10_000  # trainer_state.json keeps the newest entries; metrics.jsonl keeps all


@dataclass
class LoopConfig:
    """What the loop needs from the config. Build it with `from_config` (the defaults live in
    `kdforge.config`); the keyword defaults here only serve tests and library callers."""

    grad_accum: int = 1
    grad_clip: float | None = 1.0
    kd_weight: float = 0.5
    kind: str = "ce"
    save_steps: int = 100
    eval_steps: int | None = None
    log_steps: int = 1

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
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_steps(objective, optimizer, scheduler, stream: DataStream, state: TrainState,
                lc: LoopConfig, *, until_step: int | None, seq_len_at: Callable[[int], int],
                hooks: Hooks | None = None, device: torch.device | str = "cpu",
                amp_dtype: torch.dtype | None = None, on_policy: OnPolicy | None = None) -> str:
    """Train until `state.global_step == until_step` ("done"), the stream runs out ("exhausted"),
    or `hooks.should_stop()` ("stopped"). Saves at every `save_steps` and before returning
    (unless the last step was just saved). `objective` may be DDP-wrapped. Mutates `state`.

    `on_policy` (train/on_policy.py) makes some steps train on the student's own answers, scored
    by the teacher, instead of the dataset's micro-batches. A priced teacher's budget running out
    (BudgetExceededError) or a teacher that refuses, lies or stays down (KdforgeError) stops the
    run after saving the last finished step."""
    hooks = hooks or Hooks()
    rank, world = _world()
    device = torch.device(device)
    model = objective
    counts = _unwrap(objective).token_counts  # (target tokens, tokens with teacher data) per batch
    t_last, tokens_since = time.perf_counter(), 0
    saved_at = state.global_step
    reason = "done"

    while until_step is None or state.global_step < until_step:
        # ---- gather this step's micro-batches (every rank walks the same global order)
        seq_len = seq_len_at(state.global_step)
        op_step = on_policy is not None and on_policy.is_on_policy(state.global_step)
        n_micro = lc.grad_accum * world
        mine, samples = [], 0
        if op_step and on_policy.uses_pool:  # prompts from on_policy.prompts: the dataset stays put
            sets = on_policy.pool_prompts(state.global_step, n_micro)
            mine = [sets[m] for m in range(n_micro) if m % world == rank]
        else:
            for m in range(n_micro):
                got = stream.next_micro_batch(seq_len)
                if got is None:
                    break
                batch, n_ex = got
                samples += n_ex
                if m % world == rank:
                    mine.append(on_policy_prompts(batch) if op_step else batch)
        empty = float(not mine)
        if world > 1:  # every rank must agree, or the collectives below would hang
            empty = _all_sum([empty], device)[0]
        if empty:
            reason = "exhausted"
            break
        # the student answers and the teacher scores (on-policy), or teacher.url scores the records
        # without stored top-k (off-policy); nothing trained yet if scoring stops here
        if op_step or (on_policy is not None and on_policy.scores_data):
            try:
                mine = (on_policy.replace(state.global_step, mine, rank, world) if op_step
                        else on_policy.score_missing(mine, rank, world))
            except KdforgeError:  # budget, a refusing, lying or unreachable teacher: resumable from here
                if hooks.save and state.global_step != saved_at:
                    hooks.save(state)  # the step before this one: a resume redoes this step whole
                raise
        n_local = n_kd_local = 0
        for batch in mine:
            n, n_kd = counts(batch)
            n_local += n
            n_kd_local += n_kd
        n_global, n_kd_global = (int(x) for x in _all_sum([float(n_local), float(n_kd_local)], device))
        # An on-policy step trains the divergence alone: the student's answer has no teacher text.
        kd_weight = 1.0 if op_step else lc.kd_weight
        if n_global == 0:  # a step of examples with no target tokens: skip, keep position
            continue

        # ---- forward/backward over the micro-batches
        model.train()
        ce_sum = kd_sum = 0.0  # float64 on the host: the log's sums, all-reduced below
        for i, batch in enumerate(mine):
            batch = _to(batch, device)
            sync = i == len(mine) - 1 or not hasattr(model, "no_sync")
            ctx = contextlib.nullcontext() if sync else model.no_sync()
            amp = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                   else contextlib.nullcontext())
            # One `with` for forward and backward: DDP's no_sync() is a one-shot context manager
            # (entering it twice raised AttributeError under torchrun with grad_accum > 1).
            with ctx:
                with amp:
                    sums = model(batch)
                    loss = sums.loss(kd_weight, lc.kind, n_global, n_kd_global) * world  # DDP averages ranks
                loss.backward()
            ce_sum += float(sums.ce.detach())
            kd_sum += float(sums.kd.detach())
        grad_norm = None
        if lc.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], lc.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: DTensor
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # ---- bookkeeping
        ce_g, kd_g, samples_g = _all_sum([ce_sum, kd_sum, float(samples if rank == 0 else 0)], device)
        step_sums = LossSums(torch.tensor(ce_g, dtype=torch.float64), torch.tensor(kd_g, dtype=torch.float64),
                             n_global, n_kd_global)
        state.global_step += 1
        state.samples_seen += int(samples_g)
        state.tokens_seen += n_global
        state.epoch = round(stream.epoch_float, 6)
        state.data_position = stream.position()
        tokens_since += n_global
        means = step_sums.metrics(kd_weight, lc.kind)  # the backward's combine rule, on the step's totals
        loss_m = means["loss"]
        if not math.isfinite(loss_m):
            raise FloatingPointError(f"loss is {loss_m} at step {state.global_step}: lower train.lr "
                                     "or check the data (kdforge data validate)")
        now = time.perf_counter()
        # An on-policy step's loss is another quantity (the divergence alone, on the student's own
        # tokens): logged under its own keys, so no curve mixes the two kinds of step.
        tag = "_on_policy" if op_step else ""
        rec = {"step": state.global_step, f"loss{tag}": round(loss_m, 6), f"ce{tag}": round(means["ce"], 6),
               "lr": lr, "tokens": n_global, "epoch": state.epoch, "seq_len": seq_len}
        if lc.kind != "ce":
            rec[f"kd{tag}"] = round(means["kd"], 6)
            rec["kd_tokens"] = n_kd_global
        if grad_norm is not None:
            rec["grad_norm"] = round(grad_norm, 6)
        scored = op_step or (on_policy is not None and on_policy.scores_data)
        if scored and world > 1:  # every rank scored its own micro-batches: log the step's totals
            rep = on_policy.last
            rep.teacher_tokens, rep.answer_tokens = (
                int(x) for x in _all_sum([float(rep.teacher_tokens), float(rep.answer_tokens)], device))
        if on_policy is not None:  # on- and off-policy steps logged apart
            rec.update(on_policy.step_metrics(op_step))
        if state.global_step % lc.log_steps == 0:
            rec["tokens_per_s"] = round(tokens_since / max(now - t_last, 1e-9), 1)
            t_last, tokens_since = now, 0
            state.log_history.append({k: rec[k] for k in ("step", f"loss{tag}", "lr", "epoch")})
            # A daemon runs for months: keep trainer_state.json (rewritten at every save) bounded.
            del state.log_history[:-MAX_LOG_HISTORY]
            if hooks.on_log:
                hooks.on_log(rec)
        if hooks.on_step:
            hooks.on_step(state, rec)
        if lc.eval_steps and hooks.evaluate and state.global_step % lc.eval_steps == 0:
            ev = hooks.evaluate()
            state.log_history.append({"step": state.global_step, **ev})
            if hooks.on_log:
                hooks.on_log({"step": state.global_step, **ev})
        if hooks.save and state.global_step % lc.save_steps == 0:
            hooks.save(state)
            saved_at = state.global_step
        stop = hooks.should_stop() if hooks.should_stop else False
        if world > 1:
            stop = _all_sum([float(stop)], device)[0] > 0
        if stop:
            reason = "stopped"
            break
        if stream.exhausted():
            reason = "exhausted"
            break

    if hooks.save and state.global_step != saved_at:
        hooks.save(state)
    return reason


def _unwrap(objective):
    """The DistillObjective under a DDP wrapper (FSDP2 shards it in place)."""
    return getattr(objective, "module", objective)


@torch.no_grad()
def evaluate_loss(objective, stream_factory: Callable[[], DataStream], seq_len: int, max_batches: int,
                  device, amp_dtype=None) -> dict:
    """Mean target-token CE (and KD) over the first `max_batches` micro-batches of a fresh stream."""
    model = objective
    model.eval()
    stream = stream_factory()
    ce_t = 0.0
    n_t = 0
    for _ in range(max_batches):
        got = stream.next_micro_batch(seq_len)
        if got is None:
            break
        amp = (torch.autocast(torch.device(device).type, dtype=amp_dtype) if amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            sums = model(_to(got[0], device))
        ce_t += float(sums.ce)
        n_t += sums.n_tokens
    model.train()
    if n_t == 0:
        return {}
    return {"eval_loss": round(ce_t / n_t, 6), "eval_tokens": n_t}
