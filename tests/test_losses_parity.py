"""fkl / rkl / jsd against the published formulas, computed here in float64 from scratch.

References: Hinton et al. 2015 (KD with temperature, x T^2), and the generalized JSD of GKD
(Agarwal et al. 2024, Eq. 1) in TRL's convention (`GKDTrainer.generalized_jsd_loss`):
  JSD(beta) = beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q,
with p the teacher, q the student, and the endpoints special-cased: beta = 0 is KL(p || q) (forward)
and beta = 1 is KL(q || p) (reverse), never the identically-zero limit of the mixture formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdforge.train.losses import loss_sums

N, V = 24, 50


def _probs(logits: torch.Tensor, T: float) -> list[list[float]]:
    """softmax(logits / T) row by row with Python floats (float64), no torch kernels."""
    out = []
    for row in logits.double().tolist():
        z = [x / T for x in row]
        mx = max(z)
        e = [math.exp(x - mx) for x in z]
        s = sum(e)
        out.append([x / s for x in e])
    return out


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)


def published(student, teacher, kind: str, T: float, beta: float) -> float:
    """Sum over rows of the divergence between p_T (teacher) and q_T (student), x T^2."""
    total = 0.0
    for p, q in zip(_probs(teacher, T), _probs(student, T)):
        if kind == "fkl" or (kind == "jsd" and beta == 0):
            d = _kl(p, q)
        elif kind == "rkl" or (kind == "jsd" and beta == 1):
            d = _kl(q, p)
        else:
            m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
            d = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
        total += d
    return total * T * T


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, generator=g) * 2
    teacher = torch.randn(N, V, generator=g) * 3
    return student, teacher, torch.randint(0, V, (N,), generator=g)


CASES = [("fkl", None), ("rkl", None), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0), ("jsd", 0.1), ("jsd", 0.9)]


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_dense_divergence_equals_published_formula(kind, beta, T):
    student, teacher, targets = _case()
    got = loss_sums(student, targets, kind=kind, temperature=T, beta=0.5 if beta is None else beta,
                    teacher_logits=teacher).kd.item()
    want = published(student, teacher, kind, T, 0.5 if beta is None else beta)
    assert got == pytest.approx(want, rel=2e-5)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_jsd_endpoints_are_forward_and_reverse_kl(T):
    """TRL: beta 0 -> KL(teacher || student), beta 1 -> KL(student || teacher); values and gradients."""
    student, teacher, targets = _case(1)
    for beta, kind in ((0.0, "fkl"), (1.0, "rkl")):
        s1 = student.clone().requires_grad_(True)
        s2 = student.clone().requires_grad_(True)
        jsd = loss_sums(s1, targets, kind="jsd", beta=beta, temperature=T, teacher_logits=teacher).kd
        kl = loss_sums(s2, targets, kind=kind, temperature=T, teacher_logits=teacher).kd
        assert jsd.item() > 0
        assert jsd.item() == kl.item()
        (g1,), (g2,) = torch.autograd.grad(jsd, s1), torch.autograd.grad(kl, s2)
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_sparse_jsd_endpoints_follow_the_same_rule(beta):
    """Top-k covering the whole vocabulary: the sparse form equals the published dense formula."""
    student, teacher, targets = _case(2)
    lp, ids = torch.log_softmax(teacher, -1).topk(V, dim=-1)
    got = loss_sums(student, targets, kind="jsd", beta=beta, topk_ids=ids, topk_logprobs=lp).kd.item()
    assert got == pytest.approx(published(student, teacher, "jsd", 1.0, beta), rel=2e-5)
