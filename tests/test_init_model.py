"""`kdforge init-model`: a random-init student folder that plain transformers loads and runs."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from safetensors.torch import load_file

from conftest import cli_here
from test_memory import cli_inprocess


def _printed_params(stdout: str) -> int:
    m = re.search(r"wrote .*?: ([\d,]+) parameters", stdout)
    assert m, stdout
    return int(m.group(1).replace(",", ""))


def test_preset_folder_loads_with_plain_transformers_and_generates(tokenizer_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    p = cli_here("init-model", "--preset", "toy", "--tokenizer", tokenizer_dir, "--out", out, "--seed", "3",
                check=True)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok) == len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    assert model.config.hidden_size == 64 and model.config.num_key_value_heads == 2
    assert _printed_params(p.stdout) == sum(t.numel() for t in model.parameters())
    enc = tok("What is 2 plus 2?", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 6
    assert isinstance(tok.decode(gen[0, enc["input_ids"].shape[1]:]), str)
    assert not list(tmp_path.glob(".student.tmp-*"))  # written aside, then renamed


def test_seed_decides_the_weights(tokenizer_dir, tmp_path, capsys):
    outs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        rc, _, err = cli_inprocess(capsys, "init-model", "--preset", "toy", "--tokenizer", tokenizer_dir,
                                   "--out", tmp_path / name, "--seed", seed)
        assert rc == 0, err
        outs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert outs["a"][key].equal(outs["b"][key])
    assert not outs["a"][key].equal(outs["c"][key])


def test_config_model_section_and_its_tokenizer_path(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg = tmp_path / "student.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"preset": "toy", "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_head": 16,
                  "ffn_dim": 64},
        "io": {"tokenizer_path": str(tokenizer_dir)},
        "train": {"max_steps": 1},
    }))
    out = tmp_path / "from_cfg"
    rc, stdout, err = cli_inprocess(capsys, "init-model", "--config", cfg, "--out", out)
    assert rc == 0, err
    conf = json.loads((out / "config.json").read_text())
    assert (conf["hidden_size"], conf["num_hidden_layers"], conf["num_attention_heads"], conf["intermediate_size"]) \
        == (32, 1, 2, 64)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert _printed_params(stdout) == sum(t.numel() for t in model.parameters())


@pytest.mark.parametrize("args,needle", [
    (["--preset", "nope"], "unknown preset 'nope'; known: toy"),
    (["--preset", "toy", "--tokenizer", "{tmp}/missing_tok"], "tokenizer folder not found: {tmp}/missing_tok"),
    (["--preset", "toy", "--config", "{tmp}/c.yaml", "--tokenizer", "{tok}"], "not both"),
    (["--tokenizer", "{tok}"], "give --preset NAME"),
    (["--preset", "toy"], "takes its vocabulary from the tokenizer"),
    (["--preset", "toy", "--tokenizer", "{tmp}"], "cannot load a tokenizer"),
    (["--config", "{tmp}/absent.yaml"], "absent.yaml"),
])
def test_bad_usage_exits_2_naming_the_problem(args, needle, tokenizer_dir, tmp_path, capsys):
    fill = {"tmp": tmp_path, "tok": tokenizer_dir}
    out = tmp_path / "out"
    rc, _, err = cli_inprocess(capsys, "init-model", *[a.format(**fill) for a in args], "--out", out)
    assert rc == 2, err
    assert needle.format(**fill) in err
    assert not out.exists()


def test_existing_out_is_kept_unless_forced(tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = cli_inprocess(capsys, "init-model", "--preset", "toy", "--tokenizer", tokenizer_dir, "--out", out)
    assert rc == 2 and "exists" in err and (out / "keep.txt").is_file()
    rc, _, err = cli_inprocess(capsys, "init-model", "--preset", "toy", "--tokenizer", tokenizer_dir, "--out", out,
                               "--force")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()

