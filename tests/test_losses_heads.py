"""Logits rebuilt from hidden states equal the model's own: lm_head bias (Phi), final logit
soft-capping (Gemma 2) and logit scaling (Cohere, Granite), on the plain and the chunked path,
student and dense teacher alike.

Tiny real models from transformers configs, random init, no download. The reference is the
model's own forward (`model(...).logits`) fed to `loss_sums`.
"""

from __future__ import annotations

import pytest
import torch

from kdforge.data.dataset import IGNORE
from kdforge.train.losses import loss_sums
from kdforge.train.objective import DistillObjective

V, L, B = 97, 12, 2


def phi():
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(1)
    m = PhiForCausalLM(PhiConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=64))
    with torch.no_grad():
        m.lm_head.bias.normal_(0, 2.0)  # a bias large enough that dropping it changes the loss
    return m.eval()


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(2)
    m = Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                       max_position_embeddings=64, final_logit_softcapping=0.5))
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # logits well past the cap, so capping matters
    return m.eval()


def cohere():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(3)
    return CohereForCausalLM(CohereConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          max_position_embeddings=64, logit_scale=0.25)).eval()


def granite():
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(4)
    return GraniteForCausalLM(GraniteConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1,
                                            max_position_embeddings=64, logits_scaling=8.0)).eval()


MODELS = {"phi": phi, "gemma2": gemma2, "cohere": cohere, "granite": granite}


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (B, L), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE  # a prompt
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _reference(student, teacher, batch, kind, T):
    """loss_sums over the models' own forward logits at the target positions."""
    sel = batch["labels"][:, 1:] != IGNORE
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = student(**kw).logits[:, :-1][sel]
    t = teacher(**kw).logits[:, :-1][sel] if teacher is not None else None
    return loss_sums(s, batch["labels"][:, 1:][sel], kind=kind, temperature=T, teacher_logits=t)


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("student_name,teacher_name", [("phi", "gemma2"), ("gemma2", "phi"), ("cohere", "granite"),
                                                       ("granite", "cohere")])
def test_objective_logits_equal_the_models_own(student_name, teacher_name, chunk):
    torch.set_num_threads(1)
    student, teacher = MODELS[student_name](), MODELS[teacher_name]()
    batch = _batch()
    with torch.no_grad():
        want = _reference(student, teacher, batch, "fkl", 2.0)
        ce, kd, n = DistillObjective(student, "fkl", 2.0, chunk_size=chunk, teacher=teacher)(batch)
    torch.testing.assert_close(ce, want.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, want.kd, rtol=1e-5, atol=1e-5)
    assert n == want.n_tokens


@pytest.mark.parametrize("name", ["phi", "gemma2"])
def test_chunked_gradients_equal_plain(name):
    """The chunked path recomputes the head in backward: gradients reach the bias and the weights."""
    torch.set_num_threads(1)
    batch = _batch()
    grads = []
    for chunk in (None, 4):
        model = MODELS[name]()
        ce, _, _ = DistillObjective(model, chunk_size=chunk)(batch)
        ce.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert "lm_head.bias" in grads[0] or name != "phi"
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)
