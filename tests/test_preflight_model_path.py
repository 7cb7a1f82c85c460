"""`kdforge preflight` on a `model.path` config of a family that is not Llama-shaped (a tiny
GPT-2 saved with save_pretrained): the memory part traces the model itself (as estimate-memory
does), and when it does not fit, training runs the same model at a smaller batch, sequence and
LoRA setup rather than a shrunk Llama-shaped architecture."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO  # noqa: F401 - the tests' import path
from fault_server import FaultConfig, FaultServer
from test_preflight import KEY, preflight, user_config

from kdforge.preflight import machine
from kdforge.preflight.report import render_text


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer_dir):
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    out = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def gpt2_config(tmp_path, gpt2_dir, teacher=None, **train):
    path = user_config(tmp_path, gpt2_dir, teacher)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {"path": str(gpt2_dir)}
    cfg["train"].update(train)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _params(folder) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(folder)).parameters())


def test_memory_traces_a_gpt2_model_path(tmp_path, gpt2_dir):
    """GPT-2's config.json has n_embd, n_layer, no intermediate_size: read as the model it is."""
    report = preflight(gpt2_config(tmp_path, gpt2_dir), tmp_path, only="memory")
    mem = report.items["memory"]
    assert mem.status == "pass", render_text(report)
    assert mem.numbers["params"] == _params(gpt2_dir)
    b = mem.numbers["breakdown"]
    assert mem.numbers["estimate_bytes"] == b["total"] == sum(v for k, v in b.items() if k != "total")
    assert "'gpt2' model" in mem.evidence and "fits" in mem.evidence


def _free_between(monkeypatch, small: int, big: int) -> None:
    free = int((small + big) / 2 / machine.FIT_SHARE)
    monkeypatch.setattr(machine, "free_memory", lambda: (free, "available CPU RAM (test)"))


def _estimates(gpt2_dir, micro_batch: int, seq: int) -> tuple[int, int]:
    """(bytes at micro_batch x seq, bytes at preflight's smaller batch x seq), float32 full training."""
    from kdforge.model.memory import Setup, estimate_model

    big = estimate_model(gpt2_dir, Setup(micro_batch=micro_batch, seq_len=seq, dtype="float32")).total
    small = estimate_model(gpt2_dir, Setup(micro_batch=machine.SHRUNK_MAX_BATCH, seq_len=seq, dtype="float32")).total
    return small, big


def test_a_model_path_that_does_not_fit_trains_itself_at_a_smaller_batch(tmp_path, gpt2_dir, monkeypatch):
    """Too big here at batch 64: memory warns with the options (a smaller batch), training runs the same
    GPT-2 at batch 2 (said so), checkpoint, SIGKILL, resume. No architecture is shrunk."""
    small, big = _estimates(gpt2_dir, 64, 64)
    assert small < big
    _free_between(monkeypatch, small, big)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        cfg = gpt2_config(tmp_path, gpt2_dir, srv.url, micro_batch_size=64)
        report = preflight(cfg, tmp_path, only="training", samples=8)
    text = render_text(report)
    mem, tr = report.items["memory"], report.items["training"]
    assert mem.status == "warn" and "does not fit" in mem.evidence, text
    assert mem.numbers["params"] == _params(gpt2_dir)
    assert "train.micro_batch_size 2 and train.seq_lengths up to 64" in mem.fix, mem.fix
    assert tr.status in ("pass", "warn") and tr.numbers["shrunk"], text
    assert "the model as configured" in tr.evidence and "batch 2 x 64" in tr.evidence, tr.evidence
    assert "layers, d_model" not in tr.evidence  # no shrunk architecture
    written = json.loads((tmp_path / "scratch" / "training" / "run" / "checkpoint-5" / "config.json").read_text())
    assert (written["model_type"], written["n_embd"], written["n_layer"]) == ("gpt2", 32, 2)
    assert report.items["resume"].status == "pass", text
    assert report.exit_code == 0, text


def test_a_model_path_whose_weights_cannot_fit_says_training_cannot_run_here(tmp_path, gpt2_dir, monkeypatch):
    """Not even batch 2 with LoRA fits: memory warns, training is not run (with why and where it
    could), the resume after it neither; nothing is shrunk into another model."""
    from kdforge.config import load_config
    from kdforge.preflight import training

    monkeypatch.setattr(machine, "free_memory", lambda: (1000, "available CPU RAM (test)"))
    cfg = load_config([gpt2_config(tmp_path, gpt2_dir)])
    mem, student = machine.check_memory(cfg, None)
    assert mem.status == "warn" and "does not fit" in mem.evidence
    assert student.skip and "cannot train here" in student.skip, student.skip
    item, losses = training.check_training({}, tmp_path / "none.jsonl", tmp_path / "work", student)
    assert item.status == "warn" and item.evidence == student.skip and "at least" in item.fix and losses == {}
    assert training.check_resume({}, tmp_path / "none.jsonl", tmp_path / "work", student, {}).status == "skip"
    assert not (tmp_path / "work").exists()
