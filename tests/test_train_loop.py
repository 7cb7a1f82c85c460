"""The loop in-process: grad-accumulation equivalence, packing parity, KD teachers, saved models load."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_here, synthetic_records, write_jsonl
from kdforge.config import from_dict
from kdforge.data.dataset import KDDataset, collate
from kdforge.model import ModelCfg, build_student
from kdforge.train import checkpoint as ckpt
from kdforge.train.checkpoint import TrainState
from kdforge.train.data_stream import DataStream
from kdforge.train.loop import LoopConfig, train_steps
from kdforge.train.objective import DistillObjective
from kdforge.train.schedule import make_scheduler
from train_helpers import metrics, train_config


def _one_step(tokenizer_dir, data_file, micro: int, accum: int) -> dict:
    ds = KDDataset(data_file, tokenizer_dir, 64)
    torch.manual_seed(0)
    model = build_student(ModelCfg(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=None,
                                   ffn_dim=64, max_seq_len=64), len(ds.tokenizer), seed=0)
    # SGD: the update is the gradient itself (Adam would magnify float rounding in near-zero grads)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = make_scheduler(opt, "constant", 0, None)
    stream = DataStream(ds, micro, seed=0)
    train_steps(DistillObjective(model), opt, sched, stream, TrainState(),
                LoopConfig(grad_accum=accum, grad_clip=None), until_step=2, seq_len_at=lambda s: 64)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grad_accumulation_equals_a_bigger_micro_batch(tokenizer_dir, data_file):
    """grad_accum 4 x micro 1 == micro 4 x grad_accum 1: the loss is normalised by the target
    tokens of the whole global batch, not averaged per micro-batch (examples differ in length)."""
    a = _one_step(tokenizer_dir, data_file, micro=1, accum=4)
    b = _one_step(tokenizer_dir, data_file, micro=4, accum=1)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_packed_batch_gives_the_same_loss_as_padded(tokenizer_dir, data_file):
    ds = KDDataset(data_file, tokenizer_dir, 64)
    model = build_student(ModelCfg(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=None,
                                   ffn_dim=64, max_seq_len=256), len(ds.tokenizer), seed=0)
    obj = DistillObjective(model)
    items = [ds[i] for i in range(6)]
    pad = ds.tokenizer.pad_token_id
    ce_pad, _, n_pad = obj(collate(items, pad))
    packed = collate(items, pad, packed_len=128)
    assert packed["input_ids"].shape[0] < len(items)  # several examples share a row
    ce_pack, _, n_pack = obj(packed)
    assert n_pack == n_pad
    torch.testing.assert_close(ce_pack, ce_pad, atol=1e-4, rtol=1e-5)


def _topk_data(tmp_path, teacher_dir, tokenizer_dir, n=24, k=4):
    """Records whose teacher_logprobs are a real model's top-k over its own greedy answer tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir))
    rows = []
    for r in synthetic_records(n, seed=3):
        ids = tok(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                          add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        resp = tok(r["teacher_text"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = teacher(torch.tensor([ids + resp])).logits[0, len(ids) - 1:-1]
        lp = logits.log_softmax(-1)
        top = lp.topk(k, -1)
        r["teacher_logprobs"] = [
            {"token": tok.decode([t]), "logprob": float(lp[i, t]),
             "top": [{"token": tok.decode([j]), "logprob": float(v)} for v, j in zip(top.values[i].tolist(), top.indices[i].tolist())]}
            for i, t in enumerate(resp)]
        rows.append(r)
    return write_jsonl(tmp_path / "topk.jsonl", rows)


def test_sparse_kd_on_stored_topk_trains(tmp_path, tokenizer_dir, tiny_model_dir):
    data = _topk_data(tmp_path, tiny_model_dir, tokenizer_dir)
    cfg = train_config(tmp_path, tokenizer_dir, data, max_steps=6, save_steps=6)
    r = cli_here("train", "--config", cfg, "loss.kind=fkl", "loss.kd_weight=1.0")
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(tmp_path / "out")
    assert all(m[s]["kd"] > 0 for s in m) and m[6]["kd"] < m[1]["kd"]


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_every_kd_kind_from_topk_and_from_a_dense_teacher(tmp_path, tokenizer_dir, tiny_model_dir, kind):
    """Each divergence runs through the objective with both teacher sources, and a student that
    IS the teacher has zero divergence from its own dense logits."""
    from transformers import AutoModelForCausalLM

    data = _topk_data(tmp_path, tiny_model_dir, tokenizer_dir, n=4)
    ds = KDDataset(data, tokenizer_dir, 64, with_topk=True)
    batch = collate([ds[i] for i in range(4)], ds.tokenizer.pad_token_id)
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    student = build_student(ModelCfg(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=None,
                                     ffn_dim=64, max_seq_len=64), len(ds.tokenizer), seed=1)
    for chunk in (None, 7):
        ce, kd, n = DistillObjective(student, kind, chunk_size=chunk)(batch)  # sparse top-k
        assert kd > 0 and torch.isfinite(ce)
        (ce + kd).backward()
        _, kd_dense, _ = DistillObjective(student, kind, 2.0, chunk_size=chunk, teacher=teacher)(batch)
        assert kd_dense > 0
        _, kd_self, _ = DistillObjective(teacher, kind, 2.0, chunk_size=chunk, teacher=teacher)(batch)
        assert float(kd_self.detach()) == pytest.approx(0.0, abs=1e-5)


def test_dense_kd_from_a_local_teacher(tmp_path, tokenizer_dir, tiny_model_dir, data_file):
    cfg = train_config(tmp_path, tokenizer_dir, data_file, max_steps=6, save_steps=6)
    r = cli_here("train", "--config", cfg, "loss.kind=fkl", f"teacher.path={tiny_model_dir}",
                "loss.temperature=2.0", "loss.kd_weight=1.0")
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(tmp_path / "out")
    assert all(m[s]["kd"] > 0 for s in m) and m[6]["kd"] < m[1]["kd"]


def test_kd_without_teacher_or_topk_is_a_clear_error(tmp_path, tokenizer_dir, data_file):
    r = cli_here("train", "--config", train_config(tmp_path, tokenizer_dir, data_file), "loss.kind=fkl")
    assert r.returncode == 2
    assert "teacher_logprobs" in r.stderr and "--top-logprobs" in r.stderr and f"{data_file}:1" in r.stderr


def test_saved_student_loads_with_plain_transformers(tmp_path, tokenizer_dir, data_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = train_config(tmp_path, tokenizer_dir, data_file, max_steps=3, save_steps=3)
    assert cli_here("train", "--config", cfg).returncode == 0
    path = tmp_path / "out" / "checkpoint-3"
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
              "tokenizer.json", "kdforge.yaml"):
        assert (path / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok("What is 1 plus 2?", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or out[0, -1] == tok.eos_token_id


def test_lora_adapter_loads_with_plain_peft(tmp_path, tokenizer_dir, tiny_model_dir, data_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = train_config(tmp_path, tokenizer_dir, data_file, max_steps=4, save_steps=4, lr=1e-2)
    r = cli_here("train", "--config", cfg, f"model.path={tiny_model_dir}", "model.preset=null",
                "model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}")
    assert r.returncode == 0, r.stdout + r.stderr
    path = tmp_path / "out" / "checkpoint-4"
    assert (path / "adapter_model.safetensors").is_file() and not (path / "model.safetensors").exists()
    assert "trainable" in r.stdout
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(path))
    after = model(ids).logits
    assert not torch.allclose(before, after), "the trained adapter changes the outputs"
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] >= ids.shape[1] + 1


def test_curriculum_and_eval(tmp_path, tokenizer_dir, data_file):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", synthetic_records(8, seed=9))
    cfg = train_config(tmp_path, tokenizer_dir, data_file, max_steps=6, save_steps=6,
                       seq_lengths=[16, 32, 64], eval_steps=3, eval_batches=2)
    r = cli_here("train", "--config", cfg, f"io.eval_shards=[{eval_file}]")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    seq = {x["step"]: x["seq_len"] for x in rows if "seq_len" in x}
    assert seq == {1: 16, 2: 16, 3: 32, 4: 32, 5: 64, 6: 64}
    evals = [x for x in rows if "eval_loss" in x]
    assert [e["step"] for e in evals] == [3, 6] and all(e["eval_loss"] > 0 for e in evals)
    st = ckpt.read_state(tmp_path / "out" / "checkpoint-6")
    assert any("eval_loss" in h for h in st.log_history)


def test_schedules():
    from kdforge.train.schedule import LRMultiplier

    cos = LRMultiplier("cosine", 10, 110, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)
    wsd = LRMultiplier("wsd", 10, 100, min_ratio=0.0, decay_fraction=0.2)
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.5) and wsd(100) == 0.0
    assert LRMultiplier("constant", 0, 100)(99) == 1.0
    assert LRMultiplier("cosine", 5, None)(1000) == 1.0  # open-ended stream: no decay


def test_smoke_command(tmp_path):
    r = cli_here("smoke", "--workdir", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Resuming from checkpoint: checkpoint-5" in r.stdout and "smoke ok" in r.stdout
    assert (tmp_path / "checkpoints" / "checkpoint-10" / "optimizer.pt").is_file()


def test_log_history_in_trainer_state_is_bounded(tokenizer_dir, data_file, monkeypatch):
    import kdforge.train.loop as loop

    monkeypatch.setattr(loop, "MAX_LOG_HISTORY", 3)
    ds = KDDataset(data_file, tokenizer_dir, 64)
    model = build_student(ModelCfg(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=None,
                                   ffn_dim=64, max_seq_len=64), len(ds.tokenizer), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState()
    train_steps(DistillObjective(model), opt, make_scheduler(opt, "constant", 0, None), DataStream(ds, 2),
                state, LoopConfig(), until_step=6, seq_len_at=lambda s: 64)
    assert [h["step"] for h in state.log_history] == [4, 5, 6]


def test_packed_stream_fills_at_most_micro_batch_rows_and_takes_every_example_once(tokenizer_dir, data_file):
    ds = KDDataset(data_file, tokenizer_dir, 64)
    stream = DataStream(ds, micro_batch_size=2, seed=0, packing=True, max_epochs=1)
    taken, batches = 0, 0
    while (got := stream.next_micro_batch(64)) is not None:
        batch, n = got
        rows, width = batch["input_ids"].shape
        assert width == 64 and 1 <= rows <= 2  # rows of seq_len tokens, at most micro_batch_size
        assert bool((batch["seq_ids"] >= 0).any(dim=1).all()), "no row is all padding"
        # every example's tokens are in the batch: rows hold exactly the taken examples' lengths
        assert int((batch["seq_ids"] >= 0).sum()) == sum(len(ds[i]["input_ids"]) for i in
                                                         stream._perm[stream.index - n:stream.index])
        taken += n
        batches += 1
    assert taken == len(ds) and batches < len(ds) / 2  # several examples per micro-batch
