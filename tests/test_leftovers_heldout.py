"""The daemon's held-out eval (`daemon.eval_file`) on KD data of a teacher with another tokenizer
scores what training and `kdforge eval` score (SPEC: "held-out KD data scored (`kdforge eval`'s
numbers)"; "Teachers users really have": another tokenizer's rows carried by bytes).

- teacher.path with another tokenizer: training scores every record with that teacher (its top-K
  carried onto the student's tokens), stored rows unread. The held-out KL was against the rows
  stored in the file wherever it had some (2.76 nats here against the teacher's 0.03), and against
  nothing for records without rows in a file where others had them. Now the teacher scores every
  held-out record, and `kdforge eval CKPT --data FILE --teacher DIR` (which refused another
  tokenizer) gives the same number.
- the file is read with the daemon's store settings: `loss.cross_tokenizer: off` refuses another
  tokenizer's rows as training refuses such a batch (exit 2 at start, naming file:line); `auto`
  carries them and says so, as training does.

Real tokenizers trained here (a fine and a coarse byte-level BPE), tiny real models, a real daemon."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import write_jsonl
from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import daemon_config, drop, newest_state, run_in_process
from test_align import toks  # noqa: F401  (the two tokenizers, a fixture)
from test_cross_tokenizer import _records, coarse_teacher_dir, tok_dirs  # noqa: F401

from kdforge.errors import DataError

K = 8  # teacher.top_logprobs / kdforge eval --top-k


def _model_cfg():
    from kdforge.model import ModelCfg

    return ModelCfg(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_head=16, vocab_size=None, ffn_dim=64,
                    max_seq_len=256)


@pytest.fixture(scope="module")
def fine_student_dir(tok_dirs, tmp_path_factory):  # noqa: F811
    from kdforge.model import write_student

    out = tmp_path_factory.mktemp("fine_student")
    write_student(_model_cfg(), tok_dirs[0], out, seed=0)
    return out


@pytest.fixture(scope="module")
def files(toks, tmp_path_factory):  # noqa: F811
    """The same held-out records three ways: with the coarse teacher's stored rows, without, half and half."""
    d = tmp_path_factory.mktemp("heldout")
    recs = _records(toks[1], 12, seed=5)
    bare = [{k: r[k] for k in ("prompt", "teacher_text")} for r in recs]
    return {"rows": write_jsonl(d / "rows.jsonl", recs), "bare": write_jsonl(d / "bare.jsonl", bare),
            "half": write_jsonl(d / "half.jsonl", [r if i % 2 else b for i, (r, b) in enumerate(zip(recs, bare))])}


def _loaded(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(str(path))


def test_a_teacher_of_another_tokenizer_scores_every_held_out_record(fine_student_dir, coarse_teacher_dir, files):
    """The daemon's LocalCrossTeacher: one KL whatever rows the file stores, over every token, and
    `kdforge eval --teacher DIR`'s own (kl_teacher "carried")."""
    from kdforge.daemon.heldout import HeldOut
    from kdforge.eval import evaluate_model
    from kdforge.train.cross_scoring import LocalCrossTeacher, StudentSide

    student, stok = _loaded(fine_student_dir)
    tmodel, ttok = _loaded(coarse_teacher_dir)
    teacher = LocalCrossTeacher(tmodel, ttok, StudentSide(stok), K)
    got = {name: HeldOut(f, stok, 256).score(student, teacher, torch.device("cpu"), 0, "batch 1")
           for name, f in files.items()}
    kl = got["bare"]["eval_kl"]
    assert kl > 0 and all(g["eval_kl"] == pytest.approx(kl, rel=1e-6) for g in got.values()), got
    assert got["rows"]["eval_ce"] == got["bare"]["eval_ce"]
    stored = HeldOut(files["rows"], stok, 256).score(student, None, torch.device("cpu"), 0, "batch 1")
    assert abs(stored["eval_kl"] - kl) > 0.1  # the stored rows are another teacher's numbers
    res = evaluate_model(fine_student_dir, files["rows"], str(coarse_teacher_dir), greedy=False, device="cpu",
                         top_k=K)
    assert res.kl_teacher == "carried" and res.kl_tokens == res.tokens
    assert res.kl == pytest.approx(kl, rel=1e-5) and res.ce == pytest.approx(got["rows"]["eval_ce"], rel=1e-6)


def test_the_file_is_read_as_the_daemons_training_reads_a_batch(fine_student_dir, files):
    from kdforge.config import from_dict
    from kdforge.daemon.heldout import HeldOut
    from kdforge.train.session import store_settings

    _, stok = _loaded(fine_student_dir)

    def settings(cross: str) -> dict:
        return store_settings(from_dict({"model": {"path": str(fine_student_dir)}, "io": {"reasoning": "drop"},
                                            "loss": {"cross_tokenizer": cross}, "train": {"max_steps": 1}}))

    assert settings("off") == {"reasoning": "drop", "alignment": {"cross_tokenizer": "off"}}
    with pytest.raises(DataError, match="logit KD needs the teacher's tokenizer") as e:
        HeldOut(files["rows"], stok, 256, settings=settings("off"))
    assert str(e.value).startswith(f"daemon.eval_file: {files['rows']}:1: 12 of 12 samples"), str(e.value)
    held = HeldOut(files["rows"], stok, 256, settings=settings("auto"))
    assert "not the student's in 12 records" in held.note() and "aligned 1:1" in held.note()
    assert HeldOut(files["bare"], stok, 256, settings=settings("off")).note() is None  # no rows: nothing to carry


def test_a_daemon_with_such_a_teacher_logs_kdforge_evals_kl(tmp_path, toks, fine_student_dir,  # noqa: F811
                                                          coarse_teacher_dir, files):  # noqa: F811
    """A real daemon (teacher.path on the coarse tokenizer, student on the fine one, LoRA) trains a
    batch and scores the held-out file that stores rows: the KL it logs is `kdforge eval`'s on its
    checkpoint with --teacher the same folder."""
    from kdforge.eval import evaluate_model
    from kdforge.train import checkpoint as ckpt

    cfg = daemon_config(tmp_path / "d.yaml", fine_student_dir, loss={"kind": "fkl", "kd_weight": 0.5},
                        save_steps=100, settle_seconds=0, eval_file=str(files["rows"]))
    raw = yaml.safe_load(cfg.read_text())
    raw["teacher"] = {"path": str(coarse_teacher_dir), "top_logprobs": K}
    raw["train"]["seq_lengths"] = [256]
    cfg.write_text(yaml.safe_dump(raw))
    base = tmp_path / "training"
    drop(base, "b1.jsonl", [{k: r[k] for k in ("prompt", "teacher_text")} for r in _records(toks[1], 8, seed=1)])
    run_in_process(base, cfg)
    held = [h for h in newest_state(base)["log_history"] if "eval_kl" in h]
    assert [h["after"] for h in held] == ["batch 1"], held
    res = evaluate_model(ckpt.latest_checkpoint(base / "current_model"), files["rows"], str(coarse_teacher_dir),
                         greedy=False, device="cpu", top_k=K)
    assert res.kl_teacher == "carried" and res.kl == pytest.approx(held[0]["eval_kl"], rel=1e-4), (res, held)
