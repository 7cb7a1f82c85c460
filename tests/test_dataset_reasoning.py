"""A thinking teacher's records in the training data (issue 23 item 2, SPEC io.reasoning): under
`think` the student learns `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`, under `drop` the answer alone;
the teacher's top-k rows stay on the answer's tokens (its logprobs never covered the thinking), and
the two modes are two stores, never one reused for the other. Real tokenizer, real store, real train."""

from __future__ import annotations

import pytest
from conftest import cli_here, write_jsonl
from test_dataset import _topk_record

from kdforge.data.dataset import IGNORE, KDDataset

THINK = "Étape 1: 考える, puis 🤔 vérifier."


def _rows(tok):
    rec = _topk_record(tok, "alpha echo")
    rec["teacher_reasoning"] = THINK
    return [rec, {"prompt": "What is 2 plus 3?", "teacher_text": "2 plus 3 is 5.", "teacher_reasoning": "2+3=5"}]


def _response(ds, i):
    x = ds[i]
    resp = (x["labels"] != IGNORE).nonzero().flatten()
    return x, resp, ds.tokenizer.decode(x["input_ids"][resp[:-1]])  # the response without its EOS


@pytest.mark.parametrize("topk", [False, True])
def test_think_trains_the_thinking_before_the_answer_and_drop_the_answer(tmp_path, tokenizer_dir, topk):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = write_jsonl(tmp_path / "think.jsonl", _rows(tok)[:1 if topk else 2])
    think = KDDataset(data, tokenizer_dir, 256, with_topk=topk, settings={"reasoning": "think"}, topk_optional=True)
    drop = KDDataset(data, tokenizer_dir, 256, with_topk=topk, settings={"reasoning": "drop"}, topk_optional=True)
    assert think.store_info.path != drop.store_info.path  # the mode is in the store's key
    x, resp, text = _response(think, 0)
    assert text == f"<think>\n{THINK}\n</think>\n\nalpha echo"
    assert _response(drop, 0)[2] == "alpha echo"
    if topk:  # no teacher row on the thinking; the answer's rows are the teacher's, token for token
        n_answer = len(tok("alpha echo", add_special_tokens=False)["input_ids"])
        rows = x["topk_ids"][resp[:-1]]
        assert (rows[:-n_answer] == -1).all()
        assert (rows[-n_answer:, 0] == x["input_ids"][resp[:-1]][-n_answer:]).all()
        assert not think.misaligned and not drop.misaligned
    else:
        assert _response(think, 1)[2] == "<think>\n2+3=5\n</think>\n\n2 plus 3 is 5."


def test_train_reads_io_reasoning(tmp_path, tokenizer_dir):
    """kdforge train builds its store with the configured io.reasoning (drop here: not the default)."""
    import json
    import re

    import yaml
    from train_helpers import train_config
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    data = write_jsonl(tmp_path / "d.jsonl", _rows(tok) * 4)
    path = train_config(tmp_path, tokenizer_dir, data, max_steps=1, save_steps=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["io"]["reasoning"] = "drop"
    path.write_text(yaml.safe_dump(cfg))
    r = cli_here("train", "--config", path)
    assert r.returncode == 0, r.stderr
    store = re.search(r"data: token store (\S+) built", r.stdout + r.stderr).group(1)
    assert json.loads((tmp_path / store / "meta.json").read_text())["settings"]["reasoning"] == "drop"
    think = KDDataset(data, tokenizer_dir, 256, settings={"reasoning": "think"})
    assert str(think.store_info.path) != store


def test_the_daemon_reads_io_reasoning(tmp_path, tokenizer_dir, tiny_model_dir):
    """A daemon batch goes through a store built with the configured io.reasoning (and the loss's
    cross_tokenizer setting), as kdforge train's: drop here, not the default."""
    import json

    from daemon_helpers import daemon_config, drop as drop_file, run_in_process
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"
    (base / "inbox").mkdir(parents=True)
    cfg = daemon_config(tmp_path / "daemon.yaml", tiny_model_dir, io={"reasoning": "drop"}, save_steps=100)
    drop_file(base, "b1.jsonl", _rows(tok) * 2)
    state = run_in_process(base, cfg)
    assert state.global_step > 0
    (meta,) = [json.loads(p.read_text()) for p in (base / ".store").rglob("meta.json")]
    assert meta["settings"]["reasoning"] == "drop" and meta["settings"]["alignment"] == {"cross_tokenizer": "auto"}
