"""The daemon's own bookkeeping, typed: which base it trains, which batch it is on, what was merged.

Saved in every checkpoint's `trainer_state.json` under `extra["daemon"]` (`TrainState.extra` is
the owner-defined part of the state). Checkpoints written before this record existed kept the same
facts as flat string keys in `extra`; `from_extra` reads both, so old base dirs resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

KEY = "daemon"  # TrainState.extra[KEY]


@dataclass
class BatchState:
    base_model: str | None = None  # the base folder the adapter (or full model) trains on
    generation: int = 0  # consolidations so far: bases/gen-{generation}
    batch_number: int = 0  # batches started so far (the current one included)
    batches: list[dict[str, Any]] = field(default_factory=list)  # {number, file, start_step}, for verify's plot
    # ---- the current (or last) batch
    batch_file: str | None = None  # its name in the inbox, as dropped
    claim_id: str | None = None  # the claim's own identity: a file dropped again is a new claim
    batch_sha256: str | None = None  # of the bytes trained, checked again before the file leaves
    batch_bytes: int | None = None
    batch_start_step: int = 0
    batch_done: bool = False  # every example of it trained and saved
    # ---- consolidation
    consolidated_step: int | None = None
    consolidated_on: str | None = None  # YYYYMMDD of the last daily merge
    consolidations: list[dict[str, Any]] = field(default_factory=list)  # {generation, step, base_model}
    # ---- daemon.eval_file (heldout.py): the first held-out record, and the one of the lowest ce so far
    heldout_first: dict[str, Any] | None = None
    heldout_best: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BatchState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "BatchState":
        """From a TrainState.extra: the typed record, or an old checkpoint's flat keys."""
        return cls.from_json(extra[KEY] if KEY in extra else extra)

    def into_extra(self, extra: dict[str, Any]) -> dict[str, Any]:
        """`extra` with this record under its key (old flat keys dropped: the record replaces them)."""
        known = {f.name for f in fields(self)}
        return {**{k: v for k, v in extra.items() if k not in known}, KEY: self.to_json()}
