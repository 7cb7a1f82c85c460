"""Config: YAML merge, overrides, and every problem reported at once with its field (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, cli_here
from kdforge.config import load_config, merge_configs
from kdforge.errors import ConfigError
from kdforge.model import ModelCfg, write_student


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_merge_left_to_right_then_overrides(tmp_path):
    a = _write(tmp_path, "a.yaml", {"train": {"lr": 1e-3, "max_steps": 10, "seq_lengths": [64]}})
    b = _write(tmp_path, "b.yaml", {"train": {"lr": 2e-3}, "loss": {"kind": "fkl"}})
    cfg = load_config([a, b], ["train.max_steps=20", "loss.temperature=2"])
    assert cfg.train.lr == 2e-3 and cfg.train.max_steps == 20 and cfg.train.seq_lengths == [64]
    assert cfg.loss.kind == "fkl" and cfg.loss.temperature == 2.0
    assert merge_configs([a], ["model.lora={r: 4}"])["model"]["lora"] == {"r": 4}


def test_every_problem_at_once_with_its_field(tmp_path, tokenizer_dir):
    bad = _write(tmp_path, "bad.yaml", {
        "model": {"preset": "toy", "n_kv_heads": 3},
        "io": {"tokenizer_path": str(tmp_path / "no_tokenizer"), "train_shards": []},
        "train": {"micro_batch_size": 0, "grad_accum": -1, "seq_lengths": [1024, 0], "max_steps": 10,
                  "lrr": 0.1},
        "bogus": {"x": 1},
    })
    r = cli_here("config", "validate", bad)
    assert r.returncode == 2, r.stdout + r.stderr
    for field in ("train.micro_batch_size", "train.grad_accum", "train.seq_lengths", "train.lrr",
                  "bogus", "model.n_kv_heads", "io.tokenizer_path", "io.train_shards"):
        assert f"- {field}:" in r.stderr, (field, r.stderr)
    assert "unknown key in section 'train'" in r.stderr
    assert "kdforge tokenizer train" in r.stderr  # says how to fix the missing tokenizer


def test_seq_length_above_model_max(tmp_path, tokenizer_dir):
    c = _write(tmp_path, "c.yaml", {"model": {"preset": "toy"}, "train": {"max_steps": 5, "seq_lengths": [128, 4096]},
                                    "io": {"tokenizer_path": str(tokenizer_dir), "train_shards": ["x.jsonl"]}})
    r = cli_here("config", "validate", c)
    assert r.returncode == 2
    assert "train.seq_lengths: 4096 is above the model's max_seq_len (512)" in r.stderr


def test_lora_targets_must_exist_and_teacher_vocab_must_match(tmp_path, tokenizer_dir, tiny_model_dir):
    other = tmp_path / "other_vocab"
    # narrower than the student's 512 ids (a wider one is a padded embedding: trained on the shared ids)
    write_student(ModelCfg(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300, ffn_dim=64,
                           max_seq_len=64), None, other)
    c = _write(tmp_path, "c.yaml", {
        "model": {"preset": None, "path": str(tiny_model_dir),
                  "lora": {"r": 4, "target_modules": ["q_proj", "attn_qkv"]}},
        "teacher": {"path": str(other)}, "loss": {"kind": "fkl"},
        "io": {"tokenizer_path": str(tokenizer_dir), "train_shards": ["later.jsonl"]},
        "train": {"max_steps": 5, "seq_lengths": [64]}})
    r = cli_here("config", "validate", c)
    assert r.returncode == 2
    assert "model.lora.target_modules: ['attn_qkv'] not in the model" in r.stderr
    assert "q_proj" in r.stderr  # lists what the model has
    assert "teacher.path: teacher vocabulary (300) differs from the student's" in r.stderr


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  lr: [1, 2\n")
    r = cli_here("config", "validate", p)
    assert r.returncode == 2 and "invalid YAML" in r.stderr and str(p) in r.stderr
    r = cli_here("config", "validate", tmp_path / "missing.yaml")
    assert r.returncode == 2 and "file not found" in r.stderr


def test_bad_override_is_usage_error():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config([], ["train.lr"])


@pytest.mark.parametrize("name", ["toy.yaml", "small.yaml", "worker_9b.yaml", "daemon.yaml"])
def test_shipped_configs_validate(name):
    path = REPO / "configs" / name
    if not path.exists():
        pytest.fail(f"configs/{name} is missing")
    r = cli_here("config", "validate", path, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith(("ok", "note"))
