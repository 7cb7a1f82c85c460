"""generate -> KD dataset over real HTTP: `kdforge generate --top-logprobs 5` against
`kdforge serve` on the shipped teacher, and the dataset aligns those logprobs to the student's
tokens (same tokenizer) and to the teacher model's own distribution."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import run_cli, write_jsonl
from kdforge.data import KDDataset
from kdforge.data.dataset import IGNORE
from kdforge.demo import TEACHER_DIR
from kdforge.demo.task import make_prompts
from kdforge.serve import launch


def test_generate_from_kdforge_serve_aligns_topk_to_student_tokens(tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in make_prompts(12, 5, "train")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPE_KEY": "k-123"}
    with launch(TEACHER_DIR, env=env, api_key_env="PIPE_KEY") as server:
        r = run_cli("generate", "--out", tmp_path / "kd.jsonl", "--teacher", server.base_url, "--model",
                    server.model, "--total", 12, "--prompts", prompts, "--budget-limit", 1, "--price-input", 1,
                    "--price-output", 2, "--top-logprobs", 5, "--max-tokens", 24, "--temperature", 0,
                    "--api-key-env", "PIPE_KEY", env={**env, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "kd.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(len(x["teacher_logprobs"][0]["top"]) == 5 for x in rows)

    ds = KDDataset(tmp_path / "kd.jsonl", TEACHER_DIR, 64, with_topk=True)
    assert not ds.misaligned
    teacher = AutoModelForCausalLM.from_pretrained(str(TEACHER_DIR))
    for i in range(len(ds)):
        x = ds[i]
        pos = (x["labels"] != IGNORE).nonzero().flatten()[:-1]  # response tokens (EOS has no row)
        assert torch.equal(x["topk_ids"][pos, 0], x["input_ids"][pos])  # greedy: top-1 = the token
        with torch.no_grad():
            lp = teacher(x["input_ids"][None]).logits[0].log_softmax(-1)
        # row t is the teacher's distribution for token t, i.e. the model's output at t-1
        want = lp[pos - 1].gather(1, x["topk_ids"][pos])
        # logprobs are stored as fp16 (data/store.py): relative error <= 2**-11
        torch.testing.assert_close(x["topk_logprobs"][pos], want, atol=2e-4, rtol=2**-11)


def test_a_few_non_canonical_samples_keep_ce_many_mean_another_tokenizer(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def rec(text, ok=True):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        toks = [tok.decode([i]) for i in ids] if ok else [text]  # one "token" for the whole text
        return {"prompt": "Sort these words: echo alpha", "teacher_text": text,
                "teacher_logprobs": [{"token": t, "logprob": -0.1, "top": []} for t in toks]}
    good = [rec("alpha echo") for _ in range(39)]
    off = {"alignment": {"cross_tokenizer": "off"}}  # auto (the default) carries such rows by bytes instead
    ds = KDDataset(write_jsonl(tmp_path / "a.jsonl", good + [rec("alpha echo delta", ok=False)]),
                   tokenizer_dir, 64, with_topk=True, settings=off)
    assert len(ds) == 40 and len(ds.misaligned) == 1  # kept, trains with CE only
    assert (ds[39]["topk_ids"] == -1).all() and (ds[0]["topk_ids"] >= 0).any()
    with pytest.raises(Exception, match="same tokenizer"):
        KDDataset(write_jsonl(tmp_path / "b.jsonl", good[:10] + [rec("alpha echo delta", ok=False)] * 5),
                  tokenizer_dir, 64, with_topk=True, settings=off)
