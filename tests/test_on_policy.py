"""On-policy distillation: the student answers, the teacher scores its tokens (SPEC "On-policy
distillation"). Real `kdforge train` processes, a real SIGKILL, a real `kdforge serve` teacher."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cli_env, cli_here, run_cli
from kdforge.train import checkpoint as ckpt
from train_helpers import kill9, metrics, popen_train, wait_for, weights

KEY_ENV = "KDFORGE_ONPOLICY_KEY"
FREE = {"price_input": 0.0, "price_output": 0.0}  # a local teacher, said to be free


def loss_of(rec: dict) -> float:
    """A step's logged loss: `loss` off-policy, `loss_on_policy` on-policy (another quantity)."""
    return rec["loss"] if "loss" in rec else rec["loss_on_policy"]


def op_config(tmp, tokenizer_dir, data, *, out, teacher: dict, on_policy: dict, generate: dict | None = None,
              **train) -> "os.PathLike":
    cfg = {
        "model": {"preset": "toy", "max_seq_len": 128},
        "io": {"tokenizer_path": str(tokenizer_dir), "train_shards": [str(data)], "output_dir": str(tmp / out)},
        "teacher": teacher,
        "on_policy": {"max_new_tokens": 6, **on_policy},
        "loss": {"kind": "rkl", "kd_weight": 0.5},
        "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [64], "max_steps": 4, "lr": 3e-3,
                  "warmup_steps": 1, "save_steps": 2, "seed": 0, **train},
    }
    if generate:
        cfg["generate"] = generate
    path = tmp / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sigkill_once_saved(cfg, out) -> int:
    """Start `kdforge train`, SIGKILL it once a checkpoint exists; returns that checkpoint's step."""
    p = popen_train(cfg)
    assert wait_for(lambda: ckpt.latest_checkpoint(out) is not None), p.communicate()[0]
    kill9(p)
    return ckpt.read_state(ckpt.latest_checkpoint(out)).global_step


def test_sigkill_resume_of_an_on_policy_run_is_bitwise_an_uninterrupted_one(tmp_path, tokenizer_dir,
                                                                             tiny_model_dir, data_file):
    """Half the steps on-policy (dense local teacher): SIGKILL after a checkpoint, resume, and every
    loss, every on-policy draw and every weight equal the uninterrupted run's to the bit."""
    steps = 14
    kw = dict(teacher={"path": str(tiny_model_dir)}, on_policy={"fraction": 0.5}, max_steps=steps, save_steps=4)
    ref = op_config(tmp_path, tokenizer_dir, data_file, out="ref", **kw)
    assert (r := cli_here("train", "--config", ref)).returncode == 0, r.stdout + r.stderr
    cfg = op_config(tmp_path, tokenizer_dir, data_file, out="crash", **kw)
    out = tmp_path / "crash"
    killed_at = _sigkill_once_saved(cfg, out)
    assert killed_at < steps, "the run finished before the kill: the test proved nothing"
    r = run_cli("train", "--config", cfg, "--resume", "auto")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Resuming from checkpoint: checkpoint-{killed_at}" in r.stdout

    m_ref, m = metrics(tmp_path / "ref"), metrics(out)
    assert sorted(m) == list(range(1, steps + 1))
    flags = [bool(m_ref[s].get("on_policy")) for s in m_ref]
    assert 0 < sum(flags) < steps, f"both kinds of step should occur: {flags}"
    assert flags[killed_at:] == [bool(m[s].get("on_policy")) for s in range(killed_at + 1, steps + 1)]
    for s in m:
        assert (loss_of(m[s]), m[s].get("teacher_tokens")) == (loss_of(m_ref[s]), m_ref[s].get("teacher_tokens")), s
    a, b = weights(tmp_path / "ref" / f"checkpoint-{steps}"), weights(out / f"checkpoint-{steps}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_draw_depends_on_seed_and_step_only(tokenizer_dir):
    from kdforge.config import OnPolicySection
    from kdforge.data.dataset import load_tokenizer
    from kdforge.train.on_policy import OnPolicy

    tok = load_tokenizer(str(tokenizer_dir))
    sec = OnPolicySection(fraction=0.3)
    a = OnPolicy(sec, 0, None, tok, micro_batch_size=2, prompt_pool=[[1], [2], [3]])
    b = OnPolicy(sec, 0, None, tok, micro_batch_size=2, prompt_pool=[[1], [2], [3]])
    draws = [a.is_on_policy(s) for s in range(2000)]
    assert draws == [b.is_on_policy(s) for s in range(2000)]  # a resumed run makes the same draws
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert draws[500:] == [a.is_on_policy(s) for s in range(500, 2000)]  # no hidden state: order free
    assert a.pool_prompts(7, 3) == b.pool_prompts(7, 3) != a.pool_prompts(8, 3)
    other = OnPolicy(sec, 1, None, tok, micro_batch_size=2)
    assert draws != [other.is_on_policy(s) for s in range(2000)]


@pytest.fixture(scope="module")
def served_teacher(tiny_model_dir):
    from kdforge.serve import launch

    os.environ[KEY_ENV] = "onpolicy-test-key"
    server = launch(tiny_model_dir, env=cli_env(), api_key_env=KEY_ENV)
    with server:
        yield server


def _dense_topk_batch(batch, teacher, k):
    """The batch with the teacher's top-k + the token itself per answer token, from the dense
    in-process teacher: what a scoring server must return for the same tokens."""
    from kdforge.data.dataset import IGNORE

    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                               .logits.float(), -1)
    B, L = batch["input_ids"].shape
    ids, lps = torch.full((B, L, k + 1), -1), torch.zeros((B, L, k + 1))
    for b in range(B):
        for t in range(1, L):
            if batch["labels"][b, t] == IGNORE:
                continue
            row = lp[b, t - 1]
            entries = {int(i): float(row[i]) for i in row.topk(k).indices}
            entries[int(batch["input_ids"][b, t])] = float(row[batch["input_ids"][b, t]])
            top = sorted(entries.items(), key=lambda kv: (-kv[1], kv[0]))
            ids[b, t, :len(top)] = torch.tensor([i for i, _ in top])
            lps[b, t, :len(top)] = torch.tensor([v for _, v in top])
    return {**batch, "topk_ids": ids, "topk_logprobs": lps}


def test_over_http_the_loss_is_the_served_teachers(tmp_path, tokenizer_dir, tiny_model_dir, data_file,
                                                   served_teacher):
    """Every step on-policy, teacher.url = kdforge serve: step 1's logged KD equals the KD of the same
    sampled tokens against the dense in-process teacher's top-5, recomputed here."""
    from transformers import AutoModelForCausalLM

    from kdforge.config import load_config
    from kdforge.data.dataset import KDDataset
    from kdforge.train.data_stream import DataStream
    from kdforge.train.on_policy import OnPolicy, prompts_of
    from kdforge.train.session import build_session

    cfg_path = op_config(tmp_path, tokenizer_dir, data_file, out="http", max_steps=2,
                         teacher={"url": served_teacher.base_url, "api_key_env": KEY_ENV, "top_logprobs": 5},
                         on_policy={"fraction": 1.0}, generate=FREE)
    r = cli_here("train", "--config", cfg_path)
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(tmp_path / "http")
    assert all(m[s]["on_policy"] and m[s]["teacher_tokens"] > 0 for s in m)
    assert (tmp_path / "http" / "on_policy" / "cache.sqlite").exists()

    cfg = load_config([str(cfg_path)])
    session = build_session(cfg, install_signals=False)
    ds = KDDataset(cfg.io.train_shards, tokenizer=session.tokenizer, max_seq_length=64)
    batch, _ = DataStream(ds, 4, 0).next_micro_batch(64)
    op = OnPolicy(cfg.on_policy, 0, session.model, session.tokenizer, micro_batch_size=4)
    (mb,) = op.replace(0, [prompts_of(batch)])
    assert op.last.teacher_tokens == m[1]["teacher_tokens"]  # the same answers were sampled
    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        sums = session.objective(_dense_topk_batch(mb, teacher, 5))
    assert sums.kd_count == m[1]["kd_tokens"]
    assert abs(float(sums.kd) / sums.kd_count - m[1]["kd_on_policy"]) < 1e-5, (float(sums.kd) / sums.kd_count, m[1])
    session.close()


def test_a_priced_scoring_run_stops_at_its_budget_with_exit_3_and_resumes(tmp_path, tokenizer_dir, data_file,
                                                                         served_teacher):
    from kdforge.teacher.budget import BudgetLedger
    from kdforge.teacher.pricing import Prices

    price = {"price_input": 1000.0, "price_output": 1000.0}  # USD per million tokens: $0.001 a token
    limit = 0.30  # two and a bit steps of 4 scored sequences of ~30 tokens
    kw = dict(teacher={"url": served_teacher.base_url, "api_key_env": KEY_ENV, "top_logprobs": 5},
              on_policy={"fraction": 1.0}, max_steps=6, save_steps=100)
    cfg = op_config(tmp_path, tokenizer_dir, data_file, out="priced", generate={**price, "budget_limit": limit}, **kw)
    r = cli_here("train", "--config", cfg)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "budget exhausted" in r.stderr + r.stdout
    out = tmp_path / "priced"
    ledger = BudgetLedger(out / "on_policy" / "budget.jsonl", Prices(1000.0, 1000.0, "test"), readonly=True)
    assert 0 < ledger.spent <= limit
    last = ckpt.latest_checkpoint(out)
    assert last is not None, "the run saves its last finished step before exiting 3"
    stopped_at = ckpt.read_state(last).global_step
    assert 1 <= stopped_at < 6 and sorted(metrics(out)) == list(range(1, stopped_at + 1))
    assert all(m["teacher_usd_total"] <= limit for m in metrics(out).values())
    # tokens paid for in the step the budget stopped (its first requests fitted, a later one not)
    paid_in_stopped = ledger.prompt_tokens - sum(m["teacher_tokens"] for m in metrics(out).values())
    assert paid_in_stopped > 0, "the limit should cut a step in the middle: the test proves less"

    # the resume in a new process: only the cache on disk can say what the stopped step paid for
    r = run_cli("train", "--config", cfg, "--resume", "auto", "generate.budget_limit=10")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Resuming from checkpoint: checkpoint-{stopped_at}" in r.stdout
    m = metrics(out)
    assert sorted(m) == list(range(1, 7))
    assert m[stopped_at + 1]["teacher_cached"] > 0, "what the stopped step paid for is not paid again"
    spent = BudgetLedger(out / "on_policy" / "budget.jsonl", Prices(1000.0, 1000.0, "test"), readonly=True).spent
    assert abs(spent - m[6]["teacher_usd_total"]) < 1e-9


def test_config_rules_exit_2_naming_the_field(tmp_path, tokenizer_dir, data_file):
    cfg = op_config(tmp_path, tokenizer_dir, data_file, out="nope", teacher={}, on_policy={"fraction": 0.5})
    r = cli_here("train", "--config", cfg, "loss.kind=ce")
    assert r.returncode == 2 and "on_policy.fraction" in r.stderr and "loss.kind" in r.stderr, r.stderr
    r = cli_here("train", "--config", cfg, "on_policy.fraction=1.5")
    assert r.returncode == 2 and "on_policy.fraction" in r.stderr, r.stderr
    r = cli_here("train", "--config", cfg, "teacher.url=http://127.0.0.1:9/v1", "teacher.model=no-such-model",
                "generate.budget_limit=1")
    assert r.returncode == 2 and "generate.budget_limit" in r.stderr and "price" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_under_torchrun_http_scoring_goes_through_rank_0s_one_ledger(tmp_path, tokenizer_dir, data_file,
                                                                     served_teacher):
    """teacher.url on-policy under torchrun (2 ranks, DDP): rank 0 alone holds the ledger and
    cache and scores every rank's sequences in the step's global order, so the run equals one
    process with the same global batch (losses, teacher tokens, $ per step and in all). At a
    budget limit every rank stops (exit 3 each, none left waiting) after saving the last step."""
    import subprocess
    import sys

    from kdforge.teacher.budget import BudgetLedger
    from kdforge.teacher.pricing import Prices

    price = {"price_input": 1000.0, "price_output": 1000.0}  # $0.001 a token
    kw = dict(teacher={"url": served_teacher.base_url, "api_key_env": KEY_ENV, "top_logprobs": 5},
              on_policy={"fraction": 1.0}, max_steps=3, save_steps=100, micro_batch_size=2)
    one = op_config(tmp_path, tokenizer_dir, data_file, out="one", generate={**price, "budget_limit": 10.0},
                    grad_accum=2, **kw)
    two = op_config(tmp_path, tokenizer_dir, data_file, out="two", generate={**price, "budget_limit": 10.0}, **kw)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "kdforge", "train", "--config"]
    r = cli_here("train", "--config", one)  # the one-process reference
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*torchrun, str(two)], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sorted(m2) == [1, 2, 3]
    for s in m1:
        assert m2[s]["teacher_tokens"] == m1[s]["teacher_tokens"] > 0, s  # the same answers were sampled
        assert m2[s]["teacher_usd"] == pytest.approx(m1[s]["teacher_usd"], abs=1e-9) and m2[s]["teacher_usd"] > 0
        assert m2[s]["teacher_usd_total"] == pytest.approx(m1[s]["teacher_usd_total"], abs=1e-9)
        assert abs(loss_of(m2[s]) - loss_of(m1[s])) < 1e-4, (s, m1[s], m2[s])
    prices = Prices(1000.0, 1000.0, "test")
    spent = [BudgetLedger(tmp_path / o / "on_policy" / "budget.jsonl", prices, readonly=True).spent
             for o in ("one", "two")]
    assert spent[0] == pytest.approx(spent[1], abs=1e-9) and spent[1] == pytest.approx(m2[3]["teacher_usd_total"])
    assert sorted(p.name for p in (tmp_path / "two" / "on_policy").iterdir() if p.suffix != ".lock") == \
        sorted(p.name for p in (tmp_path / "one" / "on_policy").iterdir() if p.suffix != ".lock")

    # a limit that ends inside step 2: both ranks stop with exit 3, the finished step 1 is saved
    low = op_config(tmp_path, tokenizer_dir, data_file, out="low",
                    generate={**price, "budget_limit": m1[1]["teacher_usd"] * 1.5}, **kw)
    r = subprocess.run([*torchrun, str(low)], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("budget exhausted") + r.stdout.count("budget exhausted") >= 2, r.stdout + r.stderr
    assert "exitcode  : 3" in r.stderr and "exitcode  : 1" not in r.stderr, r.stderr
    assert ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "low")).global_step == 1
    assert BudgetLedger(tmp_path / "low" / "on_policy" / "budget.jsonl", prices, readonly=True).spent <= \
        m1[1]["teacher_usd"] * 1.5


def test_under_fsdp_on_policy_steps_match_one_process(tmp_path, tokenizer_dir, tiny_model_dir, data_file):
    """FSDP2 on 2 CPU ranks, half the steps on-policy (dense local teacher): sampling gathers the
    sharded student (every rank steps its decode loop until all are done), and the run equals one
    process with the same global batch: the same draws, answers, losses and final weights."""
    import subprocess
    import sys

    steps = 6
    kw = dict(teacher={"path": str(tiny_model_dir)}, on_policy={"fraction": 0.5}, max_steps=steps,
              save_steps=steps, micro_batch_size=2)
    one = op_config(tmp_path, tokenizer_dir, data_file, out="one", grad_accum=2, **kw)
    fs = op_config(tmp_path, tokenizer_dir, data_file, out="fsdp", fsdp=True, **kw)
    r = cli_here("train", "--config", one)  # the one-process reference
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "kdforge", "train", "--config", str(fs)],
                       env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "fsdp")
    assert sorted(m2) == list(range(1, steps + 1))
    flags = [bool(m1[s]["on_policy"]) for s in m1]
    assert 0 < sum(flags) < steps, f"both kinds of step should occur: {flags}"
    for s in m1:
        assert m2[s]["on_policy"] == m1[s]["on_policy"] and m2[s].get("teacher_tokens") == m1[s].get("teacher_tokens")
        assert abs(loss_of(m2[s]) - loss_of(m1[s])) < 1e-4, (s, m1[s], m2[s])
    a, b = weights(tmp_path / "one" / f"checkpoint-{steps}"), weights(tmp_path / "fsdp" / f"checkpoint-{steps}")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


@settings(max_examples=40, deadline=None)
@given(examples=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6)), min_size=1, max_size=8),
       seed=st.integers(0, 1000))
def test_packed_batches_give_on_policy_the_same_prompts_as_padded_ones(examples, seed):
    """prompts_of on a packed micro-batch == on the padded one, as multisets: a {"text"} record
    (prompt length 0) has no prompt to answer, packed or not (packing erases its first label, which
    made its first token a 1-token prompt), and a real 1-token prompt stays one."""
    from kdforge.data.dataset import IGNORE, collate
    from kdforge.train.on_policy import prompts_of

    g = torch.Generator().manual_seed(seed)
    items = []
    for n_prompt, n_answer in examples:
        ids = torch.randint(3, 500, (n_prompt + n_answer,), generator=g)
        labels = torch.cat([torch.full((n_prompt,), IGNORE), ids[n_prompt:]])
        items.append({"input_ids": ids, "labels": labels})
    padded = prompts_of(collate(items, 0))
    packed = prompts_of(collate(items, 0, packed_len=sum(len(x["input_ids"]) for x in items)))
    assert sorted(packed) == sorted(padded) == sorted(x["input_ids"][:p].tolist() for x, (p, _) in zip(items, examples))

