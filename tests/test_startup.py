"""Quick commands start without torch or transformers (issue 24 §8): `--help`, `config validate`,
`status` and `data inspect` ran in 4-9 s because importing torch alone takes seconds here.

Each case runs the real CLI (`kdforge.cli.main`) in a fresh interpreter and then asserts which heavy
packages ended up in sys.modules: behaviour, not time, so it holds on a loaded machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdforge.daemon.status import StatusFile
from kdforge.data.vocab import tokenizer_vocab_size

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "src/kdforge/demo/assets/teacher"
HEAVY = ("torch", "transformers", "peft")

PROBE = """
import json, sys
from kdforge.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"rc": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def run_cli(*args: str, cwd: Path) -> tuple[int, list[str], str]:
    """Run `kdforge ARGS` through kdforge.cli.main in a new interpreter: (exit code, heavy modules
    imported, everything printed before the probe's own line)."""
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                       timeout=120)
    lines = p.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{p.stderr}"
    probe = json.loads(lines[-1])
    return probe["rc"], probe["heavy"], "\n".join(lines[:-1]) + p.stderr


def write_config(tmp: Path, **model) -> Path:
    cfg = tmp / "cfg.yaml"
    body = {"model": {"preset": "toy", **model},
            "io": {"tokenizer_path": str(TOKENIZER), "train_shards": [str(tmp / "kd_ünïcode_漢字.jsonl")],
                   "output_dir": str(tmp / "run")},
            "loss": {"kind": "ce"}, "train": {"max_steps": 10, "seq_lengths": [128]}}
    cfg.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")  # JSON is YAML
    return cfg


def test_help_imports_no_torch(tmp_path):
    rc, heavy, out = run_cli("--help", cwd=tmp_path)
    assert rc == 0 and "preflight" in out
    assert heavy == []


def test_config_validate_imports_no_torch_and_still_checks(tmp_path):
    rc, heavy, out = run_cli("config", "validate", str(write_config(tmp_path)), cwd=tmp_path)
    assert rc == 0, out
    assert "student 64d x 2 layers" in out
    assert heavy == []
    # The checks that read the tokenizer still run: a vocabulary larger than the model's is refused,
    # naming the field, with the tokenizer's real size.
    n = tokenizer_vocab_size(TOKENIZER)  # == transformers' len(): see the tests below
    rc, heavy, out = run_cli("config", "validate", str(write_config(tmp_path, vocab_size=n - 1)), cwd=tmp_path)
    assert rc == 2
    assert f"model.vocab_size: {n - 1} is smaller than the tokenizer's {n} tokens" in out
    assert heavy == []


def test_config_validate_bad_shape_imports_no_torch(tmp_path):
    rc, heavy, out = run_cli("config", "validate", str(write_config(tmp_path, n_kv_heads=3)), cwd=tmp_path)
    assert rc == 2 and "model.n_kv_heads" in out
    assert heavy == []


def test_status_imports_no_torch(tmp_path):
    StatusFile(tmp_path / "status" / "training_status.json").update(status="idle", current_step=7)
    rc, heavy, out = run_cli("status", "--base-dir", str(tmp_path), cwd=tmp_path)
    assert rc == 0, out
    assert heavy == []


@pytest.mark.parametrize("text", ["Sortiere: é 漢字 🙂", "plain"])
def test_data_inspect_imports_no_torch(tmp_path, text):
    f = tmp_path / "d.jsonl"
    rec = {"prompt": text, "teacher_text": text[::-1],
           "metadata": {"tokens": {"prompt": 5, "completion": 4, "total": 9}, "finish_reason": "stop"}}
    f.write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    rc, heavy, out = run_cli("data", "inspect", str(f), cwd=tmp_path)
    assert rc == 0 and text in out
    assert heavy == []


# ----------------------------------------------------------------------------- the vocabulary size
# config validate counts the tokenizer's ids without transformers (data/vocab.py); it must be the
# number transformers gives, or a student too small for its tokenizer passes validation.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def hf_len(folder) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(folder)))


@pytest.mark.parametrize("folder", [TOKENIZER, REPO / "src/kdforge/bench/assets/lang"])
def test_vocab_size_of_shipped_tokenizers_is_transformers_len(folder):
    assert tokenizer_vocab_size(folder) == hf_len(folder)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from kdforge.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = ["Grüße aus Köln, ça va? 漢字かな交じり文 🙂🚀", "sort: d c b a -> a b c d"] * 20
    train_tokenizer(texts, 400, out)
    return out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(added=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Zs"]),
                              min_size=1, max_size=6), max_size=3),
       pad=st.sampled_from(["<|pad|>", "<pad-é>", "[PAD]漢"]))
def test_vocab_size_with_added_and_special_tokens_is_transformers_len(trained, tmp_path_factory, added, pad):
    """Tokens added after training (plain and special, non-ASCII) and a pad token outside the
    vocabulary: the count still equals transformers' len()."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained))
    tok.add_tokens(added)
    tok.add_special_tokens({"pad_token": pad})
    out = tmp_path_factory.mktemp("tok_added")
    tok.save_pretrained(str(out))
    assert tokenizer_vocab_size(out) == hf_len(out)


def test_vocab_size_counts_special_tokens_only_the_config_names(tmp_path):
    """A tokenizer_config.json naming special tokens that tokenizer.json lacks (a hand-edited
    config): transformers adds them, so the count must too (tokenizer.json alone is 2 short)."""
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(TOKENIZER, folder)
    conf = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    conf["pad_token"] = "<nouveau-pad-é>"
    conf["extra_special_tokens"] = [*conf.get("extra_special_tokens", []), "<|工具|>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(conf, ensure_ascii=False), encoding="utf-8")
    assert tokenizer_vocab_size(folder) == hf_len(folder) == hf_len(TOKENIZER) + 2
