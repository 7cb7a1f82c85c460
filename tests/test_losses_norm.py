"""KD is normalised by the positions that HAVE teacher data, not by every target.

EOS (no teacher row) and CE-only records (text lines) used to count in the KD denominator, so the
effective kd_weight shrank with the teacher's coverage. Counted per optimizer step, over every
micro-batch (and rank), like CE's denominator.
"""

from __future__ import annotations

import pytest
import torch

from kdforge.data.dataset import IGNORE, KDDataset, collate
from kdforge.data.records import parse_record
from kdforge.model import ModelCfg, build_student
from kdforge.train.checkpoint import TrainState
from kdforge.train.data_stream import DataStream
from kdforge.train.loop import LoopConfig, train_steps
from kdforge.train.objective import DistillObjective
from kdforge.train.schedule import make_scheduler
from test_packing import kd_rows

KD_TEXTS = ["alpha bravo plus 7", "is 12 plus 34", "sort echo delta golf"]
CE_TEXTS = ["charlie hotel india juliet", "foxtrot alpha bravo"]


def _dataset(tok):
    recs = [{"prompt": "Q", "teacher_text": t, "teacher_logprobs": kd_rows(tok, t, n)} for n, t in enumerate(KD_TEXTS)]
    recs += [{"text": t} for t in CE_TEXTS]
    return KDDataset(None, tokenizer=tok, max_seq_length=64, with_topk=True, records=[parse_record(r) for r in recs])


def _model(tok):
    torch.manual_seed(0)
    return build_student(ModelCfg(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=None,
                                  ffn_dim=64, max_seq_len=64), len(tok), seed=0)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _covered(batch) -> int:
    """Target positions whose teacher row holds at least one id, counted from the batch itself."""
    sel = batch["labels"][:, 1:] != IGNORE
    return int(((batch["topk_ids"][:, 1:] >= 0).any(-1) & sel).sum())


def test_kd_mean_is_over_positions_with_teacher_data(tok):
    ds = _dataset(tok)
    assert ds.ce_only == len(CE_TEXTS)
    batch = collate([ds[i] for i in range(len(ds))], tok.pad_token_id)
    obj = DistillObjective(_model(tok), "fkl")
    with torch.no_grad():
        sums = obj(batch)
    n_kd = _covered(batch)
    assert 0 < n_kd < sums.n_tokens  # EOS and the text lines have no teacher row
    assert sums.n_kd_tokens == n_kd and obj.token_counts(batch) == (sums.n_tokens, n_kd)
    w = 0.7
    want = (1 - w) * sums.ce / sums.n_tokens + w * sums.kd / n_kd
    torch.testing.assert_close(sums.loss(w, "fkl"), want, rtol=0, atol=0)
    # Adding CE-only rows leaves the KD mean as it was: kd_weight does not shrink with coverage.
    kd_only = collate([ds[i] for i in range(len(KD_TEXTS))], tok.pad_token_id)
    with torch.no_grad():
        base = obj(kd_only)
    torch.testing.assert_close(base.kd / base.n_kd_tokens, sums.kd / sums.n_kd_tokens, rtol=1e-5, atol=0)


def test_the_loop_logs_and_trains_the_covered_mean(tok):
    """One step of train_steps: the logged kd is kd_sum / covered positions of the whole step."""
    ds = _dataset(tok)
    model = _model(tok)
    obj = DistillObjective(model, "fkl")
    all_items = collate([ds[i] for i in range(len(ds))], tok.pad_token_id)
    with torch.no_grad():
        ce, kd, n = obj(all_items)
    logs = []
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_steps(obj, opt, make_scheduler(opt, "constant", 0, None), DataStream(ds, 1, seed=0), TrainState(),
                LoopConfig(grad_accum=len(ds), grad_clip=None, kind="fkl", kd_weight=0.5), until_step=1,
                seq_len_at=lambda s: 64, hooks=_hooks(logs))
    rec = logs[0]
    assert rec["kd"] == pytest.approx(kd.item() / _covered(all_items), rel=1e-5)
    assert rec["loss"] == pytest.approx(0.5 * ce.item() / n + 0.5 * rec["kd"], rel=1e-5)
    assert rec["kd_tokens"] == _covered(all_items)


def _hooks(logs):
    from kdforge.train.loop import Hooks

    return Hooks(on_log=logs.append)


def test_grad_accumulation_with_uneven_coverage_equals_one_batch(tok):
    """Counts are the step's, not the micro-batch's: a micro-batch of CE-only rows beside a KD one
    gives the same update as both in one micro-batch."""
    ds = _dataset(tok)
    out = []
    for micro, accum in ((len(ds), 1), (1, len(ds))):
        model = _model(tok)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train_steps(DistillObjective(model, "fkl"), opt, make_scheduler(opt, "constant", 0, None),
                    DataStream(ds, micro, seed=0), TrainState(),
                    LoopConfig(grad_accum=accum, grad_clip=None, kind="fkl", kd_weight=0.5),
                    until_step=1, seq_len_at=lambda s: 64)
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], rtol=1e-5, atol=1e-6)
