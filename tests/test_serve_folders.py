"""`kdforge serve` resolves model folders as `kdforge eval` does (kdforge.model.folder): a daemon's
LoRA checkpoint is served on the base its trainer_state.json names, not the one its adapter config
names; and chat prompts render as training renders them (data/dataset.py `prompt_text`)."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from conftest import cli_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdforge.serve import launch

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["café crème, naïve", "東京で寿司を食べる", "emoji 🎉👩‍💻 and ZWJ", "", " \n\t "])


@pytest.fixture(scope="module")
def daemon_checkpoint(tiny_model_dir, tmp_path_factory):
    """BASE/current_model/checkpoint-7 as a LoRA daemon writes it (save_checkpoint, typed daemon
    record naming BASE/bases/gen-1), after a consolidation: the base its adapter config names is gone.
    Returns (checkpoint, the PEFT model in-process, its tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.train.checkpoint import TrainState, save_checkpoint

    root = tmp_path_factory.mktemp("daemon_folders")
    trained_on = root / "base"  # what the adapter's config will name
    shutil.copytree(tiny_model_dir, trained_on)
    daemon = root / "daemon"
    shutil.copytree(tiny_model_dir, daemon / "bases" / "gen-1")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(trained_on), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    extra = {"daemon": {"base_model": "bases/gen-1", "generation": 1}}
    ckpt = save_checkpoint(daemon / "current_model", TrainState(global_step=7, extra=extra), peft, opt, sched,
                           tokenizer=tok)
    shutil.rmtree(trained_on)
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(trained_on)
    return ckpt, peft.eval(), tok


def test_serve_and_eval_resolve_a_daemon_checkpoint_alike(daemon_checkpoint):
    from kdforge.eval.model_dir import resolve_model_dir
    from kdforge.serve.loader import resolve_folders

    ckpt, _, _ = daemon_checkpoint
    served, evaluated = resolve_folders(ckpt), resolve_model_dir(ckpt)
    want = (ckpt.parent.parent / "bases" / "gen-1").resolve()
    assert served == evaluated
    assert served.base == want and served.adapter == ckpt and served.tokenizer_dir == ckpt


def test_kdforge_serve_answers_on_a_daemons_lora_checkpoint(daemon_checkpoint):
    """The server starts on BASE/current_model/checkpoint-N and its prompt logprobs are the PEFT
    model's own (the adapter merged onto the daemon's base), for a non-ASCII prompt."""
    ckpt, peft, tok = daemon_checkpoint
    prompt = "Grüße aus 東京 🎉: what is 2 plus 2?"
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        want = torch.log_softmax(peft(torch.tensor([ids])).logits[0].float(), -1)
    want = [want[i - 1, ids[i]].item() for i in range(1, len(ids))]
    handle = launch(ckpt, env=cli_env())
    try:
        r = httpx.post(handle.base_url + "/completions", timeout=60, json={
            "model": "checkpoint-7", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 0,
            "temperature": 0})
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(ids)]
    finally:
        assert handle.stop() == 0
    assert got == pytest.approx(want, abs=1e-3)


def _chat_state(tiny_model_dir, tmp_path, with_template: bool):
    from kdforge.serve.loader import load_served_model
    from kdforge.serve.state import ServeState

    folder = tiny_model_dir
    if not with_template:
        folder = tmp_path / "no_template"
        shutil.copytree(tiny_model_dir, folder)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
        for extra in folder.glob("chat_template.*"):
            extra.unlink()
    return ServeState(None, load_served_model(folder, device="cpu"), None)


def test_chat_prompt_is_the_training_rendering_with_a_template(tiny_model_dir, tmp_path):
    """With a template, serve's chat prompt ids are prompt_text's, which are the template's with the
    generation prompt (what serve rendered on its own before), for any text."""
    from kdforge.data.dataset import prompt_text

    state = _chat_state(tiny_model_dir, tmp_path, with_template=True)
    tok = state.tokenizer
    assert tok.chat_template

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), TEXT), min_size=1, max_size=4))
    def check(turns):
        messages = [{"role": role, "content": text} for role, text in turns]
        own = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt_text(tok, messages) == own
        assert state.chat_ids(messages) == tok(own, add_special_tokens=False)["input_ids"]

    check()


def test_chat_without_a_template_is_refused_not_rendered_by_the_fallback(tiny_model_dir, tmp_path):
    """prompt_text has a plain fallback for template-less tokenizers (training uses it); a server
    refuses chat instead (400 naming the field and /v1/completions), on both routes that render."""
    from kdforge.serve.api_error import APIError
    from kdforge.serve.routes import chat_answer
    from kdforge.serve.schemas import ChatCompletionRequest

    state = _chat_state(tiny_model_dir, tmp_path, with_template=False)
    assert not state.tokenizer.chat_template
    messages = [{"role": "user", "content": "¿Qué tal? 你好 👋"}]
    with pytest.raises(APIError) as e:
        state.chat_ids(messages)  # what POST /tokenize with messages renders
    assert e.value.status == 400 and e.value.param == "messages"
    req = ChatCompletionRequest(model=state.served.name, messages=messages, max_tokens=2)
    with pytest.raises(APIError) as e:
        import asyncio

        asyncio.run(chat_answer(state, req, None))
    assert e.value.status == 400 and e.value.param == "messages" and "/v1/completions" in e.value.message
