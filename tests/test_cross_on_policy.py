"""Cross-tokenizer on-policy (issue 23, SPEC "Teachers users really have"): a teacher with another
tokenizer scores the student's sampled TEXT in its own tokens, and its rows are carried back onto the
student's tokens by bytes. Real tokenizers trained here (two granularities), a tiny real teacher, a
real `kdforge serve` on 127.0.0.1, real `kdforge train` runs."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli_env, cli_here, synthetic_records, write_jsonl
from train_helpers import metrics

KEY_ENV = "KDFORGE_CROSS_KEY"
# answers the student might sample: accents, CJK, emoji (4-byte UTF-8), spaced letters
ALPHABET = st.sampled_from(list("abcdxyz éèñü東京の天気🙂—,.") + [" q", "Sort"])
ANSWERS = st.lists(ALPHABET, min_size=1, max_size=12).map("".join)


@pytest.fixture(scope="module")
def fine_tok_dir(tmp_path_factory):
    """A byte-level BPE with a handful of merges, none of them on the teacher's words: the student
    is finer than the teacher almost everywhere (the teacher's ' plus' is ' ', 'p', 'l', 'us')."""
    from kdforge.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("fine_tok")
    train_tokenizer(["user assistant Sort: café"] * 20, 272, out, min_frequency=1)
    return out


@pytest.fixture(scope="module")
def other_tok_dir(tmp_path_factory):
    """As many tokens as the teacher's (512) but merged on accents, CJK and emoji, never on the
    English of the training data: word pieces there are single bytes (finer), non-ASCII coarser."""
    import random

    from kdforge.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    chars = list("éèñüçàöß東京の天気大阪雨晴🙂😀—«»ÆØÅ") + ["user", "assistant", "Sort"]
    out = tmp_path_factory.mktemp("other_tok")
    train_tokenizer(["".join(rng.choice(chars) for _ in range(rng.randint(2, 6))) for _ in range(3000)],
                    512, out, min_frequency=1)
    return out


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(tiny_model_dir)))


def _seq(tok, prompt: str, answer: str, eos: bool = True) -> tuple[list[int], int]:
    from kdforge.data.dataset import prompt_text

    p = tok(prompt_text(tok, [{"role": "user", "content": prompt}]))["input_ids"]
    a = tok(answer, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else [])
    return p + a, len(p)


def _dense_top(model, ids: list[int], k: int) -> list[dict[int, float] | None]:
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    top = lp.topk(k, -1)
    # the row of token t+1: the top-K and the token itself (as a scoring server's prompt_logprobs has it)
    return [None] + [{**dict(zip(top.indices[t].tolist(), top.values[t].tolist())), ids[t + 1]: float(lp[t, ids[t + 1]])}
                     for t in range(len(ids) - 1)]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=ANSWERS)
def test_with_the_same_tokenizer_the_carried_rows_are_the_teachers_own(teacher, answer):
    """Carrying is the identity when both sides share a tokenizer: every answer row equals the
    dense teacher's top-K at that position (ids and logprobs)."""
    from kdforge.train.cross_scoring import LocalCrossTeacher, StudentSide

    model, tok = teacher
    lt = LocalCrossTeacher(model, tok, StudentSide(tok), 8)
    ids, n = _seq(tok, "Trie: ç 東 🙂", answer)
    rows = lt.score([(ids, n)])[0]
    dense = _dense_top(model, ids, 8)
    assert all(r is None for r in rows[:n])
    for t in range(n, len(ids)):
        assert rows[t].keys() == dense[t].keys(), t
        assert max(abs(rows[t][i] - dense[t][i]) for i in dense[t]) < 1e-5
    assert lt.stats.one_to_one == lt.stats.positions == len(ids) - n


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=ANSWERS, stop=st.booleans())
def test_a_finer_student_gets_a_distribution_for_every_answer_token(teacher, fine_tok_dir, answer, stop):
    """Student tokenizer with few merges, teacher's with 512: every answer token gets a row whose
    mass is at most 1 and which holds the token the student sampled; the stop is the student's EOS
    (never a piece of its text); tokens that begin where a teacher token begins see the teacher's
    mass of every continuation that starts with a byte (never more than the teacher's own row)."""
    from transformers import AutoTokenizer

    from kdforge.train.cross_scoring import LocalCrossTeacher, StudentSide

    model, ttok = teacher
    stok = AutoTokenizer.from_pretrained(str(fine_tok_dir))
    lt = LocalCrossTeacher(model, ttok, StudentSide(stok), 20)
    ids, n = _seq(stok, "Trie: ç 東 🙂", answer, stop)
    assert len(ids) - n - stop >= len(ttok(answer, add_special_tokens=False)["input_ids"])  # finer or equal
    rows = lt.score([(ids, n)])[0]
    for t in range(n, len(ids)):
        r = rows[t]
        assert r, (t, answer)
        assert ids[t] in r
        assert all(v <= 1e-6 and math.isfinite(v) for v in r.values())
        assert sum(math.exp(v) for v in r.values()) <= 1 + 1e-4
    if stop:
        assert stok.eos_token_id in rows[-1]
    lt_stats = lt.stats
    assert lt_stats.positions == len(ids) - n and lt_stats.unscored == 0


def test_bytes_that_are_not_utf8_are_cut_at_a_token_boundary(teacher, fine_tok_dir):
    """A byte-level student can sample half of a character: the text sent stops before it, and the
    tokens from there on have no teacher row (counted), instead of a mangled text being scored."""
    from transformers import AutoTokenizer

    from kdforge.train.cross_scoring import LocalCrossTeacher, StudentSide

    model, ttok = teacher
    stok = AutoTokenizer.from_pretrained(str(fine_tok_dir))
    side = StudentSide(stok)
    ids, n = _seq(stok, "x", "ab東", eos=False)
    half = [i for i in ids[n:] if side.table[i] in (bytes([0xE6]), "東".encode()[:1])]
    assert half, "the fine tokenizer spells 東 in single bytes"
    cut = ids[:ids.index(half[0]) + 1]  # ends with the first byte of 東
    lt = LocalCrossTeacher(model, ttok, side, 5)
    rows = lt.score([(cut, n)])[0]
    assert rows[-1] is None and all(rows[t] for t in range(n, len(cut) - 1))
    assert lt.stats.unscored == 1


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from kdforge.serve import launch

    os.environ[KEY_ENV] = "cross-test-key"
    with launch(tiny_model_dir, env=cli_env(), api_key_env=KEY_ENV) as server:
        yield server


def _priced(served, tmp_path):
    from kdforge.teacher.pricing import Prices
    from kdforge.teacher.scoring import PricedScorer

    return PricedScorer(served.base_url, served.model, 5, KEY_ENV, tmp_path / "state",
                        Prices(1.0, 4.0, "test"), 1.0)


class _AsOverHttp:
    """The in-process teacher, blind as the legacy API is to alternatives that are part of a UTF-8
    character (named by text there, so their bytes are unknown and their mass stays in the rest)."""

    def __new__(cls, *args):
        from kdforge.data.align import TeacherToken
        from kdforge.train.cross_scoring import LocalCrossTeacher

        def whole(b: bytes) -> bool:
            try:
                b.decode("utf-8")
                return True
            except UnicodeDecodeError:
                return False

        class Blind(LocalCrossTeacher):
            def teacher_tokens(self, texts):
                return [[TeacherToken(t.bytes, t.logprob, tuple((b, v) for b, v in t.top if whole(b))) for t in toks]
                        for toks in super().teacher_tokens(texts)]

        return Blind(*args)


def _cfg(served, mode: str = "auto"):
    from types import SimpleNamespace

    return SimpleNamespace(teacher=SimpleNamespace(url=served.base_url), loss=SimpleNamespace(cross_tokenizer=mode))


def test_over_http_the_text_is_scored_as_the_teacher_in_process_scores_it(served, teacher, fine_tok_dir, tmp_path):
    """kdforge serve scoring the student's text (echo, max_tokens 0) gives, once carried, the rows
    the same teacher gives in-process, for non-ASCII answers; the probe finds the other tokenizer,
    and a second pass is answered by the cache at $0."""
    from transformers import AutoTokenizer

    from kdforge.train.cross_scoring import CrossPricedScorer, LocalCrossTeacher, StudentSide, over_http
    from kdforge.train.on_policy import StepScorer

    model, ttok = teacher
    stok = AutoTokenizer.from_pretrained(str(fine_tok_dir))
    cfg = _cfg(served)
    logs = []
    step = over_http(cfg, StepScorer(_priced(served, tmp_path)), stok, logs.append)
    assert isinstance(step.scorer, CrossPricedScorer) and "another tokenizer" in logs[0]
    local = _AsOverHttp(model, ttok, StudentSide(stok), 5)
    seqs = [_seq(stok, p, a) for p, a in [("Trie ça: ü é", "é ü"), ("東京?", "東京の天気 🙂"), ("Sort: q d", "d q")]]
    got, usd, cached = step.score_step([(0, [ids for ids, _ in seqs])])
    assert usd > 0 and cached == 0
    for (ids, n), rows, want in zip(seqs, got[0], local.score(seqs)):
        for t in range(n, len(ids)):
            assert rows[t].keys() == want[t].keys(), (t, rows[t], want[t])
            assert max(abs(rows[t][i] - want[t][i]) for i in want[t]) < 1e-4
    again, usd2, cached2 = step.score_step([(0, [ids for ids, _ in seqs])])
    assert again == got and usd2 == 0 and cached2 == len(seqs)
    step.close()


def test_cross_tokenizer_off_refuses_another_tokenizer_with_exit_2(served, fine_tok_dir, teacher, tmp_path):
    from transformers import AutoTokenizer

    from kdforge.errors import ConfigError
    from kdforge.train.cross_scoring import local_teacher, over_http
    from kdforge.train.on_policy import StepScorer

    stok = AutoTokenizer.from_pretrained(str(fine_tok_dir))
    step = StepScorer(_priced(served, tmp_path))
    with pytest.raises(ConfigError, match="loss.cross_tokenizer") as e:
        over_http(_cfg(served, "off"), step, stok, None)
    assert e.value.exit_code == 2
    step.close()
    cfg = _cfg(served, "off")
    cfg.teacher.path = teacher[1].name_or_path
    with pytest.raises(ConfigError, match="loss.cross_tokenizer"):
        local_teacher(cfg, teacher[0], stok, None)


def test_over_http_the_same_tokenizer_keeps_sending_ids(served, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from kdforge.teacher.scoring import PricedScorer
    from kdforge.train.cross_scoring import over_http
    from kdforge.train.on_policy import StepScorer

    step = StepScorer(_priced(served, tmp_path))
    out = over_http(_cfg(served), step,
                    AutoTokenizer.from_pretrained(str(tokenizer_dir)), None)
    assert out is step and type(step.scorer) is PricedScorer
    step.close()


def _config(tmp_path, tok_dir, data, teacher: dict, out: str, **loss) -> str:
    cfg = {"model": {"preset": "toy", "max_seq_len": 128},
           "io": {"tokenizer_path": str(tok_dir), "train_shards": [str(data)], "output_dir": str(tmp_path / out)},
           "teacher": {**teacher, "top_logprobs": 5},
           "on_policy": {"fraction": 1.0, "max_new_tokens": 8},
           "generate": {"price_input": 1.0, "price_output": 4.0},
           "loss": {"kind": "rkl", "kd_weight": 0.5, **loss},
           "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [96], "max_steps": 2, "lr": 3e-3,
                     "warmup_steps": 1, "save_steps": 2, "seed": 0, "log_steps": 1}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_train_on_policy_with_a_teacher_of_another_tokenizer(tmp_path, other_tok_dir, tiny_model_dir, served):
    """`kdforge train` with the student on its own tokenizer: over teacher.url (kdforge serve) and
    with teacher.path in-process, on-policy steps train on carried teacher rows (a finite KD on
    teacher-covered tokens)."""

    data = write_jsonl(tmp_path / "d.jsonl", [{**r, "prompt": r["prompt"] + " — ça 東京"}
                                              for r in synthetic_records(16)])
    env = cli_env(**{KEY_ENV: os.environ[KEY_ENV]})
    url = {"url": served.base_url, "api_key_env": KEY_ENV}
    for name, teacher in (("http", url), ("local", {"path": str(tiny_model_dir)})):
        r = cli_here("train", "--config", _config(tmp_path, other_tok_dir, data, teacher, name), env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "another tokenizer" in r.stdout or "its own tokenizer" in r.stdout, r.stdout
        m = metrics(tmp_path / name)
        # a random student samples bytes that are no UTF-8 (cut there, unscored): some steps have few rows
        assert all(m[s]["on_policy"] and math.isfinite(m[s].get("kd_on_policy", m[s].get("kd", 0))) for s in m), m
        assert sum(m[s]["kd_tokens"] for s in m) > 0, m


def test_a_local_teacher_with_a_smaller_vocabulary_is_not_refused_when_carried(tmp_path, tiny_model_dir):
    """teacher.path with fewer tokens than the student's own tokenizer: its rows are carried by
    bytes (cross_tokenizer auto), so the config is valid; with cross_tokenizer off it is exit 2."""
    from kdforge.config import from_dict
    from kdforge.data.tokenizer import train_tokenizer
    from kdforge.errors import ConfigError

    tok = tmp_path / "wide_tok"
    train_tokenizer([f"{w} {i}" for i in range(400) for w in ("ça", "東京", "🙂", "alpha")], 600, tok, min_frequency=1)
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_records(4))

    def cfg(mode: str) -> dict:
        return {"model": {"preset": "toy", "max_seq_len": 64, "vocab_size": 640},
                "io": {"tokenizer_path": str(tok), "train_shards": [str(data)], "output_dir": str(tmp_path / "o")},
                "teacher": {"path": str(tiny_model_dir)}, "on_policy": {"fraction": 1.0},
                "loss": {"kind": "rkl", "cross_tokenizer": mode}, "train": {"max_steps": 1, "seq_lengths": [64]}}

    from_dict(cfg("auto"), check_files=True)
    with pytest.raises(ConfigError, match="loss.cross_tokenizer"):
        from_dict(cfg("off"), check_files=True)
