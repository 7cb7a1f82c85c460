"""`train.report_to`: the metrics.jsonl records, also sent to TensorBoard, W&B and/or MLflow.

Every backend works offline: TensorBoard writes event files to `DIR/runs/`; W&B runs with
`WANDB_MODE=offline` unless that is set (a folder under `DIR/wandb/`, `wandb sync` uploads it);
MLflow uses the file store `file:DIR/mlruns` unless `MLFLOW_TRACKING_URI` is set. `DIR` is the
output dir of `kdforge train`, or the daemon's base dir.

One run per DIR, however often it is resumed: the W&B and MLflow run ids live in
`DIR/report_to.json`, so a resume or a daemon restart appends to the same curves. A step is
logged once: TensorBoard reopens with `purge_step` (the steps after the checkpoint that a killed
run had logged are dropped from the curve, then logged again); MLflow and W&B cannot delete
points, so they skip the steps they already hold (resume is exact, so those values are the ones
the resumed run would log). A batch the daemon rolls back (`rewind`) leaves TensorBoard's curve at
once; MLflow and W&B keep its points and take the next batch's for the same steps after them.
Rank 0 reports; other ranks get an empty `Reporters`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any

from kdforge.atomic import atomic_write_json
from kdforge.errors import UsageError

EXTRA = 'pip install -e ".[track]"'
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # backend -> import name
STATE_FILE = "report_to.json"
MLFLOW_EXPERIMENT = "kdforge"
MLFLOW_PARAM_MAX = 6000  # characters MLflow keeps of one param value
MLFLOW_BATCH_MAX = 100  # params per log_batch call (MLflow's limit)


def check_installed(names: list[str]) -> None:
    """Raise UsageError (exit 2) naming the extra if a backend's package is missing. Every rank
    checks, so that under torchrun no rank waits for one that has already exited."""
    missing = [n for n in names if importlib.util.find_spec(MODULES[n]) is None]
    if missing:
        raise UsageError(f"train.report_to: {', '.join(missing)} not installed; install the tracking "
                         f"extra: {EXTRA} (or set train.report_to: [])")


def flat_config(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists become JSON text (hyperparameters)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def scalars(metrics: dict) -> dict[str, float]:
    """The numbers of one metrics record: booleans as 0/1 (`on_policy` averages to the on-policy
    share), text (`after`) and the wall-clock `time` left out."""
    out = {}
    for k, v in metrics.items():
        if k in ("step", "time") or isinstance(v, str) or v is None:
            continue
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Reporters:
    """The configured backends for one run dir. `log(step, metrics)` sends one metrics record;
    `close()` flushes and ends the runs (a later `open` on the same dir continues them)."""

    def __init__(self, backends: list | None = None):
        self.backends = backends or []

    @classmethod
    def open(cls, names: list[str], run_dir: str | Path, *, rank: int = 0, config: dict | None = None,
             start_step: int = 0) -> "Reporters":
        """Open (or continue) the runs in `run_dir`; `start_step` is the step training resumes
        from (0 for a fresh run). Raises UsageError naming the extra if a package is missing."""
        check_installed(names)
        if rank != 0 or not names:
            return cls()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ids = _Ids(run_dir / STATE_FILE)
        params = flat_config(config or {})
        kinds = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
        opened: list = []
        try:
            for n in names:
                opened.append(kinds[n](run_dir, ids, params, start_step))
        except BaseException:
            cls(opened).close()
            raise
        return cls(opened)

    def log(self, step: int, metrics: dict) -> None:
        values = scalars(metrics)
        if values:
            for b in self.backends:
                b.log(step, values)

    def rewind(self, step: int) -> None:
        """The run went back to `step` (the daemon rolled a failed batch back): what comes next
        replaces what was logged after it (TensorBoard purges; W&B and MLflow log the new points)."""
        for b in self.backends:
            b.rewind(step)

    def close(self) -> None:
        for b in self.backends:
            try:
                b.close()
            except Exception:  # noqa: BLE001 - one tracker failing to close must not hide the run's result
                pass
        self.backends = []


class _Ids:
    """DIR/report_to.json: the run ids (and W&B's last step) that make a resume continue a run."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.data = {}

    def get(self, backend: str) -> dict:
        return dict(self.data.get(backend) or {})

    def put(self, backend: str, **fields: Any) -> None:
        self.data[backend] = {**self.get(backend), **fields}
        atomic_write_json(self.path, self.data, durable=False)


class _TensorBoard:
    def __init__(self, run_dir: Path, ids: _Ids, params: dict, start_step: int):
        self.logdir = run_dir / "runs"
        continuing = self.logdir.is_dir() and any(self.logdir.glob("events.out.tfevents.*"))
        self.writer = self._writer(start_step if continuing else None)
        if not continuing:  # hyperparameters once, as a table in the TEXT tab
            rows = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, 0)
            self.writer.flush()
        ids.put("tensorboard", logdir=str(self.logdir))

    def _writer(self, after_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops every event at or past it from the older files, so the steps
        # a killed run logged after its last checkpoint appear once, as the resumed run logs them.
        return SummaryWriter(log_dir=str(self.logdir), purge_step=None if after_step is None else after_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a SIGKILL must not lose steps the checkpoint already covers

    def rewind(self, step: int) -> None:
        self.writer.close()
        self.writer = self._writer(step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, ids: _Ids, params: dict, start_step: int):
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        saved = ids.get("wandb")
        run_id = saved.get("run_id") or secrets.token_hex(4)  # W&B ids: lower-case letters and digits
        self.ids, self.last = ids, int(saved.get("last_step", 0))
        self.held = max(start_step, self.last)  # steps up to here are in the run already
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "kdforge"), id=run_id, resume="allow",
                              name=run_dir.name, dir=str(run_dir), config=params)
        ids.put("wandb", run_id=run_id, last_step=self.last)

    def log(self, step: int, values: dict[str, float]) -> None:
        if step <= self.held:
            return  # already in the run (logged before a kill): W&B cannot replace a point
        self.run.log(values, step=step)  # an eval record at the same step joins that step's row
        if step != self.last:
            self.last = step
            self.ids.put("wandb", last_step=step)

    def rewind(self, step: int) -> None:
        self.held = self.last = step
        self.ids.put("wandb", last_step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, ids: _Ids, params: dict, start_step: int):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(run_dir / 'mlruns').resolve()}"
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked for it; it is the one that needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        saved = ids.get("mlflow")
        run_id = saved.get("run_id")
        run = self._existing(run_id)
        if run is None:
            exp = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(MLFLOW_EXPERIMENT)
            run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
            items = [Param(k, str(v)[:MLFLOW_PARAM_MAX]) for k, v in params.items()]
            for i in range(0, len(items), MLFLOW_BATCH_MAX):  # params are set once: MLflow forbids changing one
                self.client.log_batch(run_id, params=items[i:i + MLFLOW_BATCH_MAX])
            self.held = start_step
        else:
            self.client.update_run(run_id, status="RUNNING")
            # Steps up to here are in the run already (a killed run logged them; resume is exact).
            # Points from before a rewind (a rolled-back batch) do not count: those steps train anew.
            since = int(saved.get("rewound_at_ms", 0))
            held = [m.step for k in run.data.metrics for m in self.client.get_metric_history(run_id, k)
                    if m.timestamp >= since]
            self.held = max([start_step, *held])
        self.run_id, self.ids = run_id, ids
        ids.put("mlflow", run_id=run_id, tracking_uri=uri)

    def _existing(self, run_id: str | None):
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a run deleted, or another tracking server: start a new one
            return None

    def log(self, step: int, values: dict[str, float]) -> None:
        if step <= self.held:
            return  # MLflow already holds this step (a killed run logged it before its checkpoint)
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v in values.items()])

    def rewind(self, step: int) -> None:
        self.held = step
        self.ids.put("mlflow", rewound_at_ms=int(time.time() * 1000))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")
