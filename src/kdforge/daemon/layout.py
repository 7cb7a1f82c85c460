"""The daemon's base directory: one place that names every folder and file in it (SPEC "daemon").

    BASE/
      inbox/                       drop *.jsonl here (write elsewhere, then move in)
      inbox/.claimed/ID--NAME      the batch being trained (claimed by a rename under a new claim
                                   id; it leaves inbox/ only once its training is saved)
      current_model/checkpoint-N/  checkpoints, save_total_limit kept
      bases/gen-K/                 consolidated base models (LoRA merged into the previous base)
      status/training_status.json  written atomically after every step and state change
      logs/daemon_YYYYMMDD.log     one file a day
      snapshots/YYYYMMDD/          daily copies of the newest checkpoint
      rejected/                    unusable batches, each with a .reason file beside it
      processed/                   trained batches, when daemon.delete_processed is false
      .stop                        create it: the daemon saves and exits; removed on start
      .daemon.lock                 held (flock) by the running daemon
      .batch_start/checkpoint-N/   hard links to the checkpoint the current batch started from
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
    def claimed(self) -> Path:
        return self.inbox / ".claimed"

    @property
    def batch_start(self) -> Path:
        """A hard-linked copy of the checkpoint the current batch started from: the rollback
        point if the batch fails, kept even when save_total_limit rotates it out of current_model/."""
        return self.base / ".batch_start"

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
        for d in (self.inbox, self.claimed, self.checkpoints, self.status_file.parent, self.logs,
                  self.snapshots, self.rejected):
            d.mkdir(parents=True, exist_ok=True)
