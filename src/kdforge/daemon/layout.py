"""The daemon's base directory: one place that names every folder and file in it (SPEC "daemon").

    BASE/
      inbox/                       drop *.jsonl here (write elsewhere, then move in)
      inbox/.claimed/              the batch being trained (claimed by a rename; it leaves inbox/
                                   only once its training is saved)
      current_model/checkpoint-N/  checkpoints, save_total_limit kept
      bases/gen-K/                 consolidated base models (LoRA merged into the previous base)
      status/training_status.json  written atomically after every step and state change
      logs/daemon_YYYYMMDD.log     one file a day
      snapshots/YYYYMMDD/          daily copies of the newest checkpoint
      rejected/                    unusable batches, each with a .reason file beside it
      processed/                   trained batches, when daemon.delete_processed is false
      .stop                        create it: the daemon saves and exits; removed on start
      .daemon.lock                 held (flock) by the running daemon
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    base: Path

    @property
    def inbox(self) -> Path:
        return self.base / "inbox"

    @property
    def processing(self) -> Path:
        return self.inbox / ".claimed"

    @property
    def checkpoints(self) -> Path:
        return self.base / "current_model"

    @property
    def bases(self) -> Path:
        return self.base / "bases"

    @property
    def status_file(self) -> Path:
        return self.base / "status" / "training_status.json"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def snapshots(self) -> Path:
        return self.base / "snapshots"

    @property
    def rejected(self) -> Path:
        return self.base / "rejected"

    @property
    def processed(self) -> Path:
        return self.base / "processed"

    @property
    def stop_file(self) -> Path:
        return self.base / ".stop"

    @property
    def lock_file(self) -> Path:
        return self.base / ".daemon.lock"

    @property
    def report(self) -> Path:
        return self.base / "verification_report.txt"

    @property
    def loss_plot(self) -> Path:
        return self.base / "loss.png"

    def make(self) -> None:
        for d in (self.inbox, self.processing, self.checkpoints, self.status_file.parent, self.logs,
                  self.snapshots, self.rejected):
            d.mkdir(parents=True, exist_ok=True)
