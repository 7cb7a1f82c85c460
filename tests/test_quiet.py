"""Quiet commands (issue 24 §7): no library deprecation noise around LoRA (daemon, serve --adapter,
LoRA eval), no "Writing model shards" bar from init-model, `data inspect` says what its token
counts are, and smoke and preflight leave no /tmp/kdforge-* folder behind."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml
from conftest import run_cli

from kdforge.demo import TEACHER_DIR


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A real PEFT adapter saved on the tiny model (B moved off zero so the merge changes weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdforge.model.adapters import with_lora
    from kdforge.model.student import peft_lora_config

    model = with_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), peft_lora_config(4, 8, 0.0, None))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(out))
    return out


def test_lora_paths_raise_no_future_warning(tiny_model_dir, adapter_dir):
    """Every PEFT call kdforge makes, with FutureWarnings as errors: training's wrap, serve's and
    eval's adapter loading (was: `is_gradient_checkpointing` is deprecated, from PEFT's wrap)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kdforge.eval.model_dir import load_model, resolve_model_dir
    from kdforge.model.adapters import merged_adapter, with_lora
    from kdforge.model.student import peft_lora_config
    from kdforge.serve.loader import load_served_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        wrapped = with_lora(base, peft_lora_config(4, 8, 0.0, None))
        assert any("lora_A" in n for n, _ in wrapped.named_parameters())
        merged = merged_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter_dir))
        served = load_served_model(tiny_model_dir, adapter_dir, device="cpu")
        evaluated = load_model(resolve_model_dir(adapter_dir, base=tiny_model_dir), "cpu")
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    for m in (merged, served.model, evaluated):  # the adapter really was merged
        sd = m.state_dict()
        assert any(not torch.equal(sd[k], plain[k]) for k in plain if k in sd)


def test_init_model_prints_no_progress_bar(tmp_path):
    p = run_cli("init-model", "--preset", "toy", "--tokenizer", TEACHER_DIR, "--out", tmp_path / "m", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Writing model shards" not in p.stdout + p.stderr
    assert "wrote" in p.stdout


def write_records(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_data_inspect_says_what_the_token_counts_are(tmp_path):
    f = tmp_path / "kd.jsonl"
    write_records(f, [
        {"prompt": "Trie: ç b à 漢 🙂", "teacher_text": "à b ç",
         "metadata": {"tokens": {"prompt": 21, "completion": 6, "total": 27}, "finish_reason": "stop"}},
        {"prompt": "long", "teacher_text": "cut off",
         "metadata": {"tokens": {"prompt": 3, "completion": 8, "total": 11}, "finish_reason": "length"}},
        {"prompt": "no counts", "teacher_text": "x"},
    ])
    p = run_cli("data", "inspect", f, "-n", "3", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = [x.strip() for x in p.stdout.splitlines() if x.strip().startswith("Tokens:")]
    assert len(lines) == 3, p.stdout
    assert "{" not in p.stdout  # no raw dict
    assert lines[0].startswith("Tokens: 21 prompt + 6 completion = 27") and "end-of-answer token" in lines[0]
    assert "cut at max_tokens" in lines[1] and "end-of-answer" not in lines[1]
    assert "not recorded" in lines[2]
    assert "Trie: ç b à 漢 🙂" in p.stdout


def test_smoke_and_preflight_leave_no_temp_folder(tmp_path, monkeypatch):
    """With no --workdir: smoke removes its temp dir; preflight removes its scratch dir when nothing
    failed and keeps it (the evidence) when a check failed, saying where."""
    import tempfile

    from kdforge.preflight import PreflightOptions, run_preflight
    from kdforge.train.smoke import run_smoke

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    lines = []
    result = run_smoke(log=lines.append)
    assert result["global_step"] == 10
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())
    assert "removed" in lines[-1] and "--workdir" in lines[-1]

    cfg = tmp_path / "cfg.yaml"
    body = {"model": {"preset": "toy"}, "io": {"tokenizer_path": str(TEACHER_DIR), "train_shards": ["kd.jsonl"]},
            "loss": {"kind": "ce"}, "train": {"max_steps": 10, "seq_lengths": [64]}}
    cfg.write_text(yaml.safe_dump(body))
    report = run_preflight(PreflightOptions([str(cfg)], only="config", log=lambda m: None))
    assert report.exit_code == 0
    assert list(tmp.iterdir()) == [] and not report.kept
    body["io"]["tokenizer_path"] = str(tmp_path / "missing_tokenizer")
    cfg.write_text(yaml.safe_dump(body))
    report = run_preflight(PreflightOptions([str(cfg)], only="config", log=lambda m: None))
    assert report.exit_code == 2 and report.kept
    kept = list(tmp.iterdir())
    assert len(kept) == 1 and (kept[0] / "preflight_report.md").is_file()


def test_batch_progress_shows_a_pace_not_zero_requests(tmp_path):
    """generate --batch sends rows in files, never one request at a time: its progress lines showed
    "0 req/min" throughout; they show samples/min."""
    from fault_server import FaultConfig, FaultServer
    from generate_cli import KEY, gen_in_process

    with FaultServer(FaultConfig(api_key=KEY, batch_latency=0.1)) as srv:
        r, out, err = gen_in_process(tmp_path, srv.url, total=10, batch_size=5, batch=True, batch_poll=0.05,
                                     price_input=3.0, price_output=15.0)
    assert not isinstance(r, Exception), err
    progress = [x for x in err.splitlines() if "samples ·" in x]
    assert progress, err
    assert not any(" 0 req/min" in x for x in progress), progress
    assert "samples/min" in progress[-1], progress


def test_a_served_teacher_leaves_no_temp_folder(tmp_path, monkeypatch):
    """`launch` (demo, preflight, tests) removes the log folder it made, and `kdforge serve` without
    --batch-dir removes its Batch API folder when it stops (184 /tmp/kdforge-* folders piled up)."""
    import tempfile

    from conftest import cli_env
    from kdforge.serve.launch import launch

    mine, child = tmp_path / "mine", tmp_path / "child"
    mine.mkdir()
    child.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(mine))
    def ours(folder):  # torch may leave its own cache folder (torchinductor_*): not ours to remove
        return sorted(p.name.split("-")[1] for p in folder.glob("kdforge-*"))

    with launch(TEACHER_DIR, env=cli_env(TMPDIR=child)) as server:
        assert ours(mine) == ["serve"] and ours(child) == ["batches"]  # while it runs
    assert server.process.returncode == 0
    assert ours(mine) == [] and ours(child) == []
