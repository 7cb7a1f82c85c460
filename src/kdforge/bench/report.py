"""The bench's report: a table per task (mean and min-max over seeds per recipe x budget), the
share of the CE-to-teacher gap each recipe closes at equal answers and at equal priced spend,
the recipes the priced regime recommends, the issue's goals, and one PNG per task.

Gap closed = (q - q_CE) / (q_teacher - q_CE): 1 is the teacher, 0 is CE-only, for accuracy
(teacher ~0.99) and for KL (teacher 0) alike. At equal answers the CE reference is CE at the same
budget; at equal spend it is CE's mean quality interpolated in log $ between budgets (None when
the cell costs less or more than every CE cell: no CE run spent that much).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from kdforge.bench.recipes import RECIPES
from kdforge.bench.tasks import TASKS


def summarize(result: dict) -> list[dict]:
    """One row per (task, recipe, budget): mean/min/max quality over seeds, mean spend, gaps."""
    groups: dict[tuple, list[dict]] = {}
    for c in result["cells"]:
        groups.setdefault((c["task"], c["recipe"], c["budget"]), []).append(c)
    rows = []
    for (t, r, b), cs in groups.items():
        qs = [c["quality"] for c in cs]
        row = {"task": t, "recipe": r, "budget": b, "seeds": len(cs), "mean": statistics.mean(qs),
               "min": min(qs), "max": max(qs), "median": statistics.median(qs),
               "usd": statistics.mean(c["usd"] for c in cs),
               "priced_tokens": statistics.mean(c["priced_tokens"] for c in cs),
               "on_policy_steps": statistics.mean(c["on_policy_steps"] for c in cs)}
        if t == "lang":
            row["perplexity"] = statistics.mean(c["perplexity"] for c in cs)
        rows.append(row)
    for row in rows:
        teacher = result["teacher"][row["task"]]["quality"]
        ce = {x["budget"]: x for x in rows if x["task"] == row["task"] and x["recipe"] == "ce"}
        row["gap_answers"] = _gap(row["mean"], ce[row["budget"]]["mean"], teacher) if row["budget"] in ce else None
        ce_at = _interp_log([(x["usd"], x["mean"]) for x in ce.values()], row["usd"])
        row["ce_at_spend"] = ce_at
        row["gap_spend"] = None if ce_at is None else _gap(row["mean"], ce_at, teacher)
    rows.sort(key=lambda x: (x["task"], RECIPES.index(x["recipe"]), x["budget"]))
    for t in {x["task"] for x in rows}:
        _mark_recommended([x for x in rows if x["task"] == t], TASKS[t].higher_is_better)
    return rows


def _gap(q: float, ce: float, teacher: float) -> float | None:
    return None if abs(teacher - ce) < 1e-12 else (q - ce) / (teacher - ce)


def _interp_log(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x, linear in log x between the nearest points; None outside their range. An x within
    the 1e-9 rounding tolerance past an end point counts as that point."""
    pts = sorted(points)
    if not pts or x <= 0 or x < pts[0][0] * (1 - 1e-9) or x > pts[-1][0] * (1 + 1e-9):
        return None
    x = min(max(x, pts[0][0]), pts[-1][0])  # the tolerance let it past an end: clamp, or no pair brackets it
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return pts[0][1]  # a single point


LOCAL_ONLY = ("dense",)  # a paid API returns top-K logprobs, never full logits: not a priced-regime recipe


def _mark_recommended(rows: list[dict], higher: bool) -> None:
    """Priced regime: a row is recommended when no cheaper (or equal-cost) row is at least as good
    (the Pareto front of mean quality against mean $); local-only recipes are never recommended."""
    best = None
    for row in rows:
        row["recommended"] = False
    for row in sorted((x for x in rows if x["recipe"] not in LOCAL_ONLY),
                      key=lambda x: (x["usd"], -x["mean"] if higher else x["mean"])):
        better = best is None or (row["mean"] > best if higher else row["mean"] < best)
        row["recommended"] = better
        if better:
            best = row["mean"]


def goals(result: dict, rows: list[dict]) -> list[str]:
    """The issue's goals, each a line saying met / missed / not measured with the numbers."""
    out = []
    sort = [x for x in rows if x["task"] == "sort" and x["budget"] == 250 and x["recipe"] != "ce"]
    if sort and any(x["gap_answers"] is not None for x in sort):
        best = max((x for x in sort if x["gap_answers"] is not None), key=lambda x: x["gap_answers"])
        out.append(f"per answer, sort, 250 answers: best {best['recipe']} closes {_pct(best['gap_answers'])} of the "
                   f"CE-to-teacher gap (goal >= 90%): {'met' if best['gap_answers'] >= 0.9 else 'missed'}")
    else:
        out.append("per answer, sort, 250 answers: not measured (needs the sort task, budget 250, ce + another recipe)")
    rec = [x for x in rows if x.get("recommended") and x["recipe"] != "ce" and x["gap_spend"] is not None]
    below = [x for x in rec if x["gap_spend"] < 0]
    names = ", ".join(f"{x['task']} {x['recipe']} {x['budget']}" for x in below) or "none"
    if rec:
        out.append(f"per priced token: {len(rec)} recommended non-CE cells comparable with CE at equal $, "
                   f"{len(below)} below CE ({names}): "
                   f"{'met' if not below else 'missed'}")
    else:  # "0 below CE: met" would claim a goal that nothing measured
        out.append("per priced token: not measured (no recommended non-CE cell within CE's range of $)")
    lang = [x for x in rows if x["task"] == "lang" and x["recipe"] in ("topk_t1", "topk_t2") and x["gap_spend"] is not None]
    if lang:
        best = max(lang, key=lambda x: x["gap_spend"])
        per = ", ".join(f"{x['recipe']}@{x['budget']} {_pct(x['gap_spend'])}" for x in lang)
        out.append(f"per priced token, lang, off-policy top-k at equal $: {per}; best {_pct(best['gap_spend'])} "
                   f"(goal >= 25%): {'met' if best['gap_spend'] >= 0.25 else 'missed'}")
    else:
        out.append("per priced token, lang, off-policy top-k: not measured")
    if "langx" in result["plan"]["tasks"]:
        out.append(_cross_tokenizer_goal(result, rows))
    return out


UNITS = {"accuracy": "exact match", "kl": "KL(teacher||student), nats/token", "bpb": "held-out bits per byte"}


def _cross_tokenizer_goal(result: dict, rows: list[dict]) -> str:
    """Cross-tokenizer KD (langx, 250 answers): the share of the CE-to-teacher bits-per-byte gap top-k KD
    closes (goal >= 40%), the share of 1:1 positions, and what the alignment costs in training time."""
    at = {x["recipe"]: x for x in rows if x["task"] == "langx" and x["budget"] == 250}
    kd = [x for r, x in at.items() if r != "ce" and x["gap_answers"] is not None]
    if not kd:
        return "cross-tokenizer, langx, 250 answers: not measured (needs --task langx, budget 250, ce + topk_t1)"
    best = max(kd, key=lambda x: x["gap_answers"])
    cpu = {r: [c.get("cpu_seconds", 0) for c in result["cells"] if c["task"] == "langx" and c["budget"] == 250
               and c["recipe"] == r] for r in at}
    slow = statistics.mean(cpu[best["recipe"]]) / max(statistics.mean(cpu["ce"]), 1e-9) - 1
    return (f"cross-tokenizer, langx, 250 answers: {best['recipe']} (top-{TASKS['langx'].top_k} carried by bytes) closes "
            f"{best['gap_answers']:.0%} of the CE-to-teacher bits-per-byte gap (goal >= 40%): "
            f"{'met' if best['gap_answers'] >= 0.4 else 'missed'}; "
            f"{result['teacher']['langx'].get('one_to_one', 0):.0%} of positions 1:1; a cell's CPU time "
            f"{slow:+.0%} vs CE")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}".replace("-0%", "0%")


def table(result: dict, rows: list[dict]) -> str:
    """Markdown: one table per task, then the goals."""
    lines = []
    for t in result["plan"]["tasks"]:
        ref = result["teacher"][t]
        metric = TASKS[t].metric
        unit = UNITS[metric]
        extra = f", perplexity {ref['perplexity']:.3f}" if t == "lang" else ""
        if "one_to_one" in ref:
            extra += f"; the student's own tokenizer, {ref['one_to_one']:.0%} of its answer tokens 1:1 with the teacher's"
        lines += [f"### {t}: {unit} (teacher {ref['quality']:.4f}{extra}); {result['plan']['steps'][t]} steps", "",
                  "| recipe | answers | priced tokens | $ | on-policy steps | mean | min-max | "
                  + ("perplexity | " if t == "lang" else "") + "gap closed, equal answers | gap closed, equal $ | recommended ($) |",
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if t == "lang" else "") + "---:|---:|:-:|"]
        for x in (r for r in rows if r["task"] == t):
            f = "{:.3f}" if metric == "accuracy" else "{:.4f}"
            lines.append(f"| {x['recipe']} | {x['budget']} | {x['priced_tokens']:,.0f} | {x['usd']:.4f} | "
                         f"{x['on_policy_steps']:.0f} | {f.format(x['mean'])} | {f.format(x['min'])}-{f.format(x['max'])} | "
                         + (f"{x['perplexity']:.3f} | " if t == "lang" else "")
                         + f"{_pct(x['gap_answers'])} | {_pct(x['gap_spend'])} | {'yes' if x['recommended'] else ''} |")
        lines.append("")
    lines += ["Priced regime: answers cost prompt tokens at $%g/M and completion tokens at $%g/M; on-policy "
              "scoring costs the scored tokens at $%g/M. dense needs a local teacher's full logits (no API "
              "returns them): never recommended there. '-' at equal $: no CE cell spent that much."
              % (result["plan"]["price_input"], result["plan"]["price_output"], result["plan"]["price_input"]), "",
              "Goals:"] + [f"- {g}" for g in goals(result, rows)]
    return "\n".join(lines) + "\n"


def plots(result: dict, rows: list[dict], out: Path) -> list[Path]:
    """One PNG per task: quality against answers and against $, a line per recipe, min-max bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for t in result["plan"]["tasks"]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, key, label in ((axes[0], "budget", "teacher answers (local teacher)"),
                               (axes[1], "usd", "$ at a fictitious API price (answers + scoring)")):
            for r in result["plan"]["recipes"]:
                pts = sorted((x for x in rows if x["task"] == t and x["recipe"] == r), key=lambda x: x[key])
                if not pts:
                    continue
                xs, ys = [p[key] for p in pts], [p["mean"] for p in pts]
                err = [[p["mean"] - p["min"] for p in pts], [p["max"] - p["mean"] for p in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=r)
            ax.axhline(result["teacher"][t]["quality"], color="k", ls="--", lw=1, label="teacher")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(UNITS[TASKS[t].metric])
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"kdforge bench distill: {t} (mean of {result['plan']['seeds']} seeds, bars min-max)")
        fig.tight_layout()
        p = out / f"{t}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths
