"""`kdforge preflight`'s generation part on a thinking teacher (issue 23 item 2): it says the teacher
thinks, and whether max_tokens leaves room for thinking + answer (the fault server's reasoning mode
over real HTTP, the real generate code)."""

from __future__ import annotations

import pytest
from fault_server import FaultConfig, FaultServer

from kdforge.config import GenerateSection
from kdforge.preflight.teacher import Purse, check_generation
from kdforge.teacher.pricing import Prices

KEY = "sk-think"


def _check(tmp_path, url: str, max_tokens: int):
    cfg = GenerateSection(teacher=url, model="kimi-thinking", max_tokens=max_tokens, concurrency=2,
                          price_input=1.0, price_output=2.0, max_retries=1, retry_base=0.01)
    return check_generation(cfg, tmp_path / "gen", Purse(1.0, Prices(1.0, 2.0, "t")), KEY, 4)[0]


@pytest.mark.parametrize("think,max_tokens,status", [(20, 128, "pass"), (20, 24, "warn"), (40, 24, "fail")])
def test_a_thinking_teacher_is_detected_and_max_tokens_checked(tmp_path, think, max_tokens, status):
    with FaultServer(FaultConfig(api_key=KEY, reasoning_tokens=think)) as srv:
        item = _check(tmp_path, srv.url, max_tokens)
    assert item.status == status, (item.evidence, item.fix)
    if status == "pass":
        assert "a thinking teacher (4/4 samples carry teacher_reasoning, thinking up to 20 tokens" in item.evidence
    elif status == "warn":  # every answer was cut: thinking + answer need more
        assert "4 cut by max_tokens" in item.evidence and "--max-tokens 256" in item.fix, item
    else:  # the thinking filled max_tokens: no answer at all; the message says what the thinking used
        assert "thinking used 24 tokens of --max-tokens 24" in item.evidence and "--max-tokens 256" in item.evidence, item


def test_a_teacher_that_does_not_think_is_not_mentioned(tmp_path):
    with FaultServer(FaultConfig(api_key=KEY)) as srv:
        item = _check(tmp_path, srv.url, 24)
    assert item.status == "pass" and "thinking" not in item.evidence
