"""The README runs as written (issue 24): every `kdforge ...` line of its code blocks names a real
command with real flags (parsed by the CLI's own parser, so a renamed flag or a bad value fails here,
not in a newcomer's shell), the configs it names validate, "Your first hour" comes right after
"Commands" and the data it generates comes before the section that trains on it, and the
walkthrough's prompt one-liners run and write what the next commands read."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml
from conftest import REPO, cli_env, run_cli

README = REPO / "README.md"


def readme() -> str:
    return README.read_text(encoding="utf-8")


def sections(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, re.M)


def section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S)


def shell_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, `a && b` split."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: list[str] = []
        for w in words + ["&&"]:
            if w in ("&&", "||", ";", "|", "&"):
                if cmd:
                    out.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    return out


def kdforge_argv(cmd: list[str]) -> list[str] | None:
    """The arguments after `kdforge` (also `python -m kdforge`, `torchrun ... -m kdforge`), else None."""
    if cmd and cmd[0] == "kdforge":
        return cmd[1:]
    for i in range(len(cmd) - 1):
        if cmd[i] == "-m" and cmd[i + 1] == "kdforge":
            return cmd[i + 2:]
    return None


def readme_kdforge_lines() -> list[list[str]]:
    return [a for b in bash_blocks(readme()) for c in shell_lines(b) if (a := kdforge_argv(c)) is not None]


def test_the_readme_commands_are_found():
    lines = readme_kdforge_lines()
    assert len(lines) >= 20, lines  # the parser found the README's commands, not nothing
    assert {a[0] for a in lines} >= {"serve", "generate", "data", "tokenizer", "train", "eval", "daemon",
                                     "status", "verify", "preflight", "demo"}


def resolve(argv: list[str]):
    """(click command, its name path, the remaining args) for a kdforge argv."""
    import typer.main

    from kdforge.cli import app

    cmd, names, rest = typer.main.get_command(app), ["kdforge"], list(argv)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        assert sub is not None, f"`{' '.join(names)} {rest[0]}`: no such command (README line: kdforge {shlex.join(argv)})"
        cmd, names, rest = sub, names + [rest.pop(0)], rest
    return cmd, names, rest


@pytest.mark.parametrize("argv", readme_kdforge_lines(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_kdforge_line_parses(argv):
    cmd, names, rest = resolve(argv)
    assert not hasattr(cmd, "commands"), f"`{' '.join(names)}` needs a subcommand"
    flags = {o for p in cmd.params for o in p.opts + p.secondary_opts if o.startswith("-")}
    for w in rest:
        if w.startswith("--"):
            assert w.split("=", 1)[0] in flags, f"`{' '.join(names)}` has no flag {w} (has {sorted(flags)})"
    # the CLI's own parser: types, choices, required options and overrides (only where accepted)
    ctx = cmd.make_context(" ".join(names), list(rest))
    ctx.close()


def test_the_parser_check_catches_drift():
    """The check above can fail: a flag the command lacks, a value of the wrong type, an
    override given to a command that takes none, an unknown command."""
    with pytest.raises(AssertionError, match="no such command"):
        resolve(["tokeniser", "train"])
    cmd, names, _ = resolve(["serve", "m", "--port", "eight"])
    with pytest.raises(Exception):
        cmd.make_context("serve", ["m", "--port", "eight"])
    cmd, _, _ = resolve(["data", "inspect"])
    with pytest.raises(Exception):
        cmd.make_context("inspect", ["f.jsonl", "-n", "3", "train.lr=1"])
    cmd, _, _ = resolve(["train"])
    flags = {o for p in cmd.params for o in p.opts}
    assert "--max-steps" not in flags and "--config" in flags


def test_first_hour_comes_after_commands_and_data_before_training():
    names = sections(readme())
    assert names[names.index("Commands") + 1] == "Your first hour"
    assert names.index("Generating a KD dataset") < names.index("Training")


def test_every_config_the_readme_names_exists_and_validates():
    text = readme()
    named = sorted(set(re.findall(r"configs/[\w.-]+\.yaml", text)))
    assert "configs/first.yaml" in named and "configs/small.yaml" in named
    for c in named:
        assert (REPO / c).is_file(), f"README names {c}, which does not exist"
    for c in named:  # one at a time: several files given together are merged into one config
        p = run_cli("config", "validate", c, cwd=REPO, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr


def test_first_hour_produces_what_it_reads_before_reading_it():
    """Each file a walkthrough command reads under data/ or runs/ was written by an earlier line
    (the issue: Training read data/kd_mix.jsonl before the README said how to make it)."""
    block = bash_blocks(section(readme(), "Your first hour"))[0]
    made: set[str] = set()
    for cmd in shell_lines(block):
        line = " ".join(cmd)
        outs = set(re.findall(r"(?:--out|>)\s*((?:data|runs)/[\w./-]+)", line))
        ins = set(re.findall(r"\b((?:data|runs)/[\w.-]+(?:/[\w.-]+)*)", line)) - outs
        if m := re.search(r"--config (configs/\S+)", line):  # a config reads its shards, writes its output dir
            cfg = yaml.safe_load((REPO / m.group(1)).read_text())
            ins |= set(cfg["io"]["train_shards"]) | set(cfg["io"].get("eval_shards") or [])
            outs.add(cfg["io"]["output_dir"])
        for path in ins:
            assert any(path == m or path.startswith(m + "/") for m in made), f"`{line}` reads {path} first"
        made |= outs
    assert {"data/kd_mix.jsonl", "data/heldout.jsonl", "runs/tok", "runs/first"} <= made, made
    # the checkpoint eval reads is one the config's steps save
    cfg = yaml.safe_load((REPO / "configs" / "first.yaml").read_text())["train"]
    step = int(re.search(r"kdforge eval runs/first/checkpoint-(\d+)", block).group(1))
    assert step <= cfg["max_steps"] and (step % cfg["save_steps"] == 0 or step == cfg["max_steps"])


def test_first_hour_prompt_lines_run_as_written(tmp_path):
    """The walkthrough's `python -c` lines: train and held-out prompts of the teacher's task, each
    file's prompts distinct, no held-out letter set in the train file."""
    block = bash_blocks(section(readme(), "Your first hour"))[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("python -c")]
    assert len(lines) == 2, lines
    (tmp_path / "data").mkdir()
    for ln in lines:
        p = subprocess.run(ln, shell=True, cwd=tmp_path, env=cli_env(PYTHONPATH=str(REPO / "src")),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
    import json

    train = [json.loads(x)["prompt"] for x in (tmp_path / "data" / "prompts.jsonl").read_text().splitlines()]
    held = [json.loads(x)["prompt"] for x in (tmp_path / "data" / "heldout_prompts.jsonl").read_text().splitlines()]
    assert len(train) == len(set(train)) == 400 and len(held) == len(set(held)) == 100
    assert all(p.startswith("Sort: ") for p in train + held)
    letter_sets = {frozenset(p.split()[1:]) for p in train}
    assert not letter_sets & {frozenset(p.split()[1:]) for p in held}


def test_every_command_of_the_commands_table_exists_with_its_flags():
    """The table's `kdforge ...` forms (placeholders like FILE, [optional] parts): each names a real
    command, and each flag it shows is that command's."""
    table = section(readme(), "Commands")
    forms = re.findall(r"`(kdforge [^`]+)`", table)
    assert len(forms) >= 18, forms
    for form in forms:
        words = [w for w in re.split(r"[\s\[\]]+", form.replace("\\|", "|"))[1:] if w]
        cmd, names, _ = resolve(words)
        assert not hasattr(cmd, "commands"), form
        flags = {o for p in cmd.params for o in p.opts + p.secondary_opts}
        for w in words:
            if w.startswith("-") and w != "...":
                assert w in flags, f"`{form}`: `{' '.join(names)}` has no flag {w}"
