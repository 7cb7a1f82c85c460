"""The README's two pictures, made offline on CPU in about a minute:

docs/tensorboard.png: a real toy `kdforge train` with `train.report_to: [tensorboard]`, stopped at
step 40 and resumed to 80; the scalars are read back from its event files with TensorBoard's
EventAccumulator and drawn with matplotlib (no browser here to photograph TensorBoard's page).
The curves are what TensorBoard shows: one run, each step once, across the resume.

docs/status_watch.png: `kdforge status --watch` running in tmux over a status file and daily log
this script writes (a daemon mid-batch); the pane is read with capture-pane and drawn as text.

    python scripts/screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TAGS = [("loss", "training loss"), ("eval_loss", "eval loss (held-out shard)"), ("lr", "learning rate"),
        ("grad_norm", "grad norm")]


def tensorboard_png(work: Path, out: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdforge.config import from_dict
    from kdforge.data.tokenizer import train_tokenizer
    from kdforge.data.toy import toy_records
    from kdforge.train.runner import run_training
    from kdforge.train.smoke import smoke_config

    rows = toy_records(200, seed=0)
    (work / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:160]))
    (work / "toy_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[160:]))
    train_tokenizer([t for r in rows for t in (r["prompt"], r["teacher_text"])], 384, work / "tokenizer",
                    min_frequency=1)
    tree = smoke_config(work, 80)
    tree["train"].update(report_to=["tensorboard"], eval_steps=10, save_steps=10)
    quiet = lambda _msg: None  # noqa: E731
    run_training(from_dict(tree, "screenshots"), resume="none", log=quiet, stop_after=40)
    run_training(from_dict(tree, "screenshots"), resume="auto", log=quiet)

    acc = EventAccumulator(str(work / "checkpoints" / "runs"), size_guidance={"scalars": 0})
    acc.Reload()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 6), dpi=80)
    for ax, (tag, title) in zip(axes.flat, TAGS):
        events = acc.Scalars(tag)
        ax.plot([e.step for e in events], [e.value for e in events], color="#f57c00", marker="." if
                len(events) < 20 else None)
        ax.axvline(40, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{tag}: {title}", fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    axes[1, 0].set_xlabel("global step")
    axes[1, 1].set_xlabel("global step")
    fig.suptitle("TensorBoard scalars of one run (event files in OUTPUT_DIR/runs/): stopped at step 40 "
                 "(dotted), resumed, one curve", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def status_png(work: Path, out: Path) -> None:
    from kdforge.atomic import atomic_write_json

    base = work / "base"
    (base / "status").mkdir(parents=True)
    (base / "logs").mkdir()
    loss = [1.1 + 1.3 * 0.992 ** s + 0.004 * ((s * 7) % 5) for s in range(1, 301)]  # still falling
    (base / "logs" / f"daemon_{time.strftime('%Y%m%d')}.log").write_text("".join(
        f"{time.strftime('%Y-%m-%d')} 10:{s // 60:02d}:{s % 60:02d} INFO step {s} loss {v:.4f} lr 0.0001 "
        f"1,830 tok/s\n" for s, v in enumerate(loss[:262], start=1)))
    status = {"status": "training", "current_step": 262, "total_steps": 300, "batch_number": 3,
              "batch_step": 62, "batch_steps": 100, "batch_queue_size": 2, "current_file": "week3.jsonl",
              "loss": loss[261], "learning_rate": 1e-4, "tokens_per_s": 1830.0, "last_checkpoint": "checkpoint-260",
              "pid": os.getpid(), "last_error": None,
              "eval": {"step": 200, "after": "batch 2", "ce": 1.412, "change_since_first": -0.081},
              "eval_history": [{"step": 100, "ce": 1.537}, {"step": 200, "ce": 1.412}]}
    atomic_write_json(base / "status" / "training_status.json", status)

    sock = str(work / "tmux.sock")
    cmd = f"{shlex.quote(sys.executable)} -m kdforge status --base-dir {shlex.quote(str(base))} --watch --interval 0.3"
    tmux = ["tmux", "-S", sock]
    subprocess.run([*tmux, "new-session", "-d", "-s", "w", "-x", "100", "-y", "22", cmd], check=True)
    try:
        for step in (264, 266, 268):  # the daemon advancing: the view gets a pace, so an ETA
            time.sleep(0.8)
            atomic_write_json(base / "status" / "training_status.json",
                              {**status, "current_step": step, "batch_step": step - 200, "loss": loss[step - 1]})
        time.sleep(1.0)
        screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "w"], capture_output=True, text=True,
                                check=True).stdout.rstrip("\n")
        subprocess.run([*tmux, "send-keys", "-t", "w", "q"], check=True)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(dpi=90)
    fig.patch.set_facecolor("#1e1e1e")
    text = fig.text(0, 0, screen, family="DejaVu Sans Mono", fontsize=8.5, color="#e0e0e0", va="bottom",
                    ha="left", linespacing=1.25)
    fig.canvas.draw()  # measure the text, then fit the figure around it with a small margin
    box = text.get_window_extent()
    margin = 8  # pixels
    fig.set_size_inches((box.width + 2 * margin) / 90, (box.height + 2 * margin) / 90)
    text.set_position((margin / (box.width + 2 * margin), margin / (box.height + 2 * margin)))
    fig.savefig(out, dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdforge-shots-") as tmp:
        (Path(tmp) / "tb").mkdir()
        (Path(tmp) / "watch").mkdir()
        tensorboard_png(Path(tmp) / "tb", args.out / "tensorboard.png")
        status_png(Path(tmp) / "watch", args.out / "status_watch.png")
    print(f"wrote {args.out / 'tensorboard.png'} and {args.out / 'status_watch.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
