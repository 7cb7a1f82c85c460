"""A dense teacher whose vocabulary is wider than the student's (a padded embedding: Qwen2.5 7B has
152,064 logits, 0.5B 151,936) trains on the ids both share; the ids only the teacher has are
dropped from its distribution (renormalised), said once in the log; never a shape error (issue 23
§4, SPEC "Teachers users really have"). Two tiny real models on one tokenizer."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import cli_here

WIDE = 520  # the student (and its tokenizer) has 512 ids


@pytest.fixture(scope="module")
def wide_teacher_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model's architecture with 8 padded ids, random weights (another seed), and real mass
    on the padded ids so that dropping them changes something."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("wide_teacher")
    conf = AutoConfig.from_pretrained(tiny_model_dir)
    conf.vocab_size = WIDE
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():
        model.get_output_embeddings().weight[512:] *= 4  # padded rows that are not silent
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("chunk", [None, 7])
def test_the_kd_is_the_divergence_to_the_teacher_renormalised_over_the_shared_ids(tiny_model_dir, wide_teacher_dir,
                                                                                  chunk):
    from transformers import AutoModelForCausalLM

    from kdforge.data.dataset import IGNORE
    from kdforge.train.losses import loss_sums
    from kdforge.train.objective import DistillObjective

    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(wide_teacher_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    obj = DistillObjective(student, "fkl", temperature=2.0, chunk_size=chunk, teacher=teacher)
    got = obj(batch)
    with torch.no_grad():
        s_logits = student(input_ids=ids).logits[:, :-1]
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    assert t_logits.shape[-1] == WIDE and t_logits.softmax(-1)[..., 512:].sum(-1).mean() > 1e-3
    sel = labels[:, 1:] != IGNORE
    want = loss_sums(s_logits[sel], labels[:, 1:][sel], kind="fkl", temperature=2.0,
                     teacher_logits=t_logits[sel][:, :512])  # log_softmax over the shared ids: renormalised
    assert got.kd.item() == pytest.approx(want.kd.item(), rel=1e-5) and got.kd.item() > 0
    assert obj.vocab_note() is not None and "520" in obj.vocab_note() and "512" in obj.vocab_note()


def test_kdforge_train_with_a_wider_teacher_says_so_once_and_trains(tmp_path, tokenizer_dir, tiny_model_dir,
                                                                   wide_teacher_dir, data_file):
    cfg = {"model": {"path": str(tiny_model_dir)},
           "io": {"tokenizer_path": str(tokenizer_dir), "train_shards": [str(data_file)],
                  "output_dir": str(tmp_path / "out")},
           "teacher": {"path": str(wide_teacher_dir)}, "loss": {"kind": "fkl", "kd_weight": 0.5},
           "train": {"micro_batch_size": 2, "seq_lengths": [64], "max_steps": 2, "save_steps": 100, "lr": 1e-3,
                     "warmup_steps": 1}}
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = cli_here("train", "--config", path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert out.count("8 ids only the teacher has") == 1, out
    assert "Traceback" not in out
