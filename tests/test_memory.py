"""`kdforge estimate-memory`: the arithmetic, the activation count against autograd, and the
estimate against memory measured in a real training step."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import cli_env, cli_here
from kdforge.model import PRESETS, ModelCfg
from kdforge.model.memory import ALL_LINEAR, GB, LoraSetup, Setup, alternatives, estimate, lora_params

# The seed's toy model (its memory check builds exactly this).
SEED_TOY = ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=32000)


# ----------------------------------------------------------------------------- arithmetic

def test_9b_full_bf16_adamw_matches_the_seeds_72_gb():
    est = estimate(PRESETS["9b"], Setup(dtype="bfloat16"))
    n = PRESETS["9b"].num_params()
    assert est.params == est.trainable == n
    assert (est.weights, est.gradients, est.optimizer, est.master) == (2 * n, 2 * n, 2 * 2 * n, 0)
    static = est.weights + est.gradients + est.optimizer
    assert abs(static / GB - 72) / 72 < 0.02  # the seed: 18 + 18 + 36 = ~72 GB "minimum"
    assert abs(est.weights / GB - 18) / 18 < 0.02
    assert est.total == static + est.activations and est.activations > 0


def test_alternative_rows_fp32_moments_and_mixed_precision():
    rows = dict(alternatives(PRESETS["9b"], Setup(dtype="bfloat16")))
    base, fp32m = rows["this setup"], rows["AdamW moments in fp32"]
    assert fp32m.optimizer == 2 * base.optimizer
    mixed = next(e for label, e in rows.items() if label.startswith("mixed precision"))
    n = mixed.params
    # bf16 weights 2 + fp32 master 4 + bf16 grads 2 + fp32 moments 8 = 16 B/param (ZeRO's accounting)
    assert mixed.weights + mixed.master + mixed.gradients + mixed.optimizer == 16 * n
    f32 = rows["float32 throughout"]
    assert f32.weights == 2 * base.weights and f32.optimizer == 2 * base.optimizer


def test_checkpointing_and_lora_shrink_what_they_should():
    cfg, st = PRESETS["1b"], Setup(micro_batch=4, seq_len=2048)
    full, gc = estimate(cfg, st), estimate(cfg, Setup(micro_batch=4, seq_len=2048, gradient_checkpointing=True))
    assert gc.activations < full.activations / 3
    assert (gc.weights, gc.gradients, gc.optimizer) == (full.weights, full.gradients, full.optimizer)
    lo = estimate(cfg, Setup(micro_batch=4, seq_len=2048, lora=LoraSetup(r=8)))
    assert lo.trainable < full.trainable / 50
    assert lo.gradients == 4 * lo.trainable and lo.optimizer == 8 * lo.trainable  # fp32 adapters
    # activations scale with tokens (the static part does not)
    double = estimate(cfg, Setup(micro_batch=8, seq_len=2048))
    assert double.activations == 2 * full.activations and double.weights == full.weights


@pytest.mark.parametrize("targets", [ALL_LINEAR, ("q_proj", "v_proj"), ("q_proj", "lm_head")])
def test_lora_trainable_count_matches_peft(targets):
    import torch
    from peft import LoraConfig, get_peft_model

    from kdforge.model import build_student

    cfg = ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=300, ffn_dim=96)
    with torch.device("meta"):
        model = get_peft_model(build_student(cfg), LoraConfig(r=4, target_modules=list(targets)))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(cfg.resolved(), LoraSetup(r=4, target_modules=targets)) == real


# ----------------------------------------------------------------------------- activations vs autograd

def _saved_bytes_per_token(cfg, st: Setup) -> float:
    """Bytes autograd holds after a forward, counted storage by storage (parameters excluded)."""
    import torch

    from kdforge.model import build_student

    torch.manual_seed(0)
    model = build_student(cfg, attn_implementation=st.attention).to(getattr(torch, st.dtype)).train()
    if st.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if st.lora:
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=st.lora.r, lora_dropout=st.lora.dropout,
                                                 target_modules=list(st.lora.target_modules)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            storages[key] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (st.micro_batch, st.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(storages.values()) / (st.micro_batch * st.seq_len)


@pytest.mark.parametrize("st", [
    Setup(dtype="float32", attention="sdpa"),
    Setup(dtype="bfloat16", attention="sdpa"),
    Setup(dtype="bfloat16", attention="eager"),
    Setup(dtype="float32", attention="sdpa", gradient_checkpointing=True),
    Setup(dtype="float32", attention="sdpa", lora=LoraSetup(r=8)),
    Setup(dtype="bfloat16", attention="eager", lora=LoraSetup(r=8, dropout=0.1)),
    Setup(dtype="bfloat16", attention="sdpa", lora=LoraSetup(r=4, target_modules=("q_proj", "down_proj"))),
], ids=lambda s: f"{s.dtype}-{s.attention}{'-gc' if s.gradient_checkpointing else ''}{'-lora' if s.lora else ''}")
def test_saved_tensor_count_matches_autograd(st):
    """The per-layer formula counts exactly what autograd saves (cos/sin tables aside)."""
    from dataclasses import replace

    cfg = ModelCfg(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, vocab_size=1000, ffn_dim=192)
    st = replace(st, micro_batch=2, seq_len=64)
    measured = _saved_bytes_per_token(cfg, st)
    predicted = estimate(cfg, st).saved_per_token
    assert abs(predicted - measured) / measured < 0.02, (predicted, measured)


# ----------------------------------------------------------------------------- estimate vs measured

MEASURE = textwrap.dedent("""
    import gc, json, resource, sys
    import torch

    def maxrss():  # peak resident set since the last reset below (VmHWM), bytes
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def rss():  # resident set now
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def build(cell):  # a kdforge student from numbers, or a Hugging Face folder (with the trainer's LoRA)
        if "cfg" in cell:
            from kdforge.model import ModelCfg, build_student
            model = build_student(ModelCfg(**cell["cfg"]))
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(cell["folder"])
        if cell.get("lora"):
            from peft import get_peft_model
            from kdforge.model.student import peft_lora_config
            model = get_peft_model(model, peft_lora_config(cell["lora"], 2 * cell["lora"], 0.0, None))
        model.train()
        if cell.get("gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def step(model, opt, ids):
        out = model(input_ids=ids, labels=ids)  # kept: the logits stay alive through backward
        out.loss.backward(); opt.step()

    peaks = []
    for cell in json.loads(sys.argv[1]):
        torch.manual_seed(0)
        # Warm-up on a throwaway copy: lazy imports, kernels and autograd threads load now,
        # not inside the measured window.
        w = build(cell); ids = torch.randint(0, 64, (1, 8))
        step(w, torch.optim.AdamW([p for p in w.parameters() if p.requires_grad]), ids); del w, ids; gc.collect()
        big = torch.randint(0, cell["vocab"], (cell["b"], cell["s"]))
        small = big[:1, :8].clone()
        before = rss()
        # Reset the peak to now: what imports, the warm-up and earlier cells peaked at stays outside
        # the window (ru_maxrss cannot be reset, and a warm-up peak above the window's made the test flaky).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        model = build(cell)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        # step 1 on 8 tokens: gradients and AdamW moments now exist; keep the gradients (grad accumulation)
        step(model, opt, small); opt.zero_grad(set_to_none=False)
        # step 2, the measured one: forward + backward + AdamW step on the full micro-batch
        step(model, opt, big)
        peaks.append(maxrss() - before)
        del model, opt, big, small; gc.collect()
    print(json.dumps(peaks))
""")


def measured_peaks(cells: list[dict]) -> list[int]:
    """Peak training memory of each cell, bytes, measured in one fresh float32 CPU process, one
    window per cell (VmHWM reset when it opens): build the model (a kdforge student: `cfg`; a
    Hugging Face folder: `folder`; LoRA of rank `lora` with the trainer's targets) and AdamW,
    one 8-token step that creates the gradients and moments, then one full forward + backward +
    AdamW step on a `b` x `s` micro-batch with those gradients kept (grad accumulation). That
    peak holds weights + gradients + moments + the activations of the big micro-batch: what
    `estimate(...).total` predicts. MALLOC_MMAP_THRESHOLD_=65536 makes glibc give every freed
    tensor (>64 KiB) back to the OS, so RSS follows live tensors rather than the allocator's
    retained heap (with glibc's default, freed mid-sized activations stay resident: allocator
    slack, which the estimate leaves out)."""
    p = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(cells)], capture_output=True, text=True,
                       timeout=300, env=cli_env(MALLOC_MMAP_THRESHOLD_=65536))
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [
    # the seed's toy at vocab 32000: the logits / cross-entropy head dominates
    dict(cfg=SEED_TOY, b=4, s=256, gc=False),
    # a small-vocab model where the decoder layers dominate, with gradient checkpointing
    pytest.param(dict(cfg=ModelCfg(d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, d_head=32,
                                   vocab_size=512, ffn_dim=704), b=4, s=512, gc=True), marks=pytest.mark.slow),
], ids=["seed-toy", "layers-gc"])
def test_estimate_matches_measured_peak_memory(case):
    """The Llama formula against the peak of a real training step (see `measured_peaks`)."""
    cfg = case["cfg"]
    cell = {"cfg": {k: getattr(cfg, k) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head",
                                                 "vocab_size", "ffn_dim")},
            "vocab": cfg.vocab_size, "b": case["b"], "s": case["s"], "gc": case["gc"]}
    (measured,) = measured_peaks([cell])
    est = estimate(cfg, Setup(micro_batch=case["b"], seq_len=case["s"], dtype="float32",
                              gradient_checkpointing=case["gc"]))
    msg = (f"measured {measured / 1e6:.1f} MB, estimated {est.total / 1e6:.1f} MB "
           f"({', '.join(f'{k} {v / 1e6:.1f}' for k, v in est.breakdown().items())})")
    print(msg)
    assert abs(est.total - measured) / measured < 0.30, msg


# ----------------------------------------------------------------------------- CLI

def test_cli_9b_says_how_the_number_was_reached():
    # the seed's arithmetic is for bf16 weights (a GPU); without --dtype this machine's dtype leads
    p = cli_here("estimate-memory", "--preset", "9b", "--dtype", "bfloat16", check=True)
    out = p.stdout
    est = estimate(PRESETS["9b"], Setup())
    n = f"{est.params:,}"
    assert f"{n} params x 2 B (bfloat16)" in out
    assert f"{n} trainable x 2 moments x 2 B (bfloat16)" in out
    static = (est.weights + est.gradients + est.optimizer) / GB
    assert f"{static:.2f} GB" in out and "~72GB" in out
    assert "AdamW moments in fp32" in out and "fp32 master" in out
    assert f"{est.total / GB:.2f} GB" in out
    assert "each layer" in out and "CE backward" in out  # the activation formula is shown


def test_cli_leads_with_what_this_machine_trains(capsys):
    """Issue 24 §6: without --dtype the estimate is of the setup `kdforge train` runs here (fp32 on
    a CPU machine, bf16 on a GPU), the figure preflight's memory item uses, and it comes first."""
    import torch

    from conftest import REPO
    from kdforge.config import load_config
    from kdforge.data.vocab import tokenizer_vocab_size
    from kdforge.model.memory import MB
    from kdforge.preflight.machine import check_memory

    small = REPO / "configs" / "small.yaml"
    here = "bfloat16" if torch.cuda.is_available() else "float32"
    rc, out, err = cli_inprocess(capsys, "estimate-memory", "--config", small, "--json")
    assert rc == 0, err
    j = json.loads(out)
    assert j["setup"]["dtype"] == here
    cfg = load_config([small])
    item, _ = check_memory(cfg, tokenizer_vocab_size(cfg.io.tokenizer_path))
    assert item.numbers["estimate_bytes"] == j["bytes"]["total"]
    rc, out, err = cli_inprocess(capsys, "estimate-memory", "--config", small)
    assert rc == 0, err
    first = out.splitlines()[0]
    assert first.startswith("on this machine") and here in first, out
    total = j["bytes"]["total"]
    assert f"{total / MB:.2f} MB" in first or f"{total / GB:.2f} GB" in first, out
    # a preset alone: the same machine default; --dtype still wins
    rc, out, err = cli_inprocess(capsys, "estimate-memory", "--preset", "toy", "--vocab-size", "300", "--json")
    assert json.loads(out)["setup"]["dtype"] == here
    rc, out, err = cli_inprocess(capsys, "estimate-memory", "--config", small, "--dtype", "bfloat16", "--json")
    assert json.loads(out)["setup"]["dtype"] == "bfloat16"


def cli_inprocess(capsys, *args) -> tuple[int, str, str]:
    """The real entry point, in-process (torch is imported already): (exit code, stdout, stderr)."""
    from kdforge.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_json_and_config(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "model": {"preset": "toy", "vocab_size": 1000, "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "train": {"micro_batch_size": 3, "seq_lengths": [128, 256], "gradient_checkpointing": True,
                  "max_steps": 10, "bf16": False},
    }))
    rc, out, err = cli_inprocess(capsys, "estimate-memory", "--config", cfg_file, "--json")
    assert rc == 0, err
    j = json.loads(out)
    st = j["setup"]
    assert (st["micro_batch"], st["seq_len"], st["dtype"], st["gradient_checkpointing"]) == (3, 256, "float32", True)
    assert st["lora"]["r"] == 4 and j["model"]["vocab_size"] == 1000
    b = j["bytes"]
    assert b["total"] == sum(v for k, v in b.items() if k != "total")
    # flags override the config
    rc, out, err = cli_inprocess(capsys, "estimate-memory", "--config", cfg_file, "--json", "--no-lora",
                                 "--seq-len", "64", "--dtype", "bfloat16")
    assert rc == 0, err
    st = json.loads(out)["setup"]
    assert (st["lora"], st["seq_len"], st["dtype"]) == (None, 64, "bfloat16")


def test_cli_open_vocab_from_tokenizer(tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    rc, out, err = cli_inprocess(capsys, "estimate-memory", "--preset", "toy", "--tokenizer", tokenizer_dir, "--json")
    assert rc == 0, err
    j = json.loads(out)
    n_tok = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    assert j["model"]["vocab_size"] == n_tok
    assert j["params"] == PRESETS["toy"].num_params(n_tok)


def test_cli_config_with_model_path_reads_its_config_json(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Read once: validated, then traced for every comparison row from the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    loads = []
    real_load = AutoConfig.from_pretrained.__func__
    monkeypatch.setattr(AutoConfig, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a[0]) or real_load(cls, *a, **k)))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir)}, "train": {"max_steps": 1}}))
    rc, out, err = cli_inprocess(capsys, "estimate-memory", "--config", cfg_file, "--json")
    assert rc == 0, err
    assert loads == [str(tiny_model_dir)]
    monkeypatch.undo()
    real = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).parameters())
    assert json.loads(out)["params"] == real


@pytest.mark.parametrize("args,needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    ([], "give --preset"),
    (["--preset", "toy", "--config", "x.yaml"], "not both"),
    (["--preset", "9b", "--dtype", "fp8"], "--dtype"),
    (["--preset", "9b", "--micro-batch", "0"], "--micro-batch"),
    (["--preset", "toy", "--tokenizer", "/nonexistent/tok"], "tokenizer folder not found: /nonexistent/tok"),
    (["--config", "/nonexistent/c.yaml"], "/nonexistent/c.yaml"),
])
def test_cli_bad_usage_exits_2(args, needle, capsys):
    rc, _, err = cli_inprocess(capsys, "estimate-memory", *args)
    assert rc == 2, err
    assert needle in err
