"""`build_session` the way the daemon uses it: a base model folder, no data at build time, data
streams fed afterwards, a checkpoint loaded into a live session, an optimizer rebuilt on a new
base with the schedule going on."""

from __future__ import annotations

import pytest
import torch

from conftest import synthetic_records, write_jsonl
from kdforge.config import from_dict
from kdforge.data.dataset import KDDataset
from kdforge.train import checkpoint as ckpt
from kdforge.train.checkpoint import TrainState
from kdforge.train.data_stream import DataStream
from kdforge.train.loop import train_steps
from kdforge.train.schedule import LRMultiplier
from kdforge.train.session import build_session


def _daemon_cfg(base):
    return from_dict({"model": {"preset": None, "lora": {"r": 4, "alpha": 8, "dropout": 0.2,
                                                         "target_modules": ["q_proj", "v_proj"]}},
                      "daemon": {"base_model": str(base)},
                      "train": {"micro_batch_size": 2, "seq_lengths": [64], "lr": 1e-2, "warmup_steps": 4}})


def _train(session, data, steps_from: TrainState, n: int) -> TrainState:
    ds = KDDataset(data, tokenizer=session.tokenizer, max_seq_length=64)
    train_steps(session.objective, session.optimizer, session.scheduler, DataStream(ds, 2, seed=1), steps_from,
                session.loop, until_step=steps_from.global_step + n, seq_len_at=lambda s: 64,
                device=session.device, amp_dtype=session.amp_dtype)
    return steps_from


def test_a_daemon_shaped_session_trains_saves_resumes_and_rebuilds(tmp_path, tiny_model_dir):
    cfg = _daemon_cfg(tiny_model_dir)
    wsd = LRMultiplier("wsd", 4, None)  # the daemon's open-ended schedule: warmup, then the peak
    data = write_jsonl(tmp_path / "batch.jsonl", synthetic_records(16, seed=5))

    a = build_session(cfg, model_path=str(tiny_model_dir), schedule=wsd, save_steps=3, install_signals=False)
    assert a.base_model == str(tiny_model_dir) and ckpt.is_peft(a.model) and a.loop.save_steps == 3
    state = _train(a, data, TrainState(), 2)
    saved = a.save(tmp_path / "ckpts", state, keep=2)
    assert saved.name == "checkpoint-2" and (saved / ckpt.ADAPTER_WEIGHTS).is_file()

    # A second session loads the checkpoint and continues exactly as the first one does.
    b = build_session(cfg, model_path=str(tiny_model_dir), schedule=wsd, install_signals=False)
    resumed = b.resume(saved)
    assert resumed.global_step == 2
    assert [g["lr"] for g in b.optimizer.param_groups] == [g["lr"] for g in a.optimizer.param_groups]
    rng = torch.get_rng_state()  # the checkpoint's: both sessions share this process's RNG
    _train(a, data, state, 2)
    torch.set_rng_state(rng)
    _train(b, data, resumed, 2)
    assert [h["loss"] for h in resumed.log_history] == [h["loss"] for h in state.log_history]

    # Consolidation: a new student on a new base, a fresh optimizer, the schedule at the same step.
    step = b.scheduler.last_epoch
    b.rebuild(str(tiny_model_dir))
    assert b.scheduler.last_epoch == step and len(b.optimizer.state) == 0
    want = 1e-2 * wsd(step)
    assert [g["lr"] for g in b.optimizer.param_groups] == pytest.approx([want, want])
    assert all(p.requires_grad for p in b.optimizer.param_groups[0]["params"])
    with pytest.raises(Exception, match="does not fit this config"):
        full = build_session(cfg.model_copy(update={"model": cfg.model.model_copy(update={"lora": None})}),
                             model_path=str(tiny_model_dir), install_signals=False)
        full.resume(saved)  # an adapter checkpoint into a full-training session: a clear error
