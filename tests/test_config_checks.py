"""The config's schema apart from its checks (issue 25 §3): every field says what it means, the
defaults live in the tree only, and the job a config is for is named where the caller knows it."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cli_here
from kdforge import config
from kdforge.config import Config, Section, config_job, from_dict, load_config
from kdforge.errors import ConfigError


def _sections(model=Config):
    """Every Section class in the tree, the tree itself included."""
    seen = [model]
    for info in model.model_fields.values():
        for arg in [info.annotation, *getattr(info.annotation, "__args__", ())]:
            if isinstance(arg, type) and issubclass(arg, Section) and arg not in seen:
                seen += [s for s in _sections(arg) if s not in seen]
    return seen


def test_every_field_of_the_tree_has_a_description():
    missing = [f"{s.__name__}.{name}" for s in _sections() for name, info in s.model_fields.items()
               if not (info.description or "").strip()]
    assert len(_sections()) >= 10 and missing == []


def test_the_loop_and_the_objective_take_their_defaults_from_the_tree():
    from kdforge.train.loop import LoopConfig
    from kdforge.train.objective import DistillObjective

    train, loss = config.TrainSection(), config.LossSection()
    for f in dataclasses.fields(LoopConfig):
        assert f.default == getattr(train if f.name in config.TrainSection.model_fields else loss, f.name), f.name
    params = inspect.signature(DistillObjective.__init__).parameters
    for name in ("kind", "temperature", "beta", "chunk_size"):
        assert params[name].default == getattr(loss, name), name


def _daemon_yaml(tmp_path: Path, **sections) -> Path:
    body = {"daemon": {"save_steps": 5}, **sections}
    p = tmp_path / "daemon_ünï_漢字.yaml"
    p.write_text(yaml.safe_dump(body, allow_unicode=True), encoding="utf-8")
    return p


def test_the_daemon_job_is_explicit(tmp_path):
    # model.path without daemon.base_model: its shape looks like a training run's, which needs a
    # step count; the daemon command says it is a daemon's (open-ended batches, no step count).
    cfg_file = _daemon_yaml(tmp_path, model={"path": str(tmp_path / "modèle")})
    with pytest.raises(ConfigError) as guessed:
        load_config([cfg_file])
    assert "train.max_steps" in str(guessed.value)
    assert load_config([cfg_file], job="daemon").model.path.endswith("modèle")
    # the real command: refused for what is really wrong (no model folder), not for a step count
    r = cli_here("daemon", "--base-dir", str(tmp_path / "base"), "--config", str(cfg_file), "--once")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "model.path" in r.stderr and "config.json" in r.stderr and "train.max_steps" not in r.stderr
    assert not (tmp_path / "base").exists()  # refused before the lock made the base dir


@settings(max_examples=40, deadline=None)
@given(base=st.one_of(st.none(), st.text(min_size=1, max_size=12)),
       shards=st.lists(st.text(alphabet="abcé漢😀/._-", min_size=1, max_size=10), max_size=2))
def test_the_guessed_job_is_what_the_shape_says(base, shards):
    cfg = Config.model_validate({"daemon": {"base_model": base}, "io": {"train_shards": shards}})
    assert config_job(cfg) == ("daemon" if base is not None and not shards else "train")


def test_static_checks_of_a_daemon_skip_the_training_rules():
    data = {"daemon": {"base_model": "base"}, "io": {"train_shards": ["d.jsonl"]}, "model": {"preset": "nope"}}
    with pytest.raises(ConfigError) as e:  # shaped like a training run: a preset and a step count
        from_dict(data)
    assert "model.preset" in str(e.value)
    assert from_dict(data, job="daemon").daemon.base_model == "base"


def test_the_checks_live_only_in_config_checks():
    from kdforge import config_checks

    for name in ("check_config", "config_notes", "validate_files", "looks_like_hub_id"):
        assert callable(getattr(config_checks, name))
        with pytest.raises(AttributeError):  # no forwarding shim left in kdforge.config
            getattr(config, name)
