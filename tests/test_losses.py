"""Loss functions: definitions against float64 references, the sparse top-k promises, chunked == plain
(values and gradients), no full-vocabulary tensor in the chunked form, gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.multiprocessing.reductions import StorageWeakRef

from kdforge.train.losses import REST_EPS, LossSums, chunked_loss_sums, combine, loss_sums

N, V, D, K = 48, 300, 32, 20
KL_KINDS = ["fkl", "rkl", "jsd"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: extra intra-op threads only spin against the other jobs on the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_case(n=N, v=V, d=D, k=K, seed=0, scale=3.0):
    """Student head and hidden states, a dense teacher, and its top-k log-probs with ragged padding."""
    g = torch.Generator().manual_seed(seed)
    c = {
        "hidden": torch.randn(n, d, generator=g),
        "weight": torch.randn(v, d, generator=g) * scale / math.sqrt(d),
        "bias": torch.randn(v, generator=g) * 0.1,
        "targets": torch.randint(0, v, (n,), generator=g),
        "teacher_hidden": torch.randn(n, 2 * d, generator=g),
        "teacher_weight": torch.randn(v, 2 * d, generator=g) * scale / math.sqrt(2 * d),
    }
    teacher = c["teacher_hidden"] @ c["teacher_weight"].T
    lp, ids = F.log_softmax(teacher, -1).topk(k, dim=-1)
    keep = torch.randint(1, k + 1, (n,), generator=g)  # rows with fewer than K alternatives
    mask = torch.arange(k)[None, :] < keep[:, None]
    c.update(teacher_logits=teacher, topk_ids=ids.masked_fill(~mask, 0),
             topk_logprobs=lp.masked_fill(~mask, float("nan")), topk_mask=mask)
    return c


def teacher_kwargs(c, teacher):
    if teacher == "dense":
        return {"teacher_logits": c["teacher_logits"]}
    return {k: c[k] for k in ("topk_ids", "topk_logprobs", "topk_mask")}


# ---------------------------------------------------------------- float64 references, from definitions


def ref_divergence(p, q, kind, beta):
    """Per-row divergence between probability rows p (teacher) and q (student), float64."""
    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def ref_dense(student, teacher, kind, T, beta):
    p = torch.softmax(teacher.double() / T, -1)
    q = torch.softmax(student.double() / T, -1)
    return ref_divergence(p, q, kind, beta).sum() * T * T


def ref_sparse(student, ids, logprobs, mask, kind, T, beta):
    """Buckets built with probabilities: K stored tokens + rest; tempered as K + 1 outcomes."""
    total = 0.0
    q_full = torch.softmax(student.double(), -1)
    for i in range(student.shape[0]):
        sel = ids[i][mask[i]]
        p_top = logprobs[i][mask[i]].double().exp()
        q_top = q_full[i, sel]
        covers_vocab = len(set(sel.tolist())) == student.shape[1]
        q_rest = 0.0 if covers_vocab else 1.0 - q_top.sum().item()
        raw = max(1.0 - p_top.sum().item(), 0.0)  # known to +- REST_EPS: the student's rest if within that
        p_rest = 0.0 if covers_vocab else min(max(q_rest, raw - REST_EPS), raw + REST_EPS)
        p = torch.cat([p_top, torch.tensor([p_rest], dtype=torch.float64)]) ** (1 / T)
        q = torch.cat([q_top, torch.tensor([q_rest], dtype=torch.float64)]) ** (1 / T)
        total += ref_divergence(p / p.sum(), q / q.sum(), kind, beta).item()
    return total * T * T


# ---------------------------------------------------------------- plain form: definitions


def test_ce_is_summed_cross_entropy_and_kd_is_zero():
    c = make_case()
    logits = c["hidden"] @ c["weight"].T
    s = loss_sums(logits, c["targets"], kind="ce", teacher_logits=c["teacher_logits"])
    torch.testing.assert_close(s.ce, F.cross_entropy(logits, c["targets"], reduction="sum"))
    assert s.kd.item() == 0.0 and s.n_tokens == N


@pytest.mark.parametrize("kind,T,beta", [("fkl", 1.0, 0.5), ("fkl", 2.0, 0.5), ("rkl", 1.0, 0.5),
                                         ("rkl", 0.7, 0.5), ("jsd", 1.0, 0.5), ("jsd", 2.0, 0.2),
                                         ("jsd", 1.5, 0.9)])
def test_dense_divergence_matches_float64_definition(kind, T, beta):
    c = make_case()
    student = c["hidden"] @ c["weight"].T
    s = loss_sums(student, c["targets"], kind=kind, temperature=T, beta=beta, teacher_logits=c["teacher_logits"])
    ref = ref_dense(student, c["teacher_logits"], kind, T, beta)
    assert ref.item() > 1.0  # the case is far from trivial
    assert s.kd.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sparse_divergence_matches_bucket_definition(kind, T):
    c = make_case()
    student = c["hidden"] @ c["weight"].T
    s = loss_sums(student, c["targets"], kind=kind, temperature=T, **teacher_kwargs(c, "sparse"))
    ref = ref_sparse(student, c["topk_ids"], c["topk_logprobs"], c["topk_mask"], kind, T, 0.5)
    assert s.kd.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("teacher", ["dense", "sparse"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_identical_distributions_have_zero_divergence_and_gradient(kind, teacher, T):
    c = make_case()
    student = c["teacher_logits"].clone().requires_grad_(True)  # the student IS the teacher
    s = loss_sums(student, c["targets"], kind=kind, temperature=T, **teacher_kwargs(c, teacher))
    s.kd.backward()
    assert abs(s.kd.item()) < 1e-5
    assert student.grad.abs().max().item() < 1e-5


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KL_KINDS), T=st.sampled_from([0.5, 1.0, 2.0, 3.0, 5.0]),
       margin=st.floats(14.0, 60.0), k=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_a_student_equal_to_a_near_certain_teacher_has_zero_sparse_divergence(kind, T, margin, k, seed):
    """A near-certain teacher's top-k holds all but 1e-4 .. 1e-20 of its mass: its rest bucket is
    rounding (the stored log-probs' precision, ~1e-6 of mass), not a mass to temper like a token
    (a rest floored at 1e-6 gave 5.7e-3 nats/token at T = 2, gradients pushing the student off)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(6, 60, generator=g)
    teacher[torch.arange(6), torch.randint(0, 60, (6,), generator=g)] += margin  # one token takes ~all
    lp, ids = F.log_softmax(teacher, -1).topk(k, dim=-1)
    student = teacher.clone().requires_grad_(True)  # the student IS the teacher
    s = loss_sums(student, torch.zeros(6, dtype=torch.long), kind=kind, temperature=T, topk_ids=ids,
                  topk_logprobs=lp)
    (grad,) = torch.autograd.grad(s.kd, student)
    assert abs(s.kd.item()) / 6 < 1e-6, s.kd.item() / 6
    assert grad.abs().max().item() < 1e-6


def test_below_the_floor_the_teacher_rest_still_pulls_a_student_with_more_rest_mass():
    """The floor still teaches: a student that puts 10% outside a near-certain teacher's top-1 is
    pushed back (its rest bucket loses mass), at every temperature."""
    teacher = torch.zeros(1, 30)
    teacher[0, 3] = 40.0
    lp, ids = F.log_softmax(teacher, -1).topk(1, dim=-1)
    student = torch.zeros(1, 30)
    student[0, 3] = math.log(0.9 * 29 / 0.1)  # p(token 3) = 0.9, the rest 0.1
    student.requires_grad_(True)
    for T in (1.0, 2.0, 4.0):
        s = loss_sums(student, torch.zeros(1, dtype=torch.long), kind="fkl", temperature=T, topk_ids=ids,
                      topk_logprobs=lp)
        (grad,) = torch.autograd.grad(s.kd, student)
        assert s.kd.item() > 1e-3 and grad[0, 3].item() < 0  # raise token 3's logit


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("T", [0.7, 1.0, 2.0])
def test_topk_covering_the_vocab_equals_dense(kind, T):
    c = make_case()
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(V, generator=g) for _ in range(N)])  # K = V, in no particular order
    lp = F.log_softmax(c["teacher_logits"], -1).gather(1, ids)
    student = (c["hidden"] @ c["weight"].T).requires_grad_(True)
    dense = loss_sums(student, c["targets"], kind=kind, temperature=T, teacher_logits=c["teacher_logits"])
    (g_dense,) = torch.autograd.grad(dense.kd, student)
    sparse = loss_sums(student, c["targets"], kind=kind, temperature=T, topk_ids=ids, topk_logprobs=lp,
                       topk_mask=torch.ones_like(ids, dtype=torch.bool))
    (g_sparse,) = torch.autograd.grad(sparse.kd, student)
    torch.testing.assert_close(sparse.kd, dense.kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KL_KINDS)
def test_sparse_never_exceeds_dense_at_temperature_1(kind):
    # Bucketing is a coarse-graining of both distributions: data-processing inequality, per token.
    c = make_case(k=5)
    student = c["hidden"] @ c["weight"].T
    for i in range(N):
        row = slice(i, i + 1)
        dense = loss_sums(student[row], c["targets"][row], kind=kind, teacher_logits=c["teacher_logits"][row])
        sparse = loss_sums(student[row], c["targets"][row], kind=kind, topk_ids=c["topk_ids"][row],
                           topk_logprobs=c["topk_logprobs"][row], topk_mask=c["topk_mask"][row])
        assert 0.0 <= sparse.kd.item() <= dense.kd.item() + 1e-6


@pytest.mark.parametrize("kind", KL_KINDS)
def test_padding_is_ignored(kind):
    """Ragged rows padded to K (garbage ids and NaN log-probs) == each row given alone, unpadded."""
    c = make_case()
    ids = c["topk_ids"].clone()
    ids[~c["topk_mask"]] = ids[:, :1].expand(-1, K)[~c["topk_mask"]]  # padding repeats a stored id
    student = (c["hidden"] @ c["weight"].T).requires_grad_(True)
    padded = loss_sums(student, c["targets"], kind=kind, temperature=2.0, topk_ids=ids,
                       topk_logprobs=c["topk_logprobs"], topk_mask=c["topk_mask"])
    (g_padded,) = torch.autograd.grad(padded.kd, student)
    total, grads = 0.0, []
    for i in range(N):
        k = int(c["topk_mask"][i].sum())
        row = student[i:i + 1]
        s = loss_sums(row, c["targets"][i:i + 1], kind=kind, temperature=2.0,
                      topk_ids=ids[i:i + 1, :k], topk_logprobs=c["topk_logprobs"][i:i + 1, :k])
        total += s.kd.item()
        grads.append(torch.autograd.grad(s.kd, student)[0][i])
    assert padded.kd.item() == pytest.approx(total, rel=1e-5)
    torch.testing.assert_close(g_padded, torch.stack(grads), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_sparse_edge_cases_stay_finite(kind, T):
    """Stored mass rounding past 1, a row with every entry masked, top-k holding ~all mass."""
    v = 40
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(3, v, generator=g) * 2
    teacher[2, 0] = 40.0  # row 2: one token holds all but ~1e-16 of the mass
    lp, ids = F.log_softmax(teacher, -1).topk(v - 1, dim=-1)
    lp[0] += 1e-3  # row 0: stored log-probs sum past 1 (API rounding)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1] = False  # row 1: no alternatives at all
    student = torch.randn(3, v, generator=g).requires_grad_(True)
    s = loss_sums(student, torch.zeros(3, dtype=torch.long), kind=kind, temperature=T,
                  topk_ids=ids, topk_logprobs=lp, topk_mask=mask)
    (grad,) = torch.autograd.grad(s.kd, student)
    assert math.isfinite(s.kd.item()) and s.kd.item() > 0
    assert torch.isfinite(grad).all()


def test_jsd_conventions():
    c = make_case()
    a, b = c["hidden"] @ c["weight"].T, c["teacher_logits"]
    ab = loss_sums(a, c["targets"], kind="jsd", beta=0.5, teacher_logits=b).kd
    ba = loss_sums(b, c["targets"], kind="jsd", beta=0.5, teacher_logits=a).kd
    torch.testing.assert_close(ab, ba)  # beta = 0.5 is symmetric
    assert 0 < ab.item() <= N * math.log(2)  # and bounded by log 2 nats per token
    for beta, kl_kind in ((0.0, "fkl"), (1.0, "rkl")):  # TRL's endpoints: forward / reverse KL, never 0
        for teacher in ("dense", "sparse"):
            s = loss_sums(a, c["targets"], kind="jsd", beta=beta, **teacher_kwargs(c, teacher))
            kl = loss_sums(a, c["targets"], kind=kl_kind, **teacher_kwargs(c, teacher))
            assert s.kd.item() > 0 and s.kd.item() == kl.kd.item()


def test_low_precision_logits_are_computed_in_fp32():
    c = make_case()
    logits = (c["hidden"] @ c["weight"].T).bfloat16()
    teacher = c["teacher_logits"].bfloat16()
    low = loss_sums(logits, c["targets"], kind="fkl", temperature=2.0, teacher_logits=teacher)
    full = loss_sums(logits.float(), c["targets"], kind="fkl", temperature=2.0, teacher_logits=teacher.float())
    assert low.ce.dtype == low.kd.dtype == torch.float32
    assert low.ce.item() == full.ce.item() and low.kd.item() == full.kd.item()


@settings(max_examples=20, deadline=None)
@given(scale=st.sampled_from([1e-3, 1.0, 30.0, 300.0]), kind=st.sampled_from(KL_KINDS),
       T=st.sampled_from([0.5, 1.0, 4.0]), seed=st.integers(0, 2**16))
def test_divergences_are_finite_and_nonnegative(scale, kind, T, seed):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(6, 50, generator=g) * scale).requires_grad_(True)
    teacher = torch.randn(6, 50, generator=g) * scale
    lp, ids = F.log_softmax(teacher, -1).topk(8, dim=-1)
    targets = torch.zeros(6, dtype=torch.long)
    for kw in ({"teacher_logits": teacher}, {"topk_ids": ids, "topk_logprobs": lp}):
        s = loss_sums(student, targets, kind=kind, temperature=T, **kw)
        (grad,) = torch.autograd.grad(s.kd, student)
        # fp32 rounding only: ~1e-6 of log-prob error per token, scaled by T^2 like the loss
        assert math.isfinite(s.kd.item()) and s.kd.item() >= -1e-6 * T**2 * s.n_tokens
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"kind": "kl"}, "expected one of"),
    ({"kind": "fkl"}, "got neither"),
    ({"kind": "fkl", "teacher_logits": "dense", "topk_ids": "sparse"}, "got both"),
    ({"kind": "fkl", "teacher_logits": "dense", "temperature": 0.0}, "temperature"),
    ({"kind": "jsd", "teacher_logits": "dense", "beta": 1.5}, "beta"),
    ({"kind": "fkl", "topk_ids": "sparse", "topk_logprobs": "short"}, "topk_logprobs has shape"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, match):
    c = make_case(n=4)
    fill = {"dense": c["teacher_logits"], "sparse": c["topk_ids"], "short": c["topk_logprobs"][:, :3]}
    kwargs = {k: fill.get(v, v) if isinstance(v, str) and k != "kind" else v for k, v in kwargs.items()}
    if "topk_ids" in kwargs:
        kwargs.setdefault("topk_logprobs", c["topk_logprobs"])
    logits = c["hidden"] @ c["weight"].T
    with pytest.raises(ValueError, match=match):
        loss_sums(logits, c["targets"], **kwargs)


# ---------------------------------------------------------------- chunked form == plain form


def chunked(c, teacher, chunk_size, hidden, weight, bias, **kw):
    if teacher == "dense":
        kw.update(teacher_hidden=c["teacher_hidden"], teacher_lm_head_weight=c["teacher_weight"])
    else:
        kw.update({k: c[k] for k in ("topk_ids", "topk_logprobs", "topk_mask")})
    return chunked_loss_sums(hidden, weight, c["targets"], chunk_size=chunk_size, lm_head_bias=bias, **kw)


def plain(c, teacher, hidden, weight, bias, **kw):
    return loss_sums(F.linear(hidden, weight, bias), c["targets"], **teacher_kwargs(c, teacher), **kw)


@pytest.mark.parametrize("kind,teacher", [("ce", "dense")] + [(k, t) for k in KL_KINDS for t in ("dense", "sparse")])
@pytest.mark.parametrize("chunk_size,with_bias", [(16, False), (20, True), (64, False)])
def test_chunked_matches_plain_values_and_gradients(kind, teacher, chunk_size, with_bias):
    c = make_case()
    kw = {"kind": kind, "temperature": 2.0, "beta": 0.3}
    results = []
    for form in ("plain", "chunked"):
        h = c["hidden"].clone().requires_grad_(True)
        w = c["weight"].clone().requires_grad_(True)
        b = c["bias"].clone().requires_grad_(True) if with_bias else None
        s = plain(c, teacher, h, w, b, **kw) if form == "plain" else chunked(c, teacher, chunk_size, h, w, b, **kw)
        (0.3 * s.ce + 0.7 * s.kd).backward()
        results.append((s, h.grad, w.grad, b.grad if with_bias else None))
    (p, *p_grads), (q, *q_grads) = results
    assert q.n_tokens == p.n_tokens == N
    torch.testing.assert_close(q.ce, p.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.kd, p.kd, rtol=1e-5, atol=1e-5)
    if kind != "ce":
        assert p.kd.item() > 1.0
    for gq, gp in zip(q_grads, p_grads):
        if gp is not None:
            assert gp.abs().max() > 1e-3
            torch.testing.assert_close(gq, gp, rtol=1e-5, atol=1e-6)


class MemoryProbe(TorchDispatchMode):
    """Over every tensor an op produces, forward and backward: the largest one (elements), and the
    most bytes alive at once (storages tracked by weak reference, so freed ones stop counting)."""

    def __init__(self):
        super().__init__()
        self.largest, self.peak_bytes, self._alive = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                storage = t.untyped_storage()
                self._alive[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self._alive = {k: v for k, v in self._alive.items() if not v[0].expired()}
        self.peak_bytes = max(self.peak_bytes, sum(nbytes for _, nbytes in self._alive.values()))
        return out


@pytest.mark.parametrize("teacher", ["dense", "sparse"])
def test_chunked_never_holds_full_vocab_logits(teacher):
    c = make_case(d=4)  # so the head weights, views of [V, D] and [V, 2D], stay below chunk * V
    chunk = 12  # N / 4
    probes = {}
    for form in ("plain", "chunked"):
        h = c["hidden"].clone().requires_grad_(True)
        w = c["weight"].clone().requires_grad_(True)
        with MemoryProbe() as probes[form]:
            kw = {"kind": "jsd", "temperature": 2.0}
            s = plain(c, teacher, h, w, None, **kw) if form == "plain" else chunked(c, teacher, chunk, h, w, None, **kw)
            (s.ce + s.kd).backward()
    assert probes["plain"].largest >= N * V  # the probe does see full logits when they exist
    assert probes["chunked"].largest <= chunk * V  # no [N, V] tensor, student or teacher
    # ... nor all the chunks' [chunk, V] tensors kept alive together (what forgetting to recompute does)
    assert probes["chunked"].peak_bytes < 0.5 * probes["plain"].peak_bytes


@pytest.mark.parametrize("form", ["plain", "chunked"])
def test_empty_micro_batch_is_zero_and_backpropagates(form):
    c = make_case(n=0)
    w = c["weight"].clone().requires_grad_(True)
    if form == "plain":
        s = loss_sums(c["hidden"] @ w.T, c["targets"], kind="fkl", teacher_logits=c["teacher_logits"])
    else:
        s = chunked(c, "dense", 16, c["hidden"], w, None, kind="fkl")
    combine(s, 0.5, "fkl", n_global_tokens=10).backward()
    assert s.n_tokens == 0 and s.ce.item() == 0.0 and s.kd.item() == 0.0
    assert not w.grad.abs().any()


# ---------------------------------------------------------------- combine and gradient accumulation


def test_combine_weights_and_normalises():
    s = LossSums(torch.tensor(10.0), torch.tensor(4.0), 5)
    assert combine(s, 0.25, "fkl", 8).item() == pytest.approx((0.75 * 10 + 0.25 * 4) / 8)
    assert combine(s, 0.25, "ce", 8).item() == pytest.approx(10 / 8)  # kd_weight ignored for "ce"
    with pytest.raises(ValueError, match="skip it"):
        combine(s, 0.25, "fkl", 0)


@pytest.mark.parametrize("kind", ["ce", *KL_KINDS])
def test_gradient_accumulation_equals_one_global_batch(kind):
    """4 ragged micro-batches (chunked), each divided by the global count == one batch of all 48 (plain)."""
    c = make_case()
    sizes = [5, 13, 9, 21]
    kw = {"kind": kind, "temperature": 2.0}
    w_acc = c["weight"].clone().requires_grad_(True)
    total = 0.0
    for idx in torch.arange(N).split(sizes):
        part = {k: v[idx] for k, v in c.items() if k not in ("weight", "bias", "teacher_weight")}
        part["teacher_weight"] = c["teacher_weight"]
        s = chunked(part, "dense", 8, part["hidden"], w_acc, None, **kw)
        loss = combine(s, 0.7, kind, n_global_tokens=N)
        loss.backward()
        total += loss.item()
    w_one = c["weight"].clone().requires_grad_(True)
    one = combine(plain(c, "dense", c["hidden"], w_one, None, **kw), 0.7, kind, n_global_tokens=N)
    one.backward()
    assert total == pytest.approx(one.item(), rel=1e-5)
    torch.testing.assert_close(w_acc.grad, w_one.grad, rtol=1e-5, atol=1e-7)
    # The usual mistake, averaging per-micro-batch means, gives a different loss on ragged batches.
    means = [combine(plain({**c, **{k: c[k][idx] for k in ("targets", "teacher_logits")}}, "dense",
                           c["hidden"][idx], c["weight"], None, **kw), 0.7, kind, len(idx)).item()
             for idx in torch.arange(N).split(sizes)]
    assert sum(means) / 4 != pytest.approx(one.item(), rel=1e-4)
