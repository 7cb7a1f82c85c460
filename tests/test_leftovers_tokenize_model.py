"""A teacher whose POST /tokenize is there but refuses the MODEL name (404, "model not found") is not
reported as "no /tokenize": the count's fallback names the model, what the server serves and the
fix (the project rule: a message naming what is wrong and what to do). Real `kdforge serve` on
127.0.0.1 (its 404 is `model_not_found`), and a real proxy in front of it answering /tokenize
as vLLM does for an unknown model."""

from __future__ import annotations

import json

from conftest import run_cli
from test_preflight_tokenize import LONG, NoTokenize, prompts_file, small_teacher  # noqa: F401

from kdforge.teacher.tokens import count_prompt_tokens

PROMPTS = [[{"role": "user", "content": LONG}], [{"role": "user", "content": "Trie: ç 東 🙂"}]]
WRONG = "qwen-ç-72b"  # not what the server serves


def test_kdforge_serve_refusing_the_model_is_named_not_called_no_tokenize(small_teacher):  # noqa: F811
    counts = count_prompt_tokens(small_teacher.base_url, WRONG, PROMPTS)
    said = counts.how(2)
    assert counts.exact == {} and counts.url is None
    assert "no /tokenize" not in said, said
    assert f"does not serve the model `{WRONG}`" in said and "404" in said, said
    assert f"`{small_teacher.model}`" in said and "--model" in said, said
    assert "estimated at ~3 bytes a token" in said, said
    # the right name still counts exactly
    assert count_prompt_tokens(small_teacher.base_url, small_teacher.model, PROMPTS).url


def test_a_vllm_404_for_the_model_lists_what_the_server_serves(small_teacher):  # noqa: F811
    """vLLM's words name only the wrong model: what the server serves comes from its GET /models."""
    body = json.dumps({"object": "error", "message": f"The model `{WRONG}` does not exist.",
                       "type": "NotFoundError", "param": None, "code": 404}).encode()
    with NoTokenize(small_teacher.base_url, 404, body) as proxy:
        counts = count_prompt_tokens(proxy.url, WRONG, PROMPTS)
    said = counts.how(2)
    assert proxy.refused == 1, said  # the route answered: no second place is tried
    assert "no /tokenize" not in said and f"The model `{WRONG}` does not exist." in said, said
    assert f"it serves `{small_teacher.model}`" in said, said


def test_a_missing_route_is_still_no_tokenize(small_teacher):  # noqa: F811
    with NoTokenize(small_teacher.base_url, 404, b'{"detail": "Not Found"}') as proxy:
        said = count_prompt_tokens(proxy.url, WRONG, PROMPTS).how(2)
    assert "no /tokenize" in said and "does not serve" not in said, said


def test_dry_run_names_the_wrong_model(tmp_path, small_teacher):  # noqa: F811
    path = prompts_file(tmp_path)
    p = run_cli("generate", "--teacher", small_teacher.base_url, "--model", WRONG, "--prompts", path,
                "--total", "4", "--out", tmp_path / "kd.jsonl", "--price-input", "0", "--price-output", "0",
                "--max-tokens", "16", "--dry-run", cwd=tmp_path)
    out = p.stdout + p.stderr
    assert "no /tokenize" not in out, out
    assert f"does not serve the model `{WRONG}`" in out, out
