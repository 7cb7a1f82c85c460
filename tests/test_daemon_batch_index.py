"""A daemon restarted mid-batch maps the batch's kept token store and parses nothing: the claimed
file is hashed (the same checks), its BatchIndex (bad lines, prompt-only records) read back, and the
dataset, its bad-line accounting and its prompt-only examples are the first load's. Changed bytes
or another on_policy refusal parse again. Real tiny model, real claimed files, non-ASCII lines."""

from __future__ import annotations

import json

import numpy as np

from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import batch, daemon_config, on_policy_config, prompt_rows, teacher_model

from kdforge.config import load_config
from kdforge.daemon import claimed_batch
from kdforge.daemon.claimed_batch import INDEX_NAME, ClaimedBatch
from kdforge.daemon.inbox import claimed_name
from kdforge.daemon.service import Daemon
from kdforge.data import store


def _daemon(base, cfg) -> Daemon:
    d = Daemon(base, load_config([cfg]), handle_signals=False)
    d.paths.make()
    d._setup()
    return d


def _claimed(base, rows: list, lines: list[str]):
    path = base / "inbox" / ".claimed" / claimed_name("0123456789abcdef", "lot — été.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "".join(x + "\n" for x in lines),
                    encoding="utf-8")
    return path


def _seen(ds) -> tuple:
    return ([str(p) for p in ds.problems], ds.prompts_only, len(ds), ds.ce_only_lines,
            [(ds.example(i).prompt_ids, ds.example(i).response_ids, ds.line_of(i)) for i in range(len(ds))])


def _load_twice(d, path):
    parsed, built = claimed_batch.PARSED["n"], store.BUILD_COUNT["n"]
    first, fp1 = ClaimedBatch(d, path).load()
    assert claimed_batch.PARSED["n"] == parsed + 1 and store.BUILD_COUNT["n"] == built + 1
    again, fp2 = ClaimedBatch(d, path).load()
    assert claimed_batch.PARSED["n"] == parsed + 1, "a restart mid-batch must not parse the batch again"
    assert store.BUILD_COUNT["n"] == built + 1 and fp1 == fp2
    assert _seen(again) == _seen(first)
    return first, again


BAD = ['{"prompt": "Ça va ?"', '{"prompt": "東京", "teacher_text": ""}']


def test_a_restart_maps_the_batch_without_parsing_and_counts_bad_lines_the_same(tmp_path, tiny_model_dir):
    base = tmp_path / "training"
    d = _daemon(base, daemon_config(tmp_path / "d.yaml", tiny_model_dir))
    path = _claimed(base, prompt_rows(2) + batch(6, seed=4), BAD)
    first, again = _load_twice(d, path)
    assert len(again) == 6 and len(again.problems) == 4  # 2 prompt-only lines refused (no on_policy) + 2 bad
    assert "lot — été.jsonl:1: a prompt with no answer" in str(again.problems[0])
    assert "lot — été.jsonl:9: invalid JSON" in str(again.problems[2])
    # changed bytes: parsed again, a new store
    path.write_text(path.read_text(encoding="utf-8") + json.dumps(batch(1, seed=9)[0]) + "\n", encoding="utf-8")
    parsed = claimed_batch.PARSED["n"]
    grown, _ = ClaimedBatch(d, path).load()
    assert claimed_batch.PARSED["n"] == parsed + 1 and len(grown) == 7


def test_prompt_only_examples_stay_without_target_after_a_restart(tmp_path, tiny_model_dir, tokenizer_dir):
    base = tmp_path / "training"
    teacher = teacher_model(tmp_path / "teacher", tokenizer_dir)
    d = _daemon(base, on_policy_config(tmp_path / "d.yaml", tiny_model_dir, teacher, fraction=0.5))
    path = _claimed(base, prompt_rows(3) + batch(4, seed=5), BAD[:1])
    first, again = _load_twice(d, path)
    assert len(again) == 7 and len(again.problems) == 1 and not again.prompts_only
    asked = [i for i in range(len(again)) if again.item(i)["labels"].ne(-100).sum() == 0]
    assert asked == [0, 1, 2]
    index = json.loads((base / ".store" / INDEX_NAME).read_text(encoding="utf-8"))
    assert index["prompt_only"] == [0, 1, 2] and not index["refused"]
    # the same bytes under a config that refuses prompt-only lines: parsed again (other records)
    d2 = _daemon(tmp_path / "other", daemon_config(tmp_path / "ce.yaml", tiny_model_dir))
    other = d2.paths.base / "inbox" / ".claimed" / path.name
    other.write_bytes(path.read_bytes())
    (d2.paths.base / ".store").mkdir(parents=True, exist_ok=True)
    (d2.paths.base / ".store" / INDEX_NAME).write_bytes((base / ".store" / INDEX_NAME).read_bytes())
    parsed = claimed_batch.PARSED["n"]
    ce, _ = ClaimedBatch(d2, other).load()
    assert claimed_batch.PARSED["n"] == parsed + 1 and len(ce) == 4 and len(ce.problems) == 4
    assert np.all(np.asarray([ce.kept(i)[1] for i in range(len(ce))]) > 1)


def test_switching_on_policy_off_in_the_same_base_does_not_reuse_the_prompt_only_store(tmp_path, tiny_model_dir,
                                                                                        tokenizer_dir):
    """The same claimed bytes, the same BASE, on_policy switched off between two loads: the batch's
    store is not the one built with its prompt-only examples (they are refused now)."""
    base = tmp_path / "training"
    teacher = teacher_model(tmp_path / "teacher", tokenizer_dir)
    d = _daemon(base, on_policy_config(tmp_path / "d.yaml", tiny_model_dir, teacher, fraction=0.5))
    path = _claimed(base, prompt_rows(3) + batch(4, seed=5), [])
    first, _ = ClaimedBatch(d, path).load()
    assert len(first) == 7
    d2 = _daemon(base, daemon_config(tmp_path / "ce.yaml", tiny_model_dir))
    ce, _ = ClaimedBatch(d2, path).load()
    assert len(ce) == 4 and len(ce.problems) == 3
    assert all(ce.item(i)["labels"].ne(-100).sum() > 0 for i in range(len(ce)))
