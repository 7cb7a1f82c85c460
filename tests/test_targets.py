"""Exact teacher targets on non-ASCII text: top-k rows aligned by bytes equal the teacher model's own.

A real byte-level BPE tokenizer is trained here on accented, CJK and emoji text with a vocabulary
small enough that many characters are split over several tokens (partial UTF-8 tokens decode to
"\\ufffd"). A real tiny model is the teacher: its log-softmax at each response position is written
as generate writes an API's answer (token, logprob, bytes, top), with the bytes from kdforge
serve's own `Vocab`. Every position's target ids and logprobs must equal the model's.
"""

from __future__ import annotations

import pytest
import torch

from conftest import write_jsonl
from kdforge.data import KDDataset
from kdforge.data.dataset import IGNORE

TEXTS = ["café crème brûlée à la carte", "naïve façade, déjà vu", "日本語のテキスト 日本 東京",
         "中文字符 你好世界", "emoji 🎉🚀 party 🙂", "a 日本 b", "ümlaut Ölçü straße", "한국어 텍스트"]
K = 5


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(tokenizer folder, tokenizer, tiny random-init Llama over its vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdforge.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok_utf8")
    # 300 = 256 bytes + 4 specials + 40 merges: most CJK characters and every emoji stay split.
    tok = train_tokenizer(TEXTS * 4, 300, out, min_frequency=1)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return out, tok, LlamaForCausalLM(cfg).eval()


def _openai_text(vocab, token_id: int) -> str:
    """OpenAI's `token` for a partial character is 'bytes:\\xe6\\x97'; whole ones are their text."""
    text = vocab.text(token_id)
    return text if "\ufffd" not in text else "bytes:" + "".join(f"\\x{b:02x}" for b in vocab.bytes(token_id))


def teacher_record(tok, model, prompt: str, response: str, style: str) -> tuple[dict, list]:
    """generate's line for `response`, scored by `model`; and the model's rows (ids, logprobs)."""
    from kdforge.serve.vocab import Vocab

    vocab = Vocab(tok)
    p = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                    tokenize=False), add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].float(), -1)

    def entry(j: int, lp: float) -> dict:
        e = {"token": vocab.text(j) if style != "openai" else _openai_text(vocab, j), "logprob": lp}
        if style != "no-bytes":
            e["bytes"] = vocab.bytes(j)
        return e

    rows, want = [], []
    for t, i in enumerate(r):
        row = logp[len(p) + t - 1]  # the distribution that predicts response token t
        top_lp, top_ids = row.topk(K)
        top = [entry(j, v) for j, v in zip(top_ids.tolist(), top_lp.tolist())]
        rows.append({**entry(i, row[i].item()), "top": top})
        ids = top_ids.tolist() + ([i] if i not in top_ids.tolist() else [])
        want.append((ids, row[ids].tolist()))
    return {"prompt": prompt, "teacher_text": response, "teacher_logprobs": rows}, want


@pytest.mark.parametrize("style", ["serve", "openai"])
def test_topk_rows_equal_the_teacher_models_own_on_non_ascii_text(tmp_path, teacher, style):
    tok_dir, tok, model = teacher
    recs, wants = zip(*(teacher_record(tok, model, "Say it", text, style) for text in TEXTS))
    ds = KDDataset(write_jsonl(tmp_path / "kd.jsonl", list(recs)), tok_dir, 128, with_topk=True)
    assert not ds.misaligned and ds.ce_only == 0
    fragments = 0
    for n, want in enumerate(wants):
        x = ds[n]
        pos = (x["labels"] != IGNORE).nonzero().flatten()
        assert len(pos) == len(want) + 1  # the response, then EOS
        for p, (ids, lps) in zip(pos[:-1], want):
            got = x["topk_ids"][p]
            k = int((got >= 0).sum())
            assert got[:k].tolist() == ids  # same ids, the model's order, chosen appended if outside
            assert x["topk_logprobs"][p, :k].tolist() == torch.tensor(lps).half().float().tolist()  # fp16-exact (stored)
            fragments += sum("\ufffd" in tok.decode([j]) for j in ids)
        assert (x["topk_ids"][pos[-1]] == -1).all()  # EOS: no teacher row
    assert fragments > 50  # the test does exercise partial-character tokens


def test_without_bytes_a_fragment_never_takes_another_tokens_id(tmp_path, teacher):
    """Teachers that send no bytes: text is the fallback; a "\\ufffd" alternative is dropped, never
    mapped onto the chosen token (which used to get the alternative's logprob)."""
    tok_dir, tok, model = teacher
    rec, want = teacher_record(tok, model, "Say it", "東京 🎉 中文", "no-bytes")
    assert sum(e["token"] == "\ufffd" for e in rec["teacher_logprobs"]) > 5  # chosen tokens are fragments
    ds = KDDataset(write_jsonl(tmp_path / "kd.jsonl", [rec]), tok_dir, 128, with_topk=True)
    x = ds[0]
    pos = (x["labels"] != IGNORE).nonzero().flatten()
    for p, (ids, lps) in zip(pos[:-1], want):
        model_lp = dict(zip(ids, torch.tensor(lps).half().float().tolist()))  # stored as fp16
        row = x["topk_ids"][p]
        for k in range(int((row >= 0).sum())):  # every stored (id, logprob) is the model's pair
            assert x["topk_logprobs"][p, k].item() == model_lp[row[k].item()]
        chosen = x["input_ids"][p].item()
        assert chosen in row.tolist()


def test_generate_from_kdforge_serve_on_non_ascii_text_gives_the_models_own_rows(tmp_path, teacher):
    """The real path: `kdforge serve` scores with the tiny teacher, `kdforge generate --top-logprobs`
    writes the lines (bytes included), and the dataset's rows equal the model's own log-softmax.
    A random teacher happily emits byte fragments that are no valid UTF-8 text on their own: the
    bytes still give the exact tokens."""
    import json
    import os

    from conftest import run_cli
    from kdforge.serve import launch

    tok_dir, tok, model = teacher
    model_dir = tmp_path / "teacher"
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in TEXTS])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "T_KEY": "k-1"}
    with launch(model_dir, env=env, api_key_env="T_KEY") as server:
        r = run_cli("generate", "--out", tmp_path / "kd.jsonl", "--teacher", server.base_url, "--model",
                    server.model, "--total", len(TEXTS), "--prompts", prompts, "--budget-limit", 1,
                    "--price-input", 1, "--price-output", 2, "--top-logprobs", K, "--max-tokens", 12,
                    "--temperature", 0, "--api-key-env", "T_KEY", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "kd.jsonl").read_text().splitlines()]
    assert all("bytes" in e for x in rows for e in x["teacher_logprobs"])
    ds = KDDataset(tmp_path / "kd.jsonl", model_dir, 128, with_topk=True)
    assert not ds.misaligned and ds.ce_only == 0
    fragments = 0
    for i in range(len(ds)):
        x = ds[i]
        pos = (x["labels"] != IGNORE).nonzero().flatten()[:-1]  # response tokens (EOS has no row)
        assert len(pos) == len(rows[i]["teacher_logprobs"])
        assert torch.equal(x["topk_ids"][pos, 0], x["input_ids"][pos])  # greedy: top-1 = the token
        with torch.no_grad():
            lp = model(x["input_ids"][None]).logits[0].float().log_softmax(-1)
        top_lp, top_ids = lp[pos - 1].topk(K)  # row t is the model's output at t - 1
        assert torch.equal(x["topk_ids"][pos], top_ids)
        torch.testing.assert_close(x["topk_logprobs"][pos], top_lp, atol=2e-4, rtol=2**-11)  # stored as fp16
        fragments += sum("\ufffd" in tok.decode([j]) for j in x["input_ids"][pos].tolist())
    assert fragments > 0
