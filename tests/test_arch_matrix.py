"""The architecture matrix: `model.path` is "any local causal LM", so each family the README
names is trained, LoRA-trained, distilled, run through the daemon and served here, on a tiny
random model built from its `transformers` config (nothing downloaded) with kdforge's tokenizer.

Families and what each brings that Llama does not: GPT-2 (Conv1D layers, tied embeddings,
learned positions), Qwen2 (q/k/v biases), Phi (an lm_head bias, partial rotary, dense/fc1/fc2
names), Gemma-2 (final logit soft-capping, tied embeddings, sliding-window layers) and Mixtral
(a mixture of experts with a router). Every test is parametrized by family: one test id a cell.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import cli_here, free_port, synthetic_records, write_jsonl
from daemon_helpers import one_thread  # noqa: F401 - the daemon and the references on one thread
from train_helpers import metrics

FAMILIES = ["llama", "gpt2", "qwen2", "phi", "gemma2", "mixtral"]
SEQ = 48  # tokens: every synthetic record fits, so no cell depends on truncation


def _hf_config(family: str, vocab: int, ids: dict):
    """A tiny config of `family` (hidden 32, 2 layers) on the tokenizer's vocabulary, dropout off
    so two loads of one folder compute the same thing."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, **ids)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common)
    if family == "phi":
        return tf.PhiConfig(partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                            **common)
    if family == "gemma2":
        # soft-capping at 2: random tiny logits reach it, so a path that skips the cap shows
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, sliding_window=16,
                               **common)
    if family == "mixtral":
        return tf.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **common)
    raise ValueError(family)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, object]:
    """family -> a Hugging Face model folder (random init, seed 0) with the tokenizer beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_hf_config(fam, len(tok), ids))
        if fam == "phi":  # zero-initialised: a path that drops the head bias would go unnoticed
            torch.nn.init.normal_(model.lm_head.bias, std=0.5)
        model.save_pretrained(root / fam)
        tok.save_pretrained(root / fam)
        out[fam] = root / fam
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("matrix_data") / "train.jsonl", synthetic_records(16))


def _config(model_dir, data, out, **sections):
    from kdforge.config import from_dict

    d = {"model": {"path": str(model_dir), **sections.pop("model", {})},
         "io": {"tokenizer_path": str(model_dir), "train_shards": [str(data)], "output_dir": str(out)},
         "loss": {"kind": "ce"},
         "train": {"micro_batch_size": 4, "grad_accum": 1, "seq_lengths": [SEQ], "max_steps": 4, "lr": 3e-3,
                   "warmup_steps": 1, "save_steps": 2, "seed": 0}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return from_dict(d, check_files=True, for_run=True)


def _train_and_resume(cfg_of, tmp_path):
    """(straight run's out dir, interrupted-at-2-then-resumed run's out dir, log lines)."""
    from kdforge.train.runner import run_training

    lines: list[str] = []
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_training(cfg_of(straight), resume=None, log=lines.append)
    run_training(cfg_of(split), resume=None, log=lines.append, stop_after=2)
    run_training(cfg_of(split), resume="auto", log=lines.append)
    return straight, split, lines


def _assert_same_run(straight, split, weights: str):
    """Resume parity: the same losses at every step and the same final weights, bitwise."""
    a, b = metrics(straight), metrics(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    wa, wb = load_file(straight / "checkpoint-4" / weights), load_file(split / "checkpoint-4" / weights)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the straight run's"


# ============================================================================ train

@pytest.mark.parametrize("family", FAMILIES)
def test_train_full_resume_parity(family, family_dirs, data, tmp_path):
    straight, split, _ = _train_and_resume(lambda out: _config(family_dirs[family], data, out), tmp_path)
    _assert_same_run(straight, split, "model.safetensors")
    first = load_file(family_dirs[family] / "model.safetensors")
    trained = load_file(straight / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(first[k], trained[k]) for k in first if k in trained), "nothing trained"


# ============================================================================ LoRA

# What PEFT's all-linear must reach in each family (full names end with these): GPT-2's Conv1D
# layers, Phi's own names; never the output head.
EXPECTED_TARGETS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"},
    "gemma2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},
}
# transformers 5 fuses Mixtral's experts into 3-D parameters (experts.gate_up_proj, experts.down_proj)
# and its router (mlp.gate) is no nn.Linear: PEFT's all-linear reaches all three through
# `target_parameters` (lora.ParamWrapper, one low-rank pair per parameter, rank split over experts)
EXPECTED_PARAMETERS = {"mixtral": {"gate.weight", "gate_up_proj", "down_proj"}}


def _lora_layers(peft_model) -> dict:
    """base state-dict key -> the PEFT layer adapting it (a LoRA layer's weight, or a
    ParamWrapper's parameter): the keys a merge must change."""
    out = {}
    for name, mod in peft_model.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            leaf = getattr(mod, "parameter_name", "weight")
            out[".".join(n for n in name.split(".") if n != "base_layer") + "." + leaf] = mod
    return out


def _adapted_weights(folder) -> set[str]:
    """The base keys PEFT's all-linear adapts in the model at `folder` (built on the meta device)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdforge.model.student import peft_lora_config

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)))
    return set(_lora_layers(get_peft_model(base, peft_lora_config(4, 8, 0.0, None))))


def _state(folder) -> dict:
    """The model's own tensors as transformers loads them (Mixtral's experts fused, as trained)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).state_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_default_targets_and_resume_parity(family, family_dirs, data, tmp_path, capsys):
    """No target_modules: PEFT's all-linear, written to adapter_config.json and printed once per
    session; the run resumes bitwise like a full one."""
    lora = {"lora": {"r": 4, "alpha": 8}}
    straight, split, _ = _train_and_resume(lambda out: _config(family_dirs[family], data, out, model=lora),
                                           tmp_path)
    _assert_same_run(straight, split, "adapter_model.safetensors")
    adapter_config = json.loads((straight / "checkpoint-4" / "adapter_config.json").read_text())
    written = adapter_config["target_modules"]
    leaves = {t.rsplit(".", 1)[-1] for t in written}
    assert leaves == EXPECTED_TARGETS[family], written
    assert set(adapter_config.get("target_parameters") or ()) == EXPECTED_PARAMETERS.get(family, set())
    # every adapted layer and parameter (Mixtral's experts and router too) is in the checkpoint and
    # trained: its B moved off zero, and the resumed run matched it bitwise (above)
    adapter = load_file(straight / "checkpoint-4" / "adapter_model.safetensors")
    lora_b = [k for k in adapter if k.endswith("lora_B.weight")]
    want = _adapted_weights(family_dirs[family])
    modules = {k.removesuffix(".lora_B.weight").removeprefix("base_model.model.").replace(".base_layer", "")
               for k in lora_b}
    assert len(lora_b) == len(want) and modules == {k.rsplit(".", 1)[0] for k in want}, (sorted(lora_b), want)
    frozen = [k for k in adapter if k.endswith("lora_B.weight") and not adapter[k].any()]
    assert not frozen, f"adapters that did not train: {frozen}"
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LoRA on ")]
    assert len(printed) == 3  # one per session: the straight run, the interrupted one, the resume
    said = sorted(written) + sorted(adapter_config.get("target_parameters") or [])  # Mixtral: experts, router
    assert printed[0] == f"LoRA on {', '.join(said)} (model.lora.target_modules unset: PEFT's all-linear)"


def test_lora_targets_that_match_nothing_exit_2_listing_conv1d_layers(family_dirs, data, tmp_path):
    """A given list stays as given: on GPT-2 Llama's names match nothing, and the message lists
    what LoRA can adapt there, Conv1D layers included."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(family_dirs["gpt2"]),
                                             "lora": {"r": 4, "target_modules": ["q_proj", "c_attn"]}},
                                   "io": {"tokenizer_path": str(family_dirs["gpt2"]), "train_shards": [str(data)]}}))
    r = cli_here("config", "validate", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "model.lora.target_modules: ['q_proj'] not in the model" in r.stderr
    assert "'c_attn', 'c_fc', 'c_proj'" in r.stderr and "all-linear" in r.stderr


def test_lora_dropout_on_mixtrals_experts_is_exit_2_before_training(family_dirs, data, tmp_path):
    """PEFT's wrappers of Mixtral's expert parameters take no dropout: `config validate` and
    `kdforge train` say so naming model.lora.dropout (exit 2), not a traceback once training starts."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(family_dirs["mixtral"]), "lora": {"r": 4, "dropout": 0.1}},
                                   "io": {"tokenizer_path": str(family_dirs["mixtral"]), "train_shards": [str(data)],
                                          "output_dir": str(tmp_path / "out")},
                                   "train": {"max_steps": 1, "seq_lengths": [SEQ]}}))
    for args in (("config", "validate", str(cfg)), ("train", "--config", str(cfg))):
        r = cli_here(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "model.lora.dropout: PEFT cannot build this adapter" in r.stderr and "dropout: 0" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*"))


# ============================================================================ dense KD

@pytest.mark.parametrize("family", FAMILIES)
def test_dense_kd_student_equal_to_teacher_is_zero_on_every_path(family, family_dirs, data):
    """Same folder loaded twice, eval mode: forward and reverse KL are 0 on the plain, chunked and
    packed paths, and the objective's CE is the model's own loss (its head bias and soft-capping
    included: a zero KD alone would not show a wrong head, it is wrong on both sides)."""
    from transformers import AutoModelForCausalLM

    from kdforge.data.dataset import KDDataset, collate
    from kdforge.train.data_stream import DataStream
    from kdforge.train.objective import DistillObjective

    d = family_dirs[family]
    student, teacher = (AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval() for _ in range(2))
    ds = KDDataset(data, d, SEQ)
    plain = collate([ds[i] for i in range(4)], ds.tokenizer.pad_token_id)
    packed, _ = DataStream(ds, 2, seed=0, packing=True).next_micro_batch(3 * SEQ)  # rows of several examples
    assert (packed["seq_ids"].max(dim=1).values >= 1).all(), "each packed row holds two examples or more"
    with torch.no_grad():
        for kind in ("fkl", "rkl"):
            for name, batch, chunk in (("plain", plain, None), ("chunked", plain, 7), ("packed", packed, None)):
                sums = DistillObjective(student, kind, 2.0, chunk_size=chunk, teacher=teacher)(batch)
                assert abs(float(sums.kd)) < 1e-5 * sums.n_tokens, (kind, name, float(sums.kd))
        sums = DistillObjective(student, "ce", chunk_size=None)(plain)
        own = student(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"],
                      labels=plain["labels"]).loss
    assert float(sums.ce) / sums.n_tokens == pytest.approx(float(own), rel=1e-5)


# ============================================================================ daemon

@pytest.mark.parametrize("family", FAMILIES)
def test_daemon_batch_then_consolidation(family, family_dirs, tmp_path):
    """One LoRA batch (default targets) in the daemon, then a consolidation: the merged base's
    logits equal base + adapter (the daemon checks that and logs the difference), the merged
    weights moved off the base, and training goes on from the new base at the same step."""
    from kdforge.config import from_dict
    from kdforge.daemon.service import Daemon

    base = tmp_path / "base"
    (base / "inbox").mkdir(parents=True)
    write_jsonl(base / "inbox" / "b1.jsonl", synthetic_records(8, seed=3))
    cfg = from_dict({"daemon": {"base_model": str(family_dirs[family]), "save_steps": 5, "poll_interval": 0.2,
                                "settle_seconds": 0.0, "snapshot_time": "23:59", "consolidate_every_batches": 1},
                     "model": {"lora": {"r": 4, "alpha": 8}}, "loss": {"kind": "ce"},
                     "train": {"micro_batch_size": 4, "seq_lengths": [SEQ], "lr": 3e-3, "seed": 0}})
    assert Daemon(base, cfg, handle_signals=False).run(once=True) == 0
    log = "".join(p.read_text() for p in sorted((base / "logs").glob("*.log")))
    assert "ERROR" not in log, log
    assert "Consolidated (every 1 batch(es)): adapter merged into" in log, log
    (ck,) = sorted((base / "current_model").glob("checkpoint-*"))
    state = json.loads((ck / "trainer_state.json").read_text())
    assert ck.name == "checkpoint-2" and state["global_step"] == 2
    merged = base / "bases" / "gen-0001"
    assert json.loads((ck / "adapter_config.json").read_text())["base_model_name_or_path"] == str(merged)
    on_disk = load_file(family_dirs[family] / "model.safetensors"), load_file(merged / "model.safetensors")
    assert set(on_disk[1]) == set(on_disk[0]), "the merged folder has the base's tensors, no adapter ones"
    before, after = _state(family_dirs[family]), _state(merged)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == _adapted_weights(family_dirs[family]), sorted(moved)  # Mixtral: experts and router too


@pytest.mark.parametrize("family", FAMILIES)
def test_consolidation_merge_is_base_plus_adapter(family, family_dirs, tmp_path):
    """The daemon's merge (`consolidate.merge_into_folder`, PEFT's merge_and_unload) on an adapter
    whose every B is random: reloaded from disk (Mixtral's experts go through its unfused on-disk
    layout and back), each adapted weight, Mixtral's fused expert parameters and router included, is
    base + PEFT's delta, every other tensor is the base's bitwise, and the logits are base +
    adapter's within the daemon's own tolerance."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.daemon import consolidate
    from kdforge.model.student import peft_lora_config

    folder = family_dirs[family]
    base = _state(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    peft_model = get_peft_model(model, peft_lora_config(4, 8, 0.0, None)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    layers = _lora_layers(peft_model)
    assert set(layers) == _adapted_weights(folder)
    deltas = {k: m.get_delta_weight("default").detach().clone() for k, m in layers.items()}
    probe = consolidate.probe_ids(model.get_input_embeddings().num_embeddings, "cpu")
    ref = consolidate.logits(peft_model, probe)
    out = consolidate.merge_into_folder(peft_model, tmp_path / "gen-0001", AutoTokenizer.from_pretrained(str(folder)))
    merged = _state(out)
    assert set(merged) == set(base)
    for k in base:
        if k in deltas:
            assert torch.allclose(merged[k], base[k] + deltas[k], atol=1e-6), k
            assert not torch.equal(merged[k], base[k]), k
        else:
            assert torch.equal(merged[k], base[k]), k
    ok, diff = consolidate.same_outputs(ref, consolidate.logits(AutoModelForCausalLM.from_pretrained(str(out)), probe))
    assert ok, f"merged logits differ from base + adapter by {diff:.3g}"


# ============================================================================ serve

@pytest.fixture
def served(family_dirs, request):
    """`kdforge serve`'s own app (loader, engine, routes) on a real port, for one family."""
    import uvicorn

    from kdforge.serve.app import build_app
    from kdforge.serve.engine import Engine
    from kdforge.serve.loader import load_served_model

    sm = load_served_model(family_dirs[request.param], device="cpu")
    engine = Engine(sm.model, sm.tokenizer)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine, sm), host="127.0.0.1", port=port, log_level="warning",
                                        lifespan="off"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", sm, family_dirs[request.param]
    srv.should_exit = True
    t.join(10)
    engine.close()


@pytest.mark.parametrize("served", FAMILIES, indirect=True, ids=FAMILIES)
def test_serve_logprobs_are_the_models_log_softmax(served):
    """Prompt scoring (echo) and generated tokens (the engine's KV cache) both report the
    model's own fp32 log-softmax, computed here by a plain forward of the same folder."""
    from transformers import AutoModelForCausalLM

    url, sm, folder = served
    prompt = sm.tokenizer("What is 12 plus 30? 12 plus 30 is 42. Sort these words: golf alpha echo",
                          add_special_tokens=False)["input_ids"]
    assert len(prompt) > 16  # past Gemma-2's sliding window (16): the cache must drop what the window does
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"model": sm.name, "prompt": prompt, "max_tokens": 4, "temperature": 0, "echo": True,
                         "logprobs": 3, "return_token_ids": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]["token_logprobs"]
    gen = choice["token_ids"]
    assert len(gen) == 4, choice
    ref_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    seq = prompt + list(gen)
    with torch.no_grad():
        ref = torch.log_softmax(ref_model(input_ids=torch.tensor([seq])).logits[0].float(), -1)
    want = [ref[i - 1, seq[i]].item() for i in range(1, len(seq))]
    assert lp[0] is None and len(lp) == len(seq), (len(lp), len(seq))
    assert lp[1:] == pytest.approx(want, abs=1e-4)


# ============================================================================ estimate-memory

MEM_B, MEM_S, MEM_R = 16, 128, 4  # micro-batch x tokens, LoRA rank


@pytest.fixture(scope="module")
def peaks(family_dirs):
    """(family, "full" | "lora") -> peak bytes of a real float32 training step, all twelve cells
    measured in one process, one VmHWM window each (tests/test_memory.py's `measured_peaks`)."""
    from test_memory import measured_peaks

    cells = [(fam, mode) for fam in FAMILIES for mode in ("full", "lora")]
    got = measured_peaks([{"folder": str(family_dirs[fam]), "lora": MEM_R if mode == "lora" else 0,
                           "vocab": 512, "b": MEM_B, "s": MEM_S} for fam, mode in cells])
    return dict(zip(cells, got))


def _estimate_cli(capsys, family_dirs, family, tmp_path, b, s, lora=None):
    from kdforge.cli import main

    cfg = tmp_path / "c.yaml"
    model = {"path": str(family_dirs[family]), **({"lora": lora} if lora else {})}
    cfg.write_text(yaml.safe_dump({"model": model, "train": {"micro_batch_size": b, "seq_lengths": [s],
                                                             "bf16": False, "max_steps": 2}}))
    with pytest.raises(SystemExit) as e:
        main(["estimate-memory", "--config", str(cfg), "--json"])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_memory_within_15_percent_of_measured(family, mode, family_dirs, peaks, tmp_path, capsys):
    """`kdforge estimate-memory --config` on the folder (built from its config.json on fake
    tensors, the trainer's LoRA included) against the peak RSS of a real float32 training step:
    weights, grads, AdamW moments, the activations of a 16 x 128 micro-batch. The parameter
    counts are exact: the model's own, and PEFT's trainable ones under LoRA."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from kdforge.model.student import peft_lora_config

    lora = {"r": MEM_R, "alpha": 2 * MEM_R} if mode == "lora" else None
    rc, out, err = _estimate_cli(capsys, family_dirs, family, tmp_path, MEM_B, MEM_S, lora)
    assert rc == 0, err
    j = json.loads(out)
    real = AutoModelForCausalLM.from_pretrained(str(family_dirs[family]))
    assert j["params"] == sum(p.numel() for p in real.parameters())
    if lora:
        real = get_peft_model(real, peft_lora_config(MEM_R, 2 * MEM_R, 0.0, None))
    assert j["trainable_params"] == sum(p.numel() for p in real.parameters() if p.requires_grad)
    est, measured = j["bytes"]["total"], peaks[(family, mode)]
    msg = f"{family} {mode}: estimated {est / 1e6:.2f} MB, measured {measured / 1e6:.2f} MB"
    print(msg)
    assert abs(est - measured) / measured < 0.15, msg


def test_estimate_memory_bad_model_path_or_targets_exit_2(family_dirs, tmp_path, capsys):
    """A folder without config.json, LoRA targets the model does not have, or LoRA dropout on
    Mixtral's experts: exit 2 naming the field."""
    rc, _, err = _estimate_cli(capsys, {"none": tmp_path}, "none", tmp_path, 4, SEQ)
    assert rc == 2 and f"model.path: no Hugging Face model folder (config.json) at {tmp_path}" in err, err
    rc, _, err = _estimate_cli(capsys, family_dirs, "gpt2", tmp_path, 4, SEQ, {"r": 4, "target_modules": ["q_proj"]})
    assert rc == 2 and "model.lora.target_modules" in err and "q_proj" in err, err
    # PEFT's wrappers of Mixtral's expert parameters take no dropout: the field is named
    rc, _, err = _estimate_cli(capsys, family_dirs, "mixtral", tmp_path, 4, SEQ, {"r": 4, "dropout": 0.1})
    assert rc == 2 and "model.lora.dropout" in err and "lora_dropout != 0" in err, err
