"""A teacher whose context is smaller than max_tokens (issue 24 §3, §4): `kdforge serve` on the
shipped teacher (64 tokens, advertised as max_model_len at GET /v1/models, as vLLM does).

preflight takes `--max-tokens` and `a.b=c` overrides like train and daemon, and its verdict names
the real cause (max_tokens above the teacher's context) before paying for refused requests;
where the server does not advertise its context, the budget item names what the teacher
answered instead of calling it a kdforge bug. `generate --dry-run` warns the same way."""

from __future__ import annotations

import pytest
import yaml
from conftest import cli_env, run_cli
from fault_server import FaultConfig, FaultServer

from kdforge.demo import TEACHER_DIR
from kdforge.preflight import PreflightOptions, run_preflight
from kdforge.preflight.report import render_text


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """kdforge serve on the shipped teacher: a 64-token context."""
    from kdforge.serve import launch

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with launch(TEACHER_DIR, env=cli_env(), log_path=log) as server:
        yield server


def sort_prompts(tmp_path, n: int = 12):
    """The shipped teacher's own task, with non-ASCII letters in half the prompts."""
    from kdforge.demo.task import make_prompts

    rows = [r["prompt"] for r in make_prompts(n, 0, "train")]
    rows = [p.replace("a", "é") if i % 2 else p for i, p in enumerate(rows)]
    path = tmp_path / "prompts_ü.txt"
    path.write_text("".join(p + "\n" for p in rows), encoding="utf-8")
    return path


def config(tmp_path, teacher: str, model: str, prompts, **generate):
    """A user's config without max_tokens (generate's default, 512) unless given."""
    user = tmp_path / "user"
    cfg = {"model": {"preset": "toy"},
           "io": {"tokenizer_path": str(TEACHER_DIR), "train_shards": [str(user / "kd.jsonl")],
                  "output_dir": str(user / "runs")},
           "loss": {"kind": "ce"}, "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [64],
                                             "max_steps": 100},
           "generate": {"teacher": teacher, "model": model, "prompts": [str(prompts)], "concurrency": 2,
                        "price_input": 1.0, "price_output": 2.0, **generate}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def preflight(cfg, tmp_path, only: str, **kw):
    return run_preflight(PreflightOptions([str(cfg)], only=only, workdir=str(tmp_path / "scratch"),
                                          log=lambda m: None, samples=4, **kw))


def test_max_tokens_above_the_context_is_named_before_anything_is_paid(tmp_path, small_teacher):
    cfg = config(tmp_path, small_teacher.base_url, small_teacher.model, sort_prompts(tmp_path))
    for key in ("generation", "budget"):
        report = preflight(cfg, tmp_path / key, key)
        text = render_text(report)
        it = {i.key: i for i in report.ordered()}[key]
        assert it.status == "fail", text
        assert "max_tokens 512" in it.evidence and "context is 64 tokens" in it.evidence, text
        assert "--max-tokens" in it.fix, text
        assert "kdforge bug" not in text
        assert report.spent_usd == 0  # named before sending: nothing paid for refused requests
    report = preflight(cfg, tmp_path / "api", "api")
    assert report.exit_code == 0, render_text(report)  # the probe's 8 tokens fit: the endpoint works


def test_max_tokens_flag_and_overrides_make_it_pass(tmp_path, small_teacher):
    cfg = config(tmp_path, small_teacher.base_url, small_teacher.model, sort_prompts(tmp_path))
    env = cli_env()
    p = run_cli("preflight", "--config", cfg, "--only", "budget", "--max-tokens", "16",
                "--workdir", tmp_path / "flag", "generate.concurrency=1", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[PASS] Budget enforcement stops at limit" in p.stdout
    report = preflight(cfg, tmp_path / "over", "budget", overrides=["generate.max_tokens=16"])
    assert report.exit_code == 0, render_text(report)
    # an override naming no field is a usage error naming it
    p = run_cli("preflight", "--config", cfg, "--only", "budget", "--workdir", tmp_path / "bad",
                "generate.max_tokenz=16", env=env)
    assert p.returncode == 2
    assert "generate.max_tokenz" in p.stderr


def test_a_rejecting_teacher_without_a_context_is_named_not_a_kdforge_bug(tmp_path):
    """The server does not advertise its context (the fault server, like OpenAI) and answers 400
    context_length_exceeded to every request: the budget item says so."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"<<400>> question {i} ß 漢\n" for i in range(12)), encoding="utf-8")
    with FaultServer(FaultConfig()) as srv:
        cfg = config(tmp_path, srv.url, "fault-teacher", prompts, max_tokens=32)
        report = preflight(cfg, tmp_path, "budget")
    it = {i.key: i for i in report.ordered()}["budget"]
    text = render_text(report)
    assert it.status == "fail", text
    assert "kdforge bug" not in it.evidence + it.fix, text
    assert "context length" in it.evidence and "max_tokens" in it.fix, text


def test_dry_run_warns_when_prompt_and_max_tokens_exceed_the_context(tmp_path, small_teacher):
    prompts = sort_prompts(tmp_path)
    args = ["generate", "--teacher", small_teacher.base_url, "--model", small_teacher.model, "--prompts", prompts,
            "--total", "6", "--out", tmp_path / "kd.jsonl", "--price-input", "0", "--price-output", "0",
            "--budget-limit", "1", "--dry-run"]
    p = run_cli(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "context:" in p.stdout and "64 tokens" in p.stdout and "exceed" in p.stdout, p.stdout
    assert "--max-tokens" in p.stdout
    p = run_cli(*args, "--max-tokens", "16", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    ctx = [line for line in p.stdout.splitlines() if "context:" in line]
    assert ctx and "fits" in ctx[0] and "exceed" not in p.stdout, p.stdout


def test_dry_run_without_an_advertised_context_says_it_was_not_checked(tmp_path):
    with FaultServer(FaultConfig()) as srv:
        p = run_cli("generate", "--teacher", srv.url, "--model", "m", "--total", "3", "--out", tmp_path / "kd.jsonl",
                    "--dry-run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "not checked" in p.stdout


def test_unknown_price_error_names_the_free_local_teacher(tmp_path):
    p = run_cli("generate", "--teacher", "http://127.0.0.1:9/v1", "--model", "my-local-model", "--total", "3",
                "--out", tmp_path / "kd.jsonl", "--budget-limit", "1", "--dry-run", cwd=tmp_path)
    assert p.returncode == 2
    assert "--price-input 0 --price-output 0" in p.stderr


@pytest.mark.parametrize("body, want", [
    ({"loss": {"kind": "fkl"}, "teacher": {"top_logprobs": 5}}, 5),  # sparse KD: the samples need top-k
    ({"loss": {"kind": "rkl"}}, 20),  # teacher.top_logprobs' default
    ({"loss": {"kind": "fkl"}, "generate": {"top_logprobs": 3}}, 3),  # said explicitly: kept
    ({"loss": {"kind": "ce"}}, 0),  # CE needs no logprobs
    ({"loss": {"kind": "fkl"}, "teacher": {"path": "t"}}, 0),  # a local teacher scores: none stored
])
def test_preflight_asks_for_the_top_k_a_kd_config_trains_on(tmp_path, body, want):
    """A KD config's training item trains on the generated samples: they must carry top-k logprobs
    (it failed with "no teacher_logprobs in any record" unless generate.top_logprobs was passed)."""
    import yaml

    from kdforge.preflight.run import PreflightOptions, _generate_section

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"preset": "toy"}, **body}))
    assert _generate_section(PreflightOptions([str(cfg)])).top_logprobs == want
