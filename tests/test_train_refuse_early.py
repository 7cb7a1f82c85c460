"""A training run that cannot start is refused before any model loads (a 9B student takes minutes to
load; the refusal used to come after it): a fresh run into a dir that holds checkpoints, a --resume
that names no complete checkpoint. The model loader is replaced by one that fails the test."""

from __future__ import annotations

import pytest

from conftest import cli_here
from train_helpers import train_config


def test_refusals_come_before_the_model_loads(tmp_path, tokenizer_dir, data_file, monkeypatch):
    from kdforge.train import runner

    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=3, save_steps=3)
    assert cli_here("train", "--config", cfg).returncode == 0

    def no_load(*a, **kw):
        pytest.fail("the model was loaded before the run was refused")

    monkeypatch.setattr(runner, "build_session", no_load)
    r = cli_here("train", "--config", cfg, "--resume", "none")
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr, r.stderr
    r = cli_here("train", "--config", cfg, "--resume", str(tmp_path / "nope_ø"))
    assert r.returncode == 2 and "not a complete checkpoint" in r.stderr, r.stderr
