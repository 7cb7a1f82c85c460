"""`kdforge verify`: the seed guide's "Final Validation", as checks that pass or fail.

Checks: checkpoints present and no more than `save_total_limit`; each with its weights (adapter
or full model), `optimizer.pt`, `scheduler.pt`, `trainer_state.json`; `global_step` strictly
increasing across them (and equal to the folder's number); no ERROR lines in the daemon's logs;
the daemon not in `error`; inbox empty (nothing waiting, nothing half-trained in inbox/.claimed/, no
other entry); the loss curve with no jump back toward the initial loss at a batch boundary or a
consolidation; with `daemon.eval_file`, no forgetting: the newest held-out ce no more than
`daemon.forgetting_threshold` (default 10%, relative) above the lowest it reached (heldout.py), and
its change since the first held-out eval (after batch 1) reported.
Writes `BASE/verification_report.txt` and `BASE/loss.png` (loss and held-out ce vs global step,
boundaries marked).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from kdforge.atomic import atomic_write_text
from kdforge.config import DaemonSection
from kdforge.daemon import heldout
from kdforge.daemon.batch_state import BatchState
from kdforge.daemon.inbox import claim_parts, scan, shown
from kdforge.daemon.layout import Layout
from kdforge.errors import UsageError
from kdforge.checkpoint_layout import CONFIG, STATE, checkpoint_folders, checkpoint_step, missing_files  # no torch

ERROR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ERROR\b")
JUMP_SHARE = 0.5  # a boundary fails if the loss climbs back more than this share of the way to the start
TAIL = 3  # steps averaged for "the loss at the end of the previous batch"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Verification:
    ok: bool
    checks: list[Check]
    report: str
    report_path: Path
    plot_path: Path | None


def _human(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STATE).read_text())
    except (OSError, ValueError):
        return None


def _daemon_setting(folder: Path | None, key: str):
    """A `daemon:` setting from the resolved config the newest checkpoint carries (else its default)."""
    import yaml

    default = getattr(DaemonSection(), key)
    try:
        conf = yaml.safe_load((folder / CONFIG).read_text()) or {}
        return type(default)(conf["daemon"][key])
    except (OSError, TypeError, KeyError, ValueError, AttributeError):
        return default


def boundaries(state: dict) -> list[tuple[int, str]]:
    """(global step where it starts, label) for every batch after the first and every consolidation."""
    b = BatchState.from_extra(state.get("extra") or {})
    out = [(x["start_step"], f"batch {x['number']}") for x in b.batches[1:]]
    out += [(c["step"], f"consolidation {c['generation']}") for c in b.consolidations]
    return sorted(out)


CURVES = (("loss", "off-policy"), ("loss_on_policy", "on-policy"))  # log_history keys: one curve each


def jump_checks(history: list[dict], marks: list[tuple[int, str]]) -> list[tuple[bool, str]]:
    """Per boundary and per kind of step (off-policy `loss`, on-policy `loss_on_policy`: different
    quantities, never compared with each other): did the loss climb back toward that curve's
    initial loss? A curve without steps on both sides of a boundary is not checked there."""
    curves = [(label, [(h["step"], h[key]) for h in history if key in h]) for key, label in CURVES]
    both = all(c for _, c in curves)
    results = []
    for step, label in marks:
        for kind, curve in curves:
            if not curve:
                continue
            initial = curve[0][1]
            before = [loss for s, loss in curve if step - TAIL < s <= step]
            after = [loss for s, loss in curve if s > step][:1]
            if not before or not after:
                continue
            end, first = sum(before) / len(before), after[0]
            gap = initial - end
            ok = gap <= 0.05 * abs(initial) or first - end <= JUMP_SHARE * gap
            results.append((ok, f"{label} at step {step}{f' ({kind} steps)' if both else ''}: previous end "
                                f"{end:.4f}, next {first:.4f}, initial {initial:.4f}"))
    return results


HELDOUT_COLOR = "tab:orange"  # the held-out line (a test finds it in the PNG)


def plot_loss(history: list[dict], marks: list[tuple[int, str]], out: Path) -> Path | None:
    """Training loss (off-policy and on-policy steps as two lines) and, with daemon.eval_file,
    held-out ce (nats/token, the same axis) vs step."""
    curves = [(label, [(h["step"], h[key]) for h in history if key in h]) for key, label in CURVES]
    if not any(c for _, c in curves):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for kind, curve in curves:
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], lw=1.2,
                    label="training loss" if kind == "off-policy" else "on-policy loss (divergence on its own tokens)")
    held = [(r["step"], r["eval_ce"]) for r in heldout.records(history) if r.get("eval_ce") is not None]
    if held:
        ax.plot([s for s, _ in held], [v for _, v in held], color=HELDOUT_COLOR, lw=1.6, marker="o", ms=4,
                label="held-out ce (daemon.eval_file)")
    for i, (step, label) in enumerate(marks):
        style = ":" if label.startswith("consolidation") else "--"
        ax.axvline(step + 0.5, color="tab:red" if style == "--" else "tab:green", ls=style, lw=1,
                   label=("batch boundary" if style == "--" else "consolidation") if i < 2 else None)
        ax.annotate(label, (step + 0.5, ax.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.set_title("kdforge daemon: loss across batches")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), loc="upper right")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def step_check(folders: list[tuple[int, Path]], lines: list[str]) -> Check:
    """global_step strictly increasing across the checkpoints, each equal to its folder's number."""
    lines += ["", "Global step progression:"]
    steps, step_problems = [], []
    for n, p in folders:
        st = _state(p)
        gs = st.get("global_step") if st else None
        lines.append(f"  {p.name}: global_step={gs}")
        if gs is None:
            step_problems.append(f"{p.name}: unreadable trainer_state.json")
            continue
        if gs != n:
            step_problems.append(f"{p.name} holds global_step {gs}")
        if steps and gs <= steps[-1]:
            step_problems.append(f"{p.name}: global_step {gs} does not increase past {steps[-1]}")
        steps.append(gs)
    return Check("global_step strictly increasing across checkpoints", bool(steps) and not step_problems,
                 "; ".join(step_problems) or " -> ".join(map(str, steps)) or "no steps")


def log_check(paths: Layout) -> Check:
    errors = []
    for log in sorted(paths.logs.glob("daemon_*.log")) if paths.logs.is_dir() else []:
        with open(log, encoding="utf-8", errors="replace") as f:
            errors += [f"{log.name}:{i}: {line.strip()[:160]}" for i, line in enumerate(f, 1) if ERROR_LINE.match(line)]
    return Check("no ERROR lines in the daemon logs", not errors,
                 "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
                 if errors else "none")


def inbox_check(paths: Layout) -> Check:
    """Empty means empty: no batch waiting, none half-trained, and no other entry either (a temp
    file, a link, a directory the daemon could not move): each is named with what it is."""
    inbox, claimed = scan(paths.inbox), scan(paths.claimed)
    found = ([f"{shown(p.name)} (batch, waiting)" for p, _ in inbox.batches]
             + [f"{shown(claim_parts(p)[1])} (unfinished, in inbox/.claimed/)" for p, _ in claimed.batches]
             + [f"{shown(p.name)} ({why})" for p, why in inbox.others + claimed.others])
    detail = (f"{len(found)} entr{'y' if len(found) == 1 else 'ies'} in inbox/: " + ", ".join(found[:8])
              + (f" (+{len(found) - 8} more)" if len(found) > 8 else "")) if found else "empty"
    return Check("inbox empty (all batches trained and removed)", not found, detail)


def checkpoint_checks(paths: Layout, lines: list[str]) -> tuple[list[Check], Path | None]:
    """Checkpoints present, within save_total_limit, each complete, global_step increasing; the newest."""
    folders = [(checkpoint_step(p), p) for p in checkpoint_folders(paths.checkpoints)]
    newest = folders[-1][1] if folders else None
    limit = _daemon_setting(newest, "save_total_limit")
    lines.append("Checkpoints:")
    incomplete = []
    for _, p in folders:
        lines.append(f"  {p.name}/")
        for f in sorted(p.iterdir()):
            lines.append(f"    {_human(f.stat().st_size):>7}  {f.name}")
        lacks = missing_files(p)
        if lacks:
            incomplete.append(f"{p.name} lacks {', '.join(lacks)}")
    if not folders:
        lines.append("  (none)")
    checks = [Check("checkpoints exist", bool(folders),
                    f"{len(folders)} in {paths.checkpoints}" if folders else f"no checkpoint-* in {paths.checkpoints}"),
              Check(f"no more than save_total_limit ({limit}) checkpoints", len(folders) <= limit,
                    f"{len(folders)} present"),
              Check("each checkpoint has weights, optimizer.pt, scheduler.pt, trainer_state.json",
                    bool(folders) and not incomplete, "; ".join(incomplete) or "all complete"),
              step_check(folders, lines)]
    return checks, newest


def heldout_check(newest: Path | None, state: dict, lines: list[str]) -> Check | None:
    """With daemon.eval_file: the held-out numbers listed, and the forgetting check (None without)."""
    recs = heldout.records(state.get("log_history", []))
    if not recs:
        return None
    b = BatchState.from_extra(state.get("extra") or {})
    first, best = b.heldout_first or recs[0], b.heldout_best
    for r in recs if best is None else []:  # a checkpoint without the record: the history says
        best = heldout.lowest(best, r)
    threshold = _daemon_setting(newest, "forgetting_threshold")
    lines += ["", "Held-out eval (daemon.eval_file):"] + [f"  {heldout.describe(r, first)}" for r in recs[-20:]]
    ok, detail = heldout.forgetting(first, best, recs[-1], threshold)
    return Check(f"no forgetting: held-out ce at most {threshold:.0%} above its lowest", ok, detail)


def verify(base_dir: str | Path) -> Verification:
    paths = Layout(Path(base_dir).resolve())
    if not paths.base.is_dir():
        raise UsageError(f"--base-dir {paths.base}: no such folder (the daemon's base dir, see kdforge daemon --help)")
    lines = ["=== Continuous Training Verification Report ===", f"Date: {datetime.now():%Y-%m-%d %H:%M:%S}",
             f"Base dir: {paths.base}", ""]
    checks, newest = checkpoint_checks(paths, lines)

    # ---------------------------------------------------------------- logs, status, inbox
    checks.append(log_check(paths))
    status = None
    if paths.status_file.is_file():
        try:
            status = json.loads(paths.status_file.read_text())
        except ValueError:
            status = {"status": "unreadable"}
    state_word = (status or {}).get("status", "no status file")
    checks.append(Check("daemon status is not error", state_word not in ("error", "unreadable"),
                        f"{state_word}" + (f": {status.get('last_error')}" if status and status.get("last_error") else "")))
    checks.append(inbox_check(paths))

    # ---------------------------------------------------------------- the loss curve, held-out eval
    newest_state = (_state(newest) if newest else None) or {}
    history = newest_state.get("log_history", [])
    marks = boundaries(newest_state)
    jumps = jump_checks(history, marks)
    bad = [d for ok, d in jumps if not ok]
    checks.append(Check("no loss jump back toward the initial loss at batch boundaries", bool(history) and not bad,
                        ("; ".join(bad) if bad else f"{len(jumps)} boundaries checked") if history else "no loss history"))
    plot = plot_loss(history, marks, paths.loss_plot)

    if newest is not None:
        lines += ["", f"Latest checkpoint: {newest.name}"]
        b = BatchState.from_extra(newest_state.get("extra") or {})
        lines.append(f"  batch {b.batch_number} ({shown(b.batch_file or '')}), base model "
                     f"{b.base_model} (generation {b.generation}), "
                     f"samples_seen {newest_state.get('samples_seen')}")
    if jumps:
        lines += ["", "Loss at boundaries:"] + [f"  {'ok ' if ok else 'JUMP'} {d}" for ok, d in jumps]
    forgetting = heldout_check(newest, newest_state, lines)
    checks += [forgetting] if forgetting else []
    lines += ["", "Checks:"] + [f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in checks]
    ok = all(c.ok for c in checks)
    failed = [c.name for c in checks if not c.ok]
    lines += ["", "RESULT: " + ("all checks passed: continuous training is working correctly" if ok
                                else f"{len(failed)} check(s) failed: " + "; ".join(failed))]
    if plot:
        lines.append(f"Loss plot: {plot}")
    report = "\n".join(lines) + "\n"
    paths.base.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths.report, report)
    return Verification(ok, checks, report, paths.report, plot)
