"""checkpoint_layout.py is the one place checkpoint names live: what a save writes is what
`kdforge verify` and resume require (full and LoRA), the module needs no torch, and every reader of
an output dir (verify, the model-folder resolver) sees the same folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.daemon import verify
from kdforge.daemon.layout import Layout
from kdforge.errors import UsageError
from kdforge.model.folder import resolve_model_folder
from kdforge.train import checkpoint as ckpt
from kdforge import checkpoint_layout as layout

COMPLETE_CHECK = "each checkpoint has weights, optimizer.pt, scheduler.pt, trainer_state.json"


def test_the_layout_and_its_torch_free_readers_import_no_torch():
    code = ("import sys\n"
            "import kdforge.checkpoint_layout, kdforge.daemon.verify, kdforge.model.folder\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print(len(loaded), loaded[:3])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.startswith("0 "), out.stdout


@pytest.fixture(scope="module", params=["full", "lora"])
def saved(request, tiny_model_dir, tmp_path_factory):
    """BASE/current_model/checkpoint-3 as save_checkpoint writes it, for a full model or a LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, trust_remote_code=False)
    if request.param == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    base = tmp_path_factory.mktemp(f"verify_{request.param}")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir), trust_remote_code=False)
    path = ckpt.save_checkpoint(Layout(base).checkpoints, ckpt.TrainState(global_step=3), model, opt, sched,
                                tokenizer=tok, config={"daemon": {"save_total_limit": 5}})
    weights = layout.ADAPTER_WEIGHTS if request.param == "lora" else layout.MODEL_WEIGHTS
    return base, path, weights


def _complete_check(base: Path) -> verify.Check:
    checks, _ = verify.checkpoint_checks(Layout(base), [])
    return next(c for c in checks if c.name == COMPLETE_CHECK)


def test_verify_requires_exactly_what_a_save_writes(saved):
    base, path, weights = saved
    written = {p.name for p in path.iterdir()}
    assert set(layout.REQUIRED) | {weights} <= written
    assert layout.missing_files(path) == [] and layout.is_complete(path)
    assert _complete_check(base).ok, _complete_check(base).detail
    assert layout.latest_checkpoint(path.parent) == path
    # Each required file, taken away, is named by verify and makes the folder no checkpoint for resume.
    for name in (weights, *layout.REQUIRED):
        aside = path.parent / f"aside-{name}"
        (path / name).rename(aside)
        try:
            check = _complete_check(base)
            assert not check.ok
            named = " or ".join(layout.WEIGHT_FILES) if name == weights else name
            assert check.detail == f"{path.name} lacks {named}"
            assert layout.latest_checkpoint(path.parent) is None
        finally:
            aside.rename(path / name)
    assert _complete_check(base).ok


def test_what_a_save_writes_reads_back_through_the_layout(saved):
    _, path, _ = saved
    assert layout.checkpoint_step(path) == 3 and path.name == layout.checkpoint_name(3)
    assert layout.read_state(path).global_step == 3
    assert not list(path.parent.glob(layout.TMP_GLOB)) and not list(path.parent.glob(layout.REPLACED_GLOB))


STEPS = st.integers(min_value=0, max_value=10**12)
TAGS = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
               min_size=1, max_size=12)


@given(step=STEPS, tag=TAGS)
def test_every_name_carries_its_step(step, tag):
    assert layout.checkpoint_step(layout.checkpoint_name(step)) == step
    assert layout.replaced_step(layout.replaced_name(step, tag)) == step
    for hidden in (layout.temp_name(step, tag), layout.replaced_name(step, tag), layout.trash_name(step, tag)):
        assert layout.checkpoint_step(hidden) is None  # never read as a checkpoint of its own
    assert layout.replaced_step(layout.temp_name(step, tag)) is None


JUNK = st.sampled_from(["checkpoint-", "checkpoint-x", "checkpoint-²", "checkpoint-1.5", "checkpoint--3",
                        "Checkpoint-4", "checkpoint-5 ", "checkpoint-６a", "点检-7", "checkpoint-🎉", "café",
                        ".tmp-checkpoint-8-1-2", ".replaced-checkpoint-9-1-2", ".trash-checkpoint-10-1"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.sets(st.integers(min_value=0, max_value=10**6), max_size=5),
       complete=st.data(), junk=st.sets(JUNK, max_size=5))
def test_readers_see_the_same_checkpoint_folders(tmp_path_factory, steps, complete, junk):
    """verify, list_checkpoints and the model-folder hint agree on what a checkpoint folder is,
    whatever else lies beside them (non-ASCII names, digits that int() refuses, hidden folders)."""
    out = tmp_path_factory.mktemp("out")
    whole = set()
    for step in steps:
        folder = out / layout.checkpoint_name(step)
        folder.mkdir()
        if complete.draw(st.booleans()):
            whole.add(step)
            for name in (*layout.REQUIRED, layout.MODEL_WEIGHTS):
                (folder / name).write_text("{}")
    for name in junk:
        (out / name).mkdir()
    assert [layout.checkpoint_step(p) for p in layout.checkpoint_folders(out)] == sorted(steps)
    assert [layout.checkpoint_step(p) for p in layout.list_checkpoints(out)] == sorted(whole)
    with pytest.raises(UsageError) as refused:
        resolve_model_folder(out)
    hint = f"e.g. `kdforge eval {out / layout.checkpoint_name(max(steps))}`" if steps else "holds checkpoints"
    assert (hint in str(refused.value)) == bool(steps)
    shutil.rmtree(out)
