"""Student builder and tokenizer: the seed's ModelCfg builds a GQA Llama that plain transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_here, synthetic_records, write_jsonl
from kdforge.model import PRESETS, ModelCfg, StudentLM, build_student


def test_seed_toy_snippet():
    """The seed plan's memory check, on our StudentLM (outputs carry `.logits`, as in transformers)."""
    cfg = ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=32000)
    model = StudentLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.num_params()
    assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 4  # GQA
    with torch.no_grad():
        logits = model(torch.randint(0, 32000, (1, 128))).logits
    assert logits.shape == (1, 128, 32000)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts_are_exact(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = build_student(cfg, 8000 if cfg.vocab_size is None else None)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params(8000)


def test_9b_preset_is_about_nine_billion():
    assert 8.9e9 < PRESETS["9b"].num_params() < 9.1e9


def test_bad_shapes_are_named():
    problems = dict(ModelCfg(d_model=60, n_heads=8, n_kv_heads=3, d_head=None).problems())
    assert "n_kv_heads" in problems and "d_head" in problems


def test_saved_student_is_a_plain_llama_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model = StudentLM(ModelCfg(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300,
                               ffn_dim=64, max_seq_len=64))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    x = torch.randint(0, 300, (1, 10))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)


def test_tokenizer_train_cli(tmp_path):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(100))
    r = cli_here("tokenizer", "train", "--data", data, "--vocab-size", 400, "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert 256 < len(tok) <= 400 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless round trip
    assert tok.decode(tok("naïve — ünïcode ✓")["input_ids"]) == "naïve — ünïcode ✓"
    r = cli_here("tokenizer", "train", "--data", tmp_path / "missing.jsonl", "--vocab-size", 400, "--out", tmp_path / "t2")
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "not found" in r.stderr


def test_student_output_is_the_seeds_logits_and_a_plain_model_output(tmp_path):
    """Seed section 6 treats `model(input_ids)` as the logits: shape, numel, element_size answer
    for them; `.logits`, `.loss`, indexing and the saved folder stay plain transformers."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = StudentLM(ModelCfg(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300, ffn_dim=64,
                               max_seq_len=64))
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, CausalLMOutputWithPast)
    assert out.shape == out.logits.shape == (2, 10, 300) and out.size(-1) == 300 and out.dim() == 3
    assert out.numel() * out.element_size() == 2 * 10 * 300 * 4 and out.dtype == torch.float32
    assert out[0] is out.logits and "logits" in out.keys()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert isinstance(model(x, return_dict=False), tuple)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "LlamaForCausalLM" and type(loaded(x)).__name__ == "CausalLMOutputWithPast"
    assert type(build_student(ModelCfg(vocab_size=300, max_seq_len=64))(x)).__name__ == "CausalLMOutputWithPast"
