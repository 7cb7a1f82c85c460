"""The demo's shipped example: the task generator, the checker, and the shipped teacher."""

from __future__ import annotations

import pytest
import torch

from kdforge.demo import EVAL_FILE, TEACHER_DIR, load_eval, teacher_info
from kdforge.demo.settings import FAST, FULL
from kdforge.demo.task import check, evaluate, make_prompts, split_of


def letter_set(rec: dict) -> str:
    return "".join(sorted(rec["prompt"].removeprefix("Sort: ").split()))


# ---------------------------------------------------------------- task


def test_prompts_are_deterministic_by_seed():
    a, b = make_prompts(300, seed=3, split="train"), make_prompts(300, seed=3, split="train")
    assert a == b
    assert make_prompts(100, seed=3, split="train") == a[:100]  # a longer list extends a shorter one
    assert [r["prompt"] for r in make_prompts(300, seed=4, split="train")] != [r["prompt"] for r in a]
    assert len({r["prompt"] for r in a}) == 300  # no repeated prompt
    assert all(r["messages"] == [{"role": "user", "content": r["prompt"]}] for r in a)


def test_train_and_eval_splits_are_disjoint_by_letter_set():
    train = {letter_set(r) for r in make_prompts(5000, seed=0, split="train")}
    evals = {letter_set(r) for r in make_prompts(500, seed=0, split="eval")}
    assert train and evals and not train & evals
    assert {split_of(s) for s in evals} == {"eval"}
    # the shipped eval file is the eval split, with correct answers
    shipped = load_eval()
    assert len(shipped) >= 200
    assert all(split_of(letter_set(r)) == "eval" for r in shipped)
    assert all(r["answer"] == " ".join(sorted(r["prompt"].removeprefix("Sort: ").split())) for r in shipped)
    with pytest.raises(ValueError):
        make_prompts(1, split="test")


def test_check_accepts_the_exact_answer_only():
    rec = make_prompts(1, seed=0, split="eval")[0]
    letters = rec["answer"].split()
    assert check(rec, rec["answer"]) and check(rec, f"  {rec['answer']}\n")
    assert not check(rec, " ".join(reversed(letters)))  # wrong order
    assert not check(rec, " ".join(letters[:-1]))  # a letter missing
    assert not check(rec, rec["answer"] + " a")  # extra text
    assert not check(rec, "".join(letters))  # spaces dropped
    assert not check(rec, "")


def test_evaluate_counts_exact_matches():
    recs = make_prompts(10, seed=1, split="eval")
    right = {r["prompt"]: r["answer"] for r in recs}
    assert evaluate(lambda ps: [right[p] for p in ps], recs) == 1.0
    assert evaluate(lambda ps: ["z" for _ in ps], recs) == 0.0
    half = lambda ps: [right[p] if i % 2 == 0 else "x" for i, p in enumerate(ps)]  # noqa: E731
    assert evaluate(half, recs) == 0.5
    with pytest.raises(ValueError):
        evaluate(lambda ps: [], recs)


# ---------------------------------------------------------------- shipped teacher


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TEACHER_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(TEACHER_DIR))
    return tok, model.eval()


def test_assets_are_small_and_complete():
    files = {p.name for p in TEACHER_DIR.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    total = sum(p.stat().st_size for p in EVAL_FILE.parent.rglob("*") if p.is_file())
    assert total < 8 * 2**20, f"assets are {total / 2**20:.1f} MiB"


def test_tokenizer_is_chatml_and_letters_are_single_tokens(teacher):
    tok, model = teacher
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Sort: q d m"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nSort: q d m<|im_end|>\n<|im_start|>assistant\n"
    pieces = tok.convert_ids_to_tokens(tok("Sort: z v m p d w b a", add_special_tokens=False)["input_ids"])
    assert pieces[2:] == ["Ġz", "Ġv", "Ġm", "Ġp", "Ġd", "Ġw", "Ġb", "Ġa"]
    assert len(tok("d m p v", add_special_tokens=False)["input_ids"]) == 4


def test_student_settings_are_at_most_a_quarter_of_the_teacher(teacher):
    tok, model = teacher
    n_teacher = model.num_parameters()
    assert n_teacher == teacher_info()["parameters"]
    for s in (FULL, FAST):
        assert 4 * s.student.num_params(len(tok)) <= n_teacher


def test_teacher_answers_held_out_prompts(teacher):
    """Plain transformers, greedy: the teacher reaches its documented accuracy (minus a margin
    for a 30-prompt sample) on the held-out prompts."""
    tok, model = teacher
    recs = load_eval(30)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
             for r in recs]
    tok.padding_side = "left"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    acc = sum(check(r, a) for r, a in zip(recs, answers)) / len(recs)
    documented = teacher_info()["eval_exact_match"]
    assert documented >= 0.9
    assert acc >= documented - 0.1, list(zip([r["answer"] for r in recs], answers))
