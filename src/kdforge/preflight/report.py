"""The preflight report: the seed plan's Summary Checklist, one marked line per item.

Items come in a fixed order: two setup lines the checklist takes for granted (the teacher's API,
the config), then the seed's eight checklist items in the seed's order, worded as the seed words
them (its `make smoke_training` is `kdforge smoke` here). Each carries a mark (pass / warn / fail /
skip), its evidence in numbers, and for a failure the fix. The money spent is shown against the
budget.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# (key, title). The checklist titles are the seed's Summary Checklist, in its order.
SETUP_ITEMS = (
    ("api", "Teacher API: connectivity, authentication, model, rate-limit tier"),
    ("config", "Config: paths exist (or are created later), batch size and sequence lengths valid"),
)
CHECKLIST = (
    ("smoke", "Toy training test passes (`kdforge smoke`)"),
    ("generation", "Small dataset (20 samples) generated successfully"),
    ("dataset", "Dataset loads correctly in training script"),
    ("training", "Training script runs 5+ steps without errors"),
    ("budget", "Budget enforcement stops at limit"),
    ("resume", "Resume from checkpoint works"),
    ("memory", "Memory requirements verified"),
    ("quality", "Data quality acceptable"),
)
TITLES = dict(SETUP_ITEMS + CHECKLIST)
MARKS = {"pass": "PASS", "warn": "WARN", "fail": "FAIL", "skip": "SKIP"}


@dataclass
class Item:
    """One checked item. `refused`: the teacher refused us (the run exits 4)."""

    key: str
    status: str  # pass | warn | fail | skip
    evidence: str
    fix: str | None = None
    numbers: dict = field(default_factory=dict)
    refused: bool = False

    @property
    def title(self) -> str:
        return TITLES[self.key]


def passed(key: str, evidence: str, **numbers) -> Item:
    return Item(key, "pass", evidence, numbers=numbers)


def warned(key: str, evidence: str, fix: str | None = None, **numbers) -> Item:
    return Item(key, "warn", evidence, fix, numbers=numbers)


def failed(key: str, evidence: str, fix: str, **numbers) -> Item:
    return Item(key, "fail", evidence, fix, numbers=numbers)


def skipped(key: str, why: str) -> Item:
    return Item(key, "skip", why)


@dataclass
class Report:
    """Every item (one per key; unchecked ones `skip`), the spend, and where the scratch run lives."""

    items: dict[str, Item]
    spent_usd: float | None  # None: no prices known, nothing could be counted
    budget_usd: float
    workdir: str
    teacher: str | None
    model: str | None
    configs: list[str]
    parts: list[str]
    seconds: float = 0.0
    kept: bool = True  # the scratch dir is still there (False: a temp dir removed after a clean run)

    def ordered(self) -> list[Item]:
        return [self.items.get(k) or skipped(k, "not run") for k, _ in SETUP_ITEMS + CHECKLIST]

    @property
    def exit_code(self) -> int:
        """0 nothing failed, 2 a check failed, 4 the teacher refused us (SPEC "Exit codes")."""
        items = self.ordered()
        if any(i.refused for i in items):
            return 4
        return 2 if any(i.status == "fail" for i in items) else 0

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in MARKS}
        for i in self.ordered():
            out[i.status] += 1
        return out

    def spend_line(self) -> str:
        if self.spent_usd is None:
            return f"spent: unknown (no prices for the teacher) · budget ${self.budget_usd:.2f}"
        return (f"spent: ${self.spent_usd:.4f} of the ${self.budget_usd:.2f} budget "
                f"({100 * self.spent_usd / self.budget_usd if self.budget_usd else 0:.1f}%; never passed)")

    def verdict(self) -> str:
        c = self.counts()
        code = self.exit_code
        word = {0: "READY", 2: "NOT READY", 4: "TEACHER REFUSED"}[code]
        return (f"{word}: {c['pass']} passed, {c['warn']} warned, {c['fail']} failed, {c['skip']} not run "
                f"(exit {code}) in {self.seconds:.0f}s")

    def to_dict(self) -> dict:
        return {"exit_code": self.exit_code, "verdict": self.verdict(), "spent_usd": self.spent_usd,
                "budget_usd": self.budget_usd, "workdir": self.workdir, "workdir_kept": self.kept, "teacher": self.teacher,
                "model": self.model, "configs": self.configs, "parts": self.parts, "seconds": round(self.seconds, 1),
                "items": [{"key": i.key, "title": i.title, **{k: v for k, v in asdict(i).items() if k != "key"}}
                          for i in self.ordered()]}


def _lines(item: Item) -> list[str]:
    out = [f"  [{MARKS[item.status]}] {item.title}", f"         {item.evidence}"]
    if item.fix:
        out.append(f"         fix: {item.fix}")
    return out


def render_text(r: Report) -> str:
    """What `kdforge preflight` prints: setup lines, the checklist, spend, verdict."""
    head = [f"kdforge preflight · teacher {r.teacher or '-'} (model {r.model or '-'}) · "
            f"config {', '.join(r.configs) or '-'} · parts {', '.join(r.parts)}",
            f"scratch dir: {r.workdir} (nothing written elsewhere"
            + ("" if r.kept else "; removed: nothing failed, --workdir DIR keeps it") + ")", "", "Setup:"]
    body = []
    for key, _ in SETUP_ITEMS:
        body += _lines(r.items.get(key) or skipped(key, "not run"))
    body += ["", "Summary Checklist (seed 000, before generating the full dataset):"]
    for key, _ in CHECKLIST:
        body += _lines(r.items.get(key) or skipped(key, "not run"))
    return "\n".join(head + body + ["", r.spend_line(), r.verdict()])


def render_markdown(r: Report) -> str:
    """`preflight_report.md`: the same items as a checklist."""
    box = {"pass": "[x] ✅", "warn": "[x] ⚠️", "fail": "[ ] ❌", "skip": "[ ] ⏭️"}

    def row(i: Item) -> list[str]:
        out = [f"- {box[i.status]} **{i.title}** — {MARKS[i.status]}", f"  - {i.evidence}"]
        if i.fix:
            out.append(f"  - fix: {i.fix}")
        return out

    lines = ["# kdforge preflight report", "",
             f"- teacher: `{r.teacher or '-'}` (model `{r.model or '-'}`)",
             f"- config: {', '.join(f'`{c}`' for c in r.configs) or '-'}",
             f"- parts: {', '.join(r.parts)}", f"- scratch dir: `{r.workdir}`",
             f"- {r.spend_line()}", f"- **{r.verdict()}**", "", "## Setup", ""]
    for key, _ in SETUP_ITEMS:
        lines += row(r.items.get(key) or skipped(key, "not run"))
    lines += ["", "## Summary Checklist", "", "Before generating full dataset:", ""]
    for key, _ in CHECKLIST:
        lines += row(r.items.get(key) or skipped(key, "not run"))
    return "\n".join(lines) + "\n"


def render_json(r: Report) -> str:
    return json.dumps(r.to_dict(), indent=2)
