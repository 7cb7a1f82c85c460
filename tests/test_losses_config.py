"""The objective and the loop take their config sections: the defaults live in kdforge.config only."""

from __future__ import annotations

import torch

from kdforge.config import from_dict
from kdforge.model import ModelCfg, build_student
from kdforge.train.loop import LoopConfig
from kdforge.train.objective import DistillObjective


def _cfg(train=None, **sections):
    return from_dict({"io": {"tokenizer_path": "tok", "train_shards": ["d.jsonl"]},
                      "train": {"max_steps": 1, **(train or {})}, **sections})


def test_objective_from_the_loss_section():
    model = build_student(ModelCfg(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64,
                                   ffn_dim=32, max_seq_len=16), 64, seed=0)
    teacher = object()
    for loss in ({}, {"kind": "jsd", "temperature": 2.0, "beta": 0.0, "chunk_size": 64}):
        sec = _cfg(loss=loss).loss
        obj = DistillObjective.from_config(sec, model, teacher)
        assert (obj.kind, obj.temperature, obj.beta, obj.chunk_size) == (sec.kind, sec.temperature, sec.beta,
                                                                          sec.chunk_size)
        assert obj._teacher[0] is teacher and obj.lm is model
        assert not any(p is teacher for p in obj.parameters())
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        sums = DistillObjective.from_config(_cfg().loss, model)({"input_ids": ids, "labels": ids,
                                                                 "attention_mask": torch.ones_like(ids)})
    assert sums.n_tokens == 7 and float(sums.loss(0.5, "ce")) == float(sums.ce / 7)


def test_loop_config_from_the_train_and_loss_sections():
    cfg = _cfg(train={"grad_accum": 3, "grad_clip": None, "save_steps": 7, "eval_steps": 5, "log_steps": 2},
               loss={"kind": "fkl", "kd_weight": 0.25})
    lc = LoopConfig.from_config(cfg.train, cfg.loss)
    assert lc == LoopConfig(grad_accum=3, grad_clip=None, kd_weight=0.25, kind="fkl", save_steps=7,
                            eval_steps=5, log_steps=2)
    # the daemon saves on its own schedule and never evaluates
    assert LoopConfig.from_config(cfg.train, cfg.loss, save_steps=50, eval_steps=None).save_steps == 50
    d = _cfg()  # defaults come from the config sections, not from LoopConfig's own
    assert LoopConfig.from_config(d.train, d.loss) == LoopConfig(
        grad_accum=d.train.grad_accum, grad_clip=d.train.grad_clip, kd_weight=d.loss.kd_weight, kind=d.loss.kind,
        save_steps=d.train.save_steps, eval_steps=d.train.eval_steps, log_steps=d.train.log_steps)
