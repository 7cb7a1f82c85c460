"""train.report_to: the real `kdforge train` writes TensorBoard / MLflow / W&B runs offline, read
back with each tool's own reader; a SIGKILL and resume continue the same run, each step once."""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
from pathlib import Path

import pytest

from conftest import cli_env, cli_here, run_cli
from kdforge.train import checkpoint as ckpt
from kdforge.train.reporters import STATE_FILE
from train_helpers import kill9, metrics, popen_train, train_config, wait_for

pytest.importorskip("tensorboard", reason='the tracking extra is not installed: pip install -e ".[track]"')

STEPS = 40


# ============================================================================ readers

def tensorboard_steps(logdir: Path) -> dict[str, list[int]]:
    """tag -> the steps TensorBoard shows (EventAccumulator applies purge_step like the UI)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_values(logdir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def mlflow_runs(store: Path):
    """(client, runs) of the file store's kdforge experiment."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{store}")
    exp = client.get_experiment_by_name("kdforge")
    return client, client.search_runs([exp.experiment_id])


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of every offline run folder under run_dir/wandb (the .wandb files are
    LevelDB-style logs of protobuf Records: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for f in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, buf = Path(f).read_bytes(), 7, b""  # 7: the file header (":W&B", magic, version)
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:
                pos += left
                continue
            _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pos += 7
            if n == 0 and kind == 0:  # block padding
                pos += left - 7
                continue
            buf, pos = buf + data[pos:pos + n], pos + n
            if kind in (1, 4):  # a full record, or the last chunk of one
                rec = pb.Record()
                rec.ParseFromString(buf)
                buf = b""
                if rec.WhichOneof("record_type") == "history":
                    rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def once(steps: list[int]) -> list[int]:
    repeated = sorted({s for s in steps if steps.count(s) > 1})
    assert not repeated, f"steps logged more than once: {repeated}"
    return sorted(steps)


# ============================================================================ tests

def test_sigkill_and_resume_continue_one_tensorboard_and_mlflow_run(tmp_path, tokenizer_dir, data_file):
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=STEPS, save_steps=10,
                       eval_steps=10, eval_batches=2, report_to=["tensorboard", "mlflow"])
    text = cfg.read_text().replace("train_shards:", f"eval_shards: [{data_file}]\n  train_shards:")
    cfg.write_text(text)
    out = tmp_path / "o"
    p = popen_train(cfg)

    def past_checkpoint() -> bool:  # killed with steps logged after its checkpoint: purge must drop them
        last = ckpt.latest_checkpoint(out)
        return last is not None and (out / "metrics.jsonl").exists() and \
            max(metrics(out)) >= ckpt.checkpoint_step(last) + 2

    assert wait_for(past_checkpoint), p.communicate()[0]
    kill9(p)
    killed_at = ckpt.read_state(ckpt.latest_checkpoint(out)).global_step
    logged_before = tensorboard_steps(out / "runs")["loss"]
    assert killed_at < STEPS and max(logged_before) > killed_at, (killed_at, logged_before)
    ids = json.loads((out / STATE_FILE).read_text())

    r = cli_here("train", "--config", cfg, "--resume", "auto")  # a cold resume: this process never ran it
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Resuming from checkpoint: checkpoint-{killed_at}" in r.stdout

    # TensorBoard: one run dir, each step once, the values metrics.jsonl holds.
    tb = tensorboard_steps(out / "runs")
    assert once(tb["loss"]) == list(range(1, STEPS + 1))
    for tag in ("ce", "lr", "grad_norm", "tokens_per_s"):
        assert once(tb[tag]) == list(range(1, STEPS + 1)), tag
    assert once(tb["eval_loss"]) == [10, 20, 30, 40]
    m = metrics(out)
    values = tensorboard_values(out / "runs", "loss")
    assert all(abs(values[s] - m[s]["loss"]) < 1e-5 for s in m)

    # MLflow: the same run id continued, each step once.
    assert json.loads((out / STATE_FILE).read_text())["mlflow"]["run_id"] == ids["mlflow"]["run_id"]
    client, runs = mlflow_runs(out / "mlruns")
    assert [run.info.run_id for run in runs] == [ids["mlflow"]["run_id"]], "a resume must not start a second run"
    run = runs[0]
    assert once([x.step for x in client.get_metric_history(run.info.run_id, "loss")]) == list(range(1, STEPS + 1))
    assert once([x.step for x in client.get_metric_history(run.info.run_id, "eval_loss")]) == [10, 20, 30, 40]
    assert run.data.params["train.max_steps"] == str(STEPS) and run.data.params["loss.kind"] == "ce"
    assert run.info.status == "FINISHED"


def test_wandb_offline_run_resumed_after_sigterm_holds_each_step_once(tmp_path, tokenizer_dir, data_file):
    pytest.importorskip("wandb", reason='the tracking extra is not installed: pip install -e ".[track]"')
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", max_steps=STEPS, save_steps=10,
                       report_to=["wandb"])
    out = tmp_path / "o"
    p = popen_train(cfg)
    assert wait_for(lambda: (out / "metrics.jsonl").exists() and max(metrics(out)) >= 12), p.communicate()[0]
    p.send_signal(signal.SIGTERM)  # finish the step, save, exit 130
    assert p.wait(timeout=120) == 130, p.communicate()[0]
    stopped_at = ckpt.read_state(ckpt.latest_checkpoint(out)).global_step
    assert stopped_at < STEPS
    r = run_cli("train", "--config", cfg, "--resume", "auto", env=cli_env(WANDB_MODE="offline"))
    assert r.returncode == 0, r.stdout + r.stderr

    rows = wandb_history(out)
    assert once([row["_step"] for row in rows if "loss" in row]) == list(range(1, STEPS + 1))
    run_id = json.loads((out / STATE_FILE).read_text())["wandb"]["run_id"]
    folders = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(folders) == 2 and all(f.endswith(run_id) for f in folders), folders  # one run, resumed


def test_missing_tracker_package_is_exit_2_naming_the_extra(tmp_path, tokenizer_dir, data_file):
    """A package that is not installed (hidden here: sys.modules[name] = None makes find_spec
    answer None, as for an absent package) stops the run before any model loads."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", report_to=["tensorboard", "mlflow"])
    env = cli_env(PYTHONPATH=str(shadow) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = run_cli("train", "--config", cfg, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert 'pip install -e ".[track]"' in r.stdout + r.stderr and "mlflow" in r.stdout + r.stderr
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_unknown_tracker_name_is_a_config_error(tmp_path, tokenizer_dir, data_file):
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="o", report_to=["tensorbored"])
    r = cli_here("config", "validate", cfg)
    assert r.returncode == 2 and "train.report_to" in r.stdout + r.stderr, r.stdout + r.stderr
    one = train_config(tmp_path, tokenizer_dir, data_file, out="one", report_to="tensorboard")  # a name alone
    assert cli_here("config", "validate", one).returncode == 0


def test_torchrun_reports_from_rank_0_only(tmp_path, tokenizer_dir, data_file):
    """Two DDP ranks, one writer: one event file, one MLflow run, each global step once."""
    import subprocess
    import sys

    from test_distributed import TORCHRUN

    steps = 6
    cfg = train_config(tmp_path, tokenizer_dir, data_file, out="two", micro_batch_size=2, max_steps=steps,
                       save_steps=3, report_to=["tensorboard", "mlflow"])
    r = subprocess.run([*TORCHRUN, "-m", "kdforge", "train", "--config", str(cfg)], env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "two"
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 1
    assert once(tensorboard_steps(out / "runs")["loss"]) == list(range(1, steps + 1))
    client, runs = mlflow_runs(out / "mlruns")
    assert len(runs) == 1
    assert once([m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]) == list(range(1, steps + 1))
