"""`kdforge eval` as a user runs it: the real CLI process (--json, plain text, exit 2 on bad data or
a folder that is not a model), the shipped demo teacher scored as the demo scores it, and a teacher
over HTTP (`kdforge serve`) that scores tokens."""

from __future__ import annotations

import json

import pytest
from conftest import cli_env, cli_here, run_cli, synthetic_records, write_jsonl

from kdforge.demo import EVAL_FILE, TEACHER_DIR, load_eval
from kdforge.eval import evaluate_model

KEYS = {"n", "ce", "perplexity", "kl", "exact_match", "token_f1", "accuracy"}


@pytest.fixture
def data(tmp_path):
    rows = synthetic_records(5) + [{"prompt": "Trie: é 日本 😀", "teacher_text": "é 日本 😀", "answer": "é 日本 😀"}]
    return write_jsonl(tmp_path / "held_out.jsonl", rows)


def test_json_is_one_object_and_plain_text_is_aligned(tiny_model_dir, data):
    p = run_cli("eval", tiny_model_dir, "--data", data, "--json", "--max-new-tokens", "4", check=True)
    assert p.stdout.count("\n") == 1, p.stdout  # exactly one line on stdout: the object
    d = json.loads(p.stdout)
    assert KEYS <= set(d) and d["n"] == 6 and d["n_answer"] == 1 and d["max_new_tokens"] == 4
    assert d["ce"] > 0 and d["perplexity"] > 1 and d["kl"] is None and 0 <= d["token_f1"] <= 1
    p = cli_here("eval", tiny_model_dir, "--data", data, "--max-new-tokens", "4", "--no-greedy", check=True)
    lines = p.stdout.splitlines()
    assert lines[0].startswith("kdforge eval: ") and any(x.startswith("perplexity") for x in lines)
    assert "no teacher" in p.stdout and "-" in next(x for x in lines if x.startswith("exact match"))


def test_bad_data_and_not_a_model_exit_2(tiny_model_dir, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "teacher_text": "b"}\n{"prompt": "a", "teacher_text": 3}\n', encoding="utf-8")
    p = cli_here("eval", tiny_model_dir, "--data", bad)
    assert p.returncode == 2 and f"{bad}:2:" in p.stderr and not p.stdout, p.stderr
    empty = tmp_path / "runs"
    (empty / "checkpoint-4").mkdir(parents=True)
    p = cli_here("eval", empty, "--data", data, "--json")
    assert p.returncode == 2 and not p.stdout
    assert f"MODEL_DIR {empty}" in p.stderr and "config.json" in p.stderr and "checkpoint-4" in p.stderr


def test_demo_teacher_accuracy_is_the_demos(tmp_path):
    """The demo's own accuracy code (task.evaluate + chat.greedy_answers) and kdforge eval agree on
    the shipped teacher, on the first held-out prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.demo.chat import greedy_answers
    from kdforge.demo.task import evaluate

    n = 40
    tok = AutoTokenizer.from_pretrained(str(TEACHER_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(TEACHER_DIR), dtype=torch.float32)
    demo = evaluate(lambda ps: greedy_answers(model, tok, ps, 24), load_eval(n))
    ours = evaluate_model(TEACHER_DIR, EVAL_FILE, max_records=n, device="cpu")
    assert ours.n == ours.n_answer == n and ours.accuracy == demo > 0.9


def test_teacher_over_http_scores_tokens(tiny_model_dir, tmp_path, data, monkeypatch):
    """--teacher URL: kdforge serve scores the records' tokens; KL is 0 for the model itself and,
    against another model, at most the dense KL (top-K plus a rest bucket is coarser)."""
    from kdforge.model import ModelCfg, write_student
    from kdforge.serve.launch import launch

    other = tmp_path / "other"
    write_student(ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=None,
                           ffn_dim=128, max_seq_len=256), tiny_model_dir, other, seed=3)
    monkeypatch.setenv("KDFORGE_EVAL_KEY", "sk-eval")  # the server wants it, and eval sends it
    server = launch(tiny_model_dir, env=cli_env(), api_key_env="KDFORGE_EVAL_KEY")
    kw = dict(greedy=False, device="cpu", top_k=5, api_key_env="KDFORGE_EVAL_KEY")
    try:
        same = evaluate_model(tiny_model_dir, data, server.base_url, **kw)
        apart = evaluate_model(other, data, server.base_url, **kw)
    finally:
        assert server.stop() == 0
    dense = evaluate_model(other, data, str(tiny_model_dir), greedy=False, device="cpu")
    assert same.kl_teacher == "url" and same.kl == pytest.approx(0.0, abs=1e-5)
    assert same.kl_tokens == same.tokens  # the server scores the EOS too
    assert dense.kl_teacher == "dense" and 0 < apart.kl <= dense.kl


def test_teacher_over_http_with_another_tokenizer_is_exit_2_not_a_wrong_kl(tiny_model_dir, data):
    """Eval over HTTP sends the student's ids: a teacher with another tokenizer (the demo's, served)
    would score other tokens (a KL of 10.7 nats against 0.06 from the stored top-k). Refused, naming it."""
    from kdforge.demo import TEACHER_DIR
    from kdforge.errors import UsageError
    from kdforge.serve.launch import launch

    with launch(TEACHER_DIR, env=cli_env()) as server:
        with pytest.raises(UsageError, match="another tokenizer than the student") as e:
            evaluate_model(tiny_model_dir, data, server.base_url, greedy=False, device="cpu", top_k=5)
        assert server.base_url in str(e.value)
        same = evaluate_model(TEACHER_DIR, data, server.base_url, greedy=False, device="cpu", top_k=5)
    assert same.kl_teacher == "url" and same.kl == pytest.approx(0.0, abs=1e-5)
