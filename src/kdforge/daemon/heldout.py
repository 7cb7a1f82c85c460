"""`daemon.eval_file`: held-out KD data the daemon scores after every batch and consolidation, so
that a student that forgets what earlier batches taught it shows it (a new batch's training loss
cannot tell).

The file is read and tokenised once, at start (an unusable file stops the daemon: exit 2, naming
file:line). Each score is `kdforge eval`'s numbers (`evaluate_loaded`): ce and perplexity on the
teacher's text, kl to the stored top-k (or the local teacher's logits); with `daemon.eval_greedy`
also exact_match, token_f1 and accuracy, which generate and cost more. A score is one
`log_history` record in the checkpoint it is saved with (`step`, `after`: "batch 3" or
"consolidation 1", `eval_ce`, `eval_perplexity`, ...), so a rolled-back batch takes its score with
it. The forgetting check (`kdforge verify`) compares the newest held-out ce with the lowest one
reached: more than `daemon.forgetting_threshold` (relative) above it fails.

The functions below the class import no torch: verify uses them.
"""

from __future__ import annotations

from pathlib import Path

from kdforge.errors import DataError

NUMBERS = ("ce", "perplexity", "kl", "exact_match", "token_f1", "accuracy", "n")
PREFIX = "eval_"
IN_STATUS = 20  # held-out records kept in the status file's eval_history (the checkpoint keeps them all)


class HeldOut:
    """The eval file, loaded once with the daemon's tokenizer and, given `settings` (the daemon's
    `train.session.store_settings(cfg)`), read as the daemon's training reads a batch: the same
    reasoning kept or dropped, another tokenizer's stored rows carried (cross_tokenizer auto) or
    refused (off: exit 2 naming file:line, as training refuses such a batch).

    A teacher.path with another tokenizer (the session's `LocalCrossTeacher`) scores every record
    with its top-K carried onto the student's tokens, stored rows set aside, as training with
    teacher.path does (eval.run._loss_sums): `kdforge eval CKPT --data FILE --teacher DIR`'s kl."""

    def __init__(self, path: str | Path, tokenizer, max_seq_length: int, greedy: bool = False,
                 settings: dict | None = None):
        from kdforge.eval import load_eval_data

        self.path, self.tokenizer, self.greedy = Path(path).resolve(), tokenizer, greedy
        try:
            self.data = load_eval_data(self.path, tokenizer, max_seq_length=max_seq_length, settings=settings)
        except DataError as e:
            raise DataError(f"daemon.eval_file: {e}") from None

    def note(self) -> str | None:
        """The log line saying another tokenizer's stored rows were carried (None: none were), as
        training says it of its data."""
        scored = self.data.scored
        said = scored.carried.note() if scored is not None and scored.with_topk else None
        return None if said is None else f"daemon.eval_file: {said}"

    def __len__(self) -> int:
        return len(self.data)

    def score(self, model, teacher, device, step: int, after: str) -> dict:
        """The log_history record of one eval of `model` (left in the mode it was in)."""
        from kdforge.eval import evaluate_loaded

        res = evaluate_loaded(model, self.tokenizer, self.data, teacher, device=device, greedy=self.greedy)
        numbers = res.to_json()
        rec = {"step": step, "after": after}
        rec.update({PREFIX + k: numbers[k] for k in NUMBERS if numbers.get(k) is not None})
        rec[PREFIX + "seconds"] = numbers["seconds"]
        return rec


# ============================================================================ records (no torch)

def records(history: list[dict]) -> list[dict]:
    """The held-out records of a log_history, oldest first."""
    return [h for h in history if PREFIX + "n" in h and "after" in h]


def lowest(best: dict | None, rec: dict) -> dict | None:
    """The record of the lowest held-out ce so far, given the previous one and a new record."""
    ce = rec.get(PREFIX + "ce")
    if ce is None:
        return best
    return rec if best is None or ce < best[PREFIX + "ce"] else best


def change(rec: dict, first: dict | None) -> float | None:
    """Relative change of held-out ce since `first` (0.05: 5% higher)."""
    a, b = (first or {}).get(PREFIX + "ce"), rec.get(PREFIX + "ce")
    return None if a is None or b is None or a == 0 else (b - a) / a


def describe(rec: dict, first: dict | None) -> str:
    """One line for the daily log and the verify report."""
    parts = [f"{k} {rec[PREFIX + k]:.4f}" for k in NUMBERS[:-1] if rec.get(PREFIX + k) is not None]
    moved = change(rec, first)
    if moved is not None and first is not rec:
        parts[0] += f" ({moved:+.1%} since {first['after']})"
    return (f"held-out eval after {rec['after']} (step {rec['step']}): " + ", ".join(parts or ["no numbers"])
            + f"; {rec.get(PREFIX + 'n', 0)} records")


def status_fields(history: list[dict], first: dict | None) -> dict:
    """`eval` (the newest numbers, with change_since_first) and `eval_history` for the status file."""
    recs = records(history)
    if not recs:
        return {"eval": None, "eval_history": []}

    def plain(r: dict) -> dict:
        return {"step": r["step"], "after": r["after"],
                **{k: r[PREFIX + k] for k in NUMBERS if r.get(PREFIX + k) is not None}}

    moved = change(recs[-1], first)
    return {"eval": {**plain(recs[-1]), "change_since_first": None if moved is None else round(moved, 6)},
            "eval_history": [plain(r) for r in recs[-IN_STATUS:]]}


def forgetting(first: dict | None, best: dict | None, last: dict, threshold: float) -> tuple[bool, str]:
    """(passed, detail): did the newest held-out ce rise more than `threshold` above the lowest?"""
    if best is None or last.get(PREFIX + "ce") is None:
        return True, "no held-out ce (the eval file has no teacher texts)"
    rise = change(last, best)
    since = change(last, first)
    detail = (f"ce {last[PREFIX + 'ce']:.4f} after {last['after']} (step {last['step']}), lowest "
              f"{best[PREFIX + 'ce']:.4f} after {best['after']}: {rise:+.1%} (threshold +{threshold:.0%})")
    if first is not None and since is not None:
        detail += f"; {since:+.1%} since {first['after']}"
    return rise <= threshold, detail
