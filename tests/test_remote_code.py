"""trust_remote_code (issue 22): a model or tokenizer folder whose config names its own Python code
(`auto_map`) is never run by kdforge, whatever stdin answers: transformers asked "Do you wish to run
the custom code? [y/N]" and ran it on "y". Each loader (train, serve, eval, a tokenizer; the daemon's start checks as train's does)
refuses such a folder with one clear message and exit 2; the code's marker file never appears."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import cli_env, synthetic_records, write_jsonl

PROMPT = "Do you wish to run the custom code"


def marker_code(folder: Path, marker: Path) -> None:
    """marker.py: importing it writes `marker` (an absolute path: transformers copies the code into its
    module cache before it runs it)."""
    (folder / "marker.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
        "class MarkerConfig(PretrainedConfig):\n    model_type = 'kdforge_marker'\n"
        "class MarkerTokenizer(PreTrainedTokenizerFast):\n    pass\n")


@pytest.fixture
def remote_model(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """A copy of the tiny model whose config.json needs its own code (an architecture transformers lacks)."""
    folder, marker = tmp_path / "modèle_distant", tmp_path / "RAN"
    shutil.copytree(tiny_model_dir, folder)
    conf = json.loads((folder / "config.json").read_text())
    conf.update(model_type="kdforge_marker", auto_map={"AutoConfig": "marker.MarkerConfig",
                                                        "AutoModelForCausalLM": "marker.MarkerModel"})
    (folder / "config.json").write_text(json.dumps(conf))
    marker_code(folder, marker)
    return folder, marker


@pytest.fixture
def remote_tokenizer(tmp_path, tokenizer_dir) -> tuple[Path, Path]:
    """A copy of the tests' tokenizer whose tokenizer_config.json names a tokenizer class of its own code."""
    folder, marker = tmp_path / "tok_distant", tmp_path / "RAN_TOK"
    shutil.copytree(tokenizer_dir, folder)
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    conf.update(tokenizer_class="MarkerTokenizer", auto_map={"AutoTokenizer": [None, "marker.MarkerTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    marker_code(folder, marker)
    return folder, marker


def kdforge(*args) -> subprocess.Popen:
    """A kdforge process whose stdin answers "y" to any prompt, then ends."""
    r, w = os.pipe()
    os.write(w, b"y\ny\ny\n")
    os.close(w)
    try:
        return subprocess.Popen([sys.executable, "-m", "kdforge", *map(str, args)], env=cli_env(), text=True,
                                stdin=r, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        os.close(r)


def finish(p: subprocess.Popen) -> tuple[int, str]:
    out, err = p.communicate(timeout=240)
    return p.returncode, out + err


def assert_refused(result: tuple[int, str], folder: Path, marker: Path) -> None:
    code, text = result
    assert not marker.exists(), f"the folder's code ran:\n{text}"
    assert PROMPT not in text, text
    assert code == 2, text
    assert str(folder) in text and "trust_remote_code" in text and "Traceback" not in text, text


def test_every_loader_refuses_a_model_folders_code(tmp_path, remote_model, tokenizer_dir):
    folder, marker = remote_model
    data = write_jsonl(tmp_path / "données.jsonl", synthetic_records(8))
    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump({"model": {"path": str(folder)}, "loss": {"kind": "ce"},
                                         "io": {"train_shards": [str(data)], "output_dir": str(tmp_path / "out")},
                                         "train": {"max_steps": 1, "seq_lengths": [32]}}))
    # Together: each one is mostly interpreter start-up.
    procs = {"train": kdforge("train", "--config", train_cfg),
             "serve": kdforge("serve", folder, "--port", "0"),
             "eval": kdforge("eval", folder, "--data", data, "--max-new-tokens", "2")}
    for name, p in procs.items():
        result = finish(p)
        assert_refused(result, folder, marker), name


def test_a_tokenizer_folders_code_is_refused(tmp_path, remote_tokenizer):
    folder, marker = remote_tokenizer
    data = write_jsonl(tmp_path / "data.jsonl", synthetic_records(8))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"preset": "toy", "max_seq_len": 64}, "loss": {"kind": "ce"},
                                   "io": {"tokenizer_path": str(folder), "train_shards": [str(data)],
                                          "output_dir": str(tmp_path / "out")},
                                   "train": {"max_steps": 1, "seq_lengths": [32]}}))
    assert_refused(finish(kdforge("train", "--config", cfg)), folder, marker)
