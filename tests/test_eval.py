"""`kdforge eval`'s numbers, in-process, on real tiny models and a real tokenizer (tests/conftest.py).

The references are independent where they can be: the trainer's own DistillObjective over one
padded batch for CE, a model scored against itself for KL = 0, the model's own greedy answers for
exact match 1.0, the demo's own accuracy code for accuracy. Prompts include accents, CJK and emoji,
which the fixture tokenizer (trained on ASCII) splits into byte fragments.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import synthetic_records, write_jsonl

from kdforge.data.dataset import KDDataset, collate
from kdforge.data.tokenizer import token_bytes
from kdforge.data.records import parse_record
from kdforge.errors import DataError
from kdforge.eval import evaluate_loaded, evaluate_model, load_eval_data
from kdforge.eval.metrics import token_f1
from kdforge.eval.model_dir import ModelSource, load_model, load_tokenizer, resolve_model_dir
from kdforge.model import ModelCfg, write_student
from kdforge.train.objective import DistillObjective

NON_ASCII = ["Trie: é ü ß à", "並べ替えて: 日本 語 東京", "Sort these words: 😀 👍🏽 echo"]
NEW = 8  # greedy tokens: a random model rarely says EOS, so every answer has this length


@pytest.fixture(scope="module")
def student(tiny_model_dir):
    src = resolve_model_dir(tiny_model_dir)
    return load_model(src, "cpu"), load_tokenizer(src)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory, tokenizer_dir):
    """A second random model on the same tokenizer: a teacher the student does not match."""
    out = tmp_path_factory.mktemp("other_model")
    write_student(ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=None,
                           ffn_dim=128, max_seq_len=256), tokenizer_dir, out, seed=1)
    return out


def prompts() -> list[str]:
    return [r["prompt"] for r in synthetic_records(9)] + NON_ASCII


@pytest.fixture(scope="module")
def own_answers(student, tmp_path_factory):
    """The student's own greedy answers to `prompts()` (asked through prompt + answer records)."""
    model, tok = student
    path = write_jsonl(tmp_path_factory.mktemp("ask") / "ask.jsonl", [{"prompt": p, "answer": "?"} for p in prompts()])
    res = evaluate_loaded(model, tok, path, max_new_tokens=NEW)
    assert res.n == res.n_answer == len(prompts()) and res.ce is None and res.kl is None
    assert all(a.strip() for a in res.answers), "the fixture model should say something to every prompt"
    return res.answers


def topk_rows(model, tok, prompt: str, text: str, k: int = 5) -> list[dict]:
    """`teacher_logprobs` as generate writes them (token, logprob, bytes, top), from `model` itself."""
    ds = KDDataset(None, tokenizer=tok, records=[parse_record({"prompt": prompt, "teacher_text": text})])
    ex = ds.examples[0]
    ids = ex.prompt_ids + ex.response_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    tb = token_bytes(tok)
    rows = []
    for t, tid in enumerate(ex.response_ids[:-1]):  # the EOS has no row (APIs report none)
        row = lp[len(ex.prompt_ids) + t - 1]
        top = row.topk(k)
        rows.append({"token": tok.decode([tid]), "logprob": float(row[tid]), "bytes": list(tb[tid]),
                     "top": [{"token": tok.decode([i]), "logprob": float(v), "bytes": list(tb[i])}
                             for v, i in zip(top.values.tolist(), top.indices.tolist())]})
    return rows


def test_a_model_is_its_own_teacher(student, own_answers, tiny_model_dir, tmp_path):
    """Teacher text = the model's own greedy answers: exact match 1, token F1 1, dense and sparse KL 0;
    accuracy counts only the records whose `answer` is right."""
    model, tok = student
    rows = []
    for i, (p, a) in enumerate(zip(prompts(), own_answers)):
        rows.append({"prompt": p, "teacher_text": a, "answer": a if i % 2 == 0 else "not this",
                     "teacher_logprobs": topk_rows(model, tok, p, a)})
    path = write_jsonl(tmp_path / "self.jsonl", rows)
    dense = evaluate_loaded(model, tok, path, teacher=model, max_new_tokens=NEW)
    assert dense.kl_teacher == "dense" and dense.kl == pytest.approx(0.0, abs=1e-6)
    assert dense.exact_match == 1.0 and dense.token_f1 == 1.0 and dense.n_greedy == len(rows)
    assert dense.accuracy == pytest.approx(sum(i % 2 == 0 for i in range(len(rows))) / len(rows))
    sparse = evaluate_loaded(model, tok, path, greedy=False)  # the stored top-k
    assert sparse.kl_teacher == "topk" and sparse.kl == pytest.approx(0.0, abs=1e-5)
    assert sparse.ce == pytest.approx(dense.ce, rel=1e-5) and sparse.exact_match is None
    # every response token but the EOS has a stored row
    assert sparse.kl_tokens == sparse.tokens - len(rows)


def test_a_random_model_against_another(student, other_dir, own_answers, tmp_path):
    """KL > 0 against a teacher it does not match; sparse top-k KL <= dense (a coarser distribution);
    perplexity = exp(ce)."""
    model, tok = student
    other = load_model(resolve_model_dir(other_dir), "cpu")
    rows = [{"prompt": p, "teacher_text": a, "teacher_logprobs": topk_rows(other, tok, p, a)}
            for p, a in zip(prompts(), own_answers)]
    path = write_jsonl(tmp_path / "other.jsonl", rows)
    dense = evaluate_loaded(model, tok, path, teacher=other, greedy=False)
    sparse = evaluate_loaded(model, tok, path, greedy=False)
    assert dense.kl > 0.01 and 0 < sparse.kl <= dense.kl
    for r in (dense, sparse):
        assert r.perplexity == pytest.approx(math.exp(r.ce), rel=1e-12)


def test_ce_is_the_trainers_ce(student, tmp_path):
    """CE over the trainer's KDDataset and DistillObjective in one padded batch = eval's ce (which
    batches by length)."""
    model, tok = student
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_records(24) + [{"text": t} for t in NON_ASCII]
                       + [{"prompt": p, "completion": "réponse 日本"} for p in NON_ASCII])
    ds = KDDataset(path, tokenizer=tok)
    with torch.no_grad():
        sums = DistillObjective(model, "ce")(collate([ds[i] for i in range(len(ds))], tok.pad_token_id))
    res = evaluate_loaded(model, tok, path, batch_size=5, greedy=False)
    assert res.tokens == sums.n_tokens and res.n == len(ds) == res.n_scored
    assert res.ce == pytest.approx(float(sums.ce) / sums.n_tokens, rel=1e-5)
    assert res.kl is None and res.accuracy is None


def test_in_process_keeps_training_mode_and_cached_data(student, tmp_path):
    """The daemon's use: data loaded once, scored twice, the same numbers; the model's mode restored."""
    model, tok = student
    data = load_eval_data(write_jsonl(tmp_path / "d.jsonl", synthetic_records(6)), tok)
    model.train()
    try:
        a = evaluate_loaded(model, tok, data, max_new_tokens=4)
        b = evaluate_loaded(model, tok, data, max_new_tokens=4)
        assert model.training
    finally:
        model.eval()
    assert a.to_json() | {"seconds": 0} == b.to_json() | {"seconds": 0}


@pytest.mark.parametrize("line, needle", [
    ('{"prompt": "x"', "invalid JSON"),
    ('{"prompt": "x", "teacher_text": ""}', "the response is empty"),
    ('{"prompt": "x", "answer": ["a"]}', "'answer' must be a string"),
    ('{"messages": [{"role": "wizard", "content": "x"}], "answer": "a"}', "role"),
    ('{"question": "x"}', "unknown record format"),
    ('{"text": "x", "answer": "a"}', "no prompt to answer"),
])
def test_bad_lines_name_file_and_line(student, tmp_path, line, needle):
    _, tok = student
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "teacher_text": "b"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_eval_data(path, tok)
    assert e.value.line == 3 and f"{path}:3:" in str(e.value) and needle in str(e.value)


def test_token_f1_is_squads_rule():
    assert token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_f1([1, 2], [2, 3, 4, 5]) == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert token_f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)  # a bag, not a set
    assert token_f1([], []) == 1.0 and token_f1([1], []) == 0.0 and token_f1([7], [8]) == 0.0


def test_a_lora_and_a_daemon_checkpoint_load(student, tiny_model_dir, tmp_path):
    """A LoRA checkpoint written by the trainer's save_checkpoint loads on the base its adapter names;
    a daemon checkpoint on the base its trainer_state names (the adapter's named base gone), in the
    typed record and in the old flat key. Both score as the PEFT model does in-process."""
    import json
    import shutil

    from peft import LoraConfig, get_peft_model

    from kdforge.train.checkpoint import TrainState, save_checkpoint

    _, tok = student
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    lm = load_model(ModelSource(base, base, None, base), "cpu")
    peft = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    path = write_jsonl(tmp_path / "d.jsonl", synthetic_records(6))
    ref = evaluate_loaded(peft, tok, path, greedy=False)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    lora = save_checkpoint(tmp_path / "lora", TrainState(global_step=3), peft, opt, sched, tokenizer=tok)
    assert (lora / "adapter_config.json").is_file()
    got = evaluate_model(lora, path, greedy=False, device="cpu")
    assert got.ce == pytest.approx(ref.ce, rel=1e-4) and "LoRA on" in got.model

    # Daemon: BASE/current_model/checkpoint-N, trained on BASE/bases/gen-1 (relative), the base the
    # adapter config names moved away.
    daemon = tmp_path / "daemon"
    shutil.copytree(base, daemon / "bases" / "gen-1")
    for extra in ({"daemon": {"base_model": "bases/gen-1", "generation": 1}}, {"base_model": "bases/gen-1"}):
        ck = save_checkpoint(daemon / "current_model", TrainState(global_step=7, extra=extra), peft, opt, sched,
                             tokenizer=tok)
        shutil.rmtree(base, ignore_errors=True)
        assert json.loads((ck / "trainer_state.json").read_text())["extra"] == extra
        res = evaluate_model(ck, path, greedy=False, device="cpu")
        assert res.ce == pytest.approx(ref.ce, rel=1e-4)
        assert str((daemon / "bases" / "gen-1").resolve()) in res.model
