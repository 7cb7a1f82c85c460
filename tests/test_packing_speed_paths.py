"""Packed rows on every attention path: best-fit-decreasing rows, and packed logits equal to each
example run alone.

The objective sends packed rows to the decoder as restarting position ids without a mask: under
sdpa, attention runs example by example (`packed_sdpa`); under eager, the model builds its own
block-diagonal mask from the position ids; a model that builds no masks from position ids gets an
explicit one (bool for sdpa, additive for eager). Each must give, fp32, the logits of the example
alone (atol 1e-5) and the gradients of the padded batch.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdforge.data.dataset import IGNORE, collate, pack_rows
from kdforge.train import objective
from kdforge.train.objective import DistillObjective, output_logits
from test_arch_matrix import _hf_config

FAMILIES = ["llama", "qwen2", "gpt2", "phi", "gemma2", "mixtral"]
PATHS = ["sdpa", "eager", "sdpa-explicit-mask", "eager-explicit-mask"]


def _next_fit_rows(lengths: list[int], L: int) -> int:
    rows, used = 1, 0
    for n in lengths:
        if used + n > L and used:
            rows, used = rows + 1, 0
        used += n
    return rows


def test_best_fit_decreasing_fills_the_rows_in_order_filling_leaves_part_empty():
    assert pack_rows([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]  # in order: [6] [5 4] [3 2]: 3 rows
    assert pack_rows([], 8) == [[]]
    assert pack_rows([12, 3], 8) == [[0], [1]]  # too long for any row: a row of its own (truncated)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=40), L=st.sampled_from([64, 100, 256]))
def test_pack_rows_takes_every_example_once_within_the_row_length(lengths, L):
    rows = pack_rows(lengths, L)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= L for row in rows)
    assert all(row == sorted(row) for row in rows)
    assert len(rows) <= _next_fit_rows(lengths, L)
    assert pack_rows(list(lengths), L) == rows  # a function of the lengths in order: resumes pack the same


@pytest.fixture(scope="module")
def models(tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        out[fam] = AutoModelForCausalLM.from_config(_hf_config(fam, len(tok), ids), dtype=torch.float32).eval()
    return out, tok.pad_token_id


def _items(vocab: int, lengths: list[int], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        x = torch.randint(3, vocab, (n,), generator=g)
        labels = x.clone()
        labels[: n // 3] = IGNORE  # a prompt
        items.append({"input_ids": x, "labels": labels})
    return items


@pytest.fixture
def on_path(monkeypatch):
    def use(model, path: str):
        impl, mask = path.split("-", 1)[0], path.endswith("explicit-mask")
        model.config._attn_implementation = impl
        if mask:
            monkeypatch.setattr(objective, "masks_from_positions", lambda decoder: False)
    return use


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_equal_each_example_alone(models, on_path, family, path):
    by_family, pad = models
    model = by_family[family]
    if family == "gemma2" and path.startswith("sdpa"):
        pytest.skip("Gemma 2 soft-caps attention scores: sdpa cannot (transformers raises)")
    if family == "gemma2" and path.endswith("explicit-mask"):
        pytest.skip("an explicit 4-D mask replaces Gemma 2's sliding-window masks too (its own path is eager)")
    on_path(model, path)
    lengths = [11, 5, 17, 1, 9, 13]
    items = _items(model.config.vocab_size, lengths)
    packed = collate(items, pad, packed_len=32)  # 3 rows, padding at the end of each
    assert packed["input_ids"].shape[0] == 2 and int((packed["seq_ids"] < 0).sum()) > 0
    with torch.no_grad():
        hidden = objective._hidden(model, packed, torch.float32)
        logits = output_logits(model, hidden)
        assert model.config._attn_implementation == path.split("-")[0], "the model's own setting is restored"
        for b, row in enumerate(packed["seq_ids"]):
            for s in row[row >= 0].unique().tolist():
                span = (row == s).nonzero().flatten()
                alone = model(input_ids=packed["input_ids"][b, span][None]).logits[0]
                torch.testing.assert_close(logits[b, span], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["sdpa", "eager", "sdpa-explicit-mask"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_gradients_equal_padded(models, on_path, family, path):
    by_family, pad = models
    model = by_family[family]
    on_path(model, path)
    items = _items(model.config.vocab_size, [23, 7, 30, 12, 4, 19], seed=1)
    grads = []
    for batch in (collate(items, pad), collate(items, pad, packed_len=48)):
        model.zero_grad()
        sums = DistillObjective(model, "ce", chunk_size=None)(batch)
        sums.ce.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)
