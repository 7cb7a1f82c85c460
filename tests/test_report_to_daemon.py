"""train.report_to in the daemon: a SIGKILL mid-batch and a restart add to one TensorBoard curve
and one MLflow run (BASE/runs/, BASE/mlruns/), each step once, the held-out eval beside the loss."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import synthetic_records, write_jsonl
from daemon_helpers import one_thread  # noqa: F401 - autouse fixture: one torch thread
from daemon_helpers import (batch, daemon_config, drop, losses, newest_state, start_daemon, status, stop, wait_idle_at,
                            wait_until)
from kdforge.train import checkpoint as ckpt
from kdforge.train.reporters import STATE_FILE
from test_report_to import mlflow_runs, once, tensorboard_steps, tensorboard_values
from train_helpers import kill9

pytest.importorskip("mlflow", reason='the tracking extra is not installed: pip install -e ".[track]"')

N_RECORDS, N_STEPS = 96, 24  # micro-batch 4: 24 steps for the one batch


def test_daemon_restart_after_sigkill_continues_one_run(tmp_path, tiny_model_dir):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", synthetic_records(8, seed=99))
    cfg = daemon_config(tmp_path / "daemon.yaml", tiny_model_dir, save_steps=4, eval_file=str(heldout))
    tree = yaml.safe_load(cfg.read_text())
    tree["train"]["report_to"] = ["tensorboard", "mlflow"]
    cfg.write_text(yaml.safe_dump(tree))
    base = tmp_path / "base"

    proc = start_daemon(base, cfg, "first.out")
    drop(base, "stream.jsonl", batch(N_RECORDS, seed=7))
    try:
        wait_until(lambda: status(base).get("current_step", 0) >= 10, proc, base, "step 10")
    finally:
        kill9(proc)
    killed_at = ckpt.read_state(ckpt.latest_checkpoint(base / "current_model")).global_step
    logged = tensorboard_steps(base / "runs")["loss"]
    assert killed_at < N_STEPS and max(logged) >= 10, (killed_at, logged)
    run_id = json.loads((base / STATE_FILE).read_text())["mlflow"]["run_id"]

    restarted = start_daemon(base, cfg, "second.out")
    try:  # the restart finishes the batch from checkpoint killed_at, then stops on .stop
        wait_idle_at(base, N_STEPS, restarted, "stream.jsonl")
        assert stop(restarted, base) == 0
    finally:
        restarted.poll() is None and restarted.kill()

    tb = tensorboard_steps(base / "runs")
    assert once(tb["loss"]) == list(range(1, N_STEPS + 1))
    assert once(tb["eval_ce"]) == [N_STEPS]  # the held-out eval after the batch, on the same x axis
    client, runs = mlflow_runs(base / "mlruns")
    assert [r.info.run_id for r in runs] == [run_id], "a restart must continue the run, not start a second"
    assert once([m.step for m in client.get_metric_history(run_id, "loss")]) == list(range(1, N_STEPS + 1))
    assert [m.step for m in client.get_metric_history(run_id, "eval_ce")] == [N_STEPS]
    assert runs[0].data.params["daemon.save_steps"] == "4"



def test_a_rolled_back_batch_leaves_the_tensorboard_curve(tmp_path, tiny_model_dir):
    """A batch that changes after its claim is trained to its end, then rolled back to step 0; the
    next batch trains steps 1.. again: TensorBoard shows each step once, with the kept batch's
    values (MLflow cannot delete points: it holds both, the kept ones logged last)."""
    from kdforge.config import load_config
    from kdforge.daemon.service import Daemon

    cfg = daemon_config(tmp_path / "d.yaml", tiny_model_dir, settle_seconds=0, save_steps=4)
    tree = yaml.safe_load(cfg.read_text())
    tree["train"]["report_to"] = ["tensorboard", "mlflow"]
    cfg.write_text(yaml.safe_dump(tree))
    base = tmp_path / "base"
    drop(base, "a_changing.jsonl", batch(40, seed=5))  # 10 steps

    def writer_goes_on(line: str) -> None:  # a writer appends after the claim: the batch is refused at its end
        if "step 3 loss" in line:
            (claimed,) = (base / "inbox" / ".claimed").iterdir()
            with open(claimed, "a") as f:
                f.write(json.dumps(batch(1, seed=6)[0]) + "\n")

    Daemon(base, load_config([cfg]), echo=writer_goes_on, handle_signals=False).run(once=True)
    assert (base / "rejected" / "a_changing.jsonl").exists()
    client, (run,) = mlflow_runs(base / "mlruns")
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 10  # all 10 steps were logged ...
    assert tensorboard_steps(base / "runs").get("loss", []) == []  # ... and left TensorBoard's curve with the rollback

    drop(base, "b_good.jsonl", batch(24, seed=7))  # 6 steps, from step 0 again
    Daemon(base, load_config([cfg]), handle_signals=False).run(once=True)
    kept = losses(newest_state(base))
    assert sorted(kept) == list(range(1, 7))
    tb = tensorboard_values(base / "runs", "loss")
    assert sorted(tb) == list(range(1, 7)), sorted(tb)  # steps 7..10 of the rolled-back batch are gone
    assert all(abs(tb[s] - kept[s]) < 1e-5 for s in kept), (tb, kept)
    history = client.get_metric_history(run.info.run_id, "loss")
    last = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
    assert all(abs(last[s] - kept[s]) < 1e-5 for s in kept)
