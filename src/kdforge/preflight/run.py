"""`kdforge preflight`: the seed plan's "before spending money" checks on the user's own setup.

    report = run_preflight(PreflightOptions(configs=["configs/my.yaml"], only="pipeline"))

Order: the free parts first (config, memory), then the paid ones (api, generation, budget) and
training on what generation wrote. A teacher that refuses us stops everything after it (exit 4:
nothing else spends). Everything happens in the scratch dir; the report goes to stdout (by the
CLI), `preflight_report.md` and `preflight_report.json` there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kdforge.config import Config, GenerateSection, from_dict, load_section, merge_configs
from kdforge.errors import ConfigError, KdforgeError, UsageError
from kdforge.preflight import machine, teacher, training
from kdforge.preflight.report import Item, Report, failed, render_json, render_markdown, skipped
from kdforge.teacher.plan import ContextFit, build_jobs, context_fit, plan_context_fit
from kdforge.teacher.pricing import unknown_price_fix
from kdforge.teacher.prompts import plan_prompts

PARTS = ("api", "generation", "budget", "config", "memory", "training", "pipeline")
# Which items each part checks; `pipeline` is all of them.
ITEMS = {"api": ["api"], "generation": ["generation", "dataset", "quality"], "budget": ["budget"],
         "config": ["config"], "memory": ["memory"], "training": ["smoke", "training", "resume"]}
# Parts a part needs the results of: training trains on generated samples, sized by memory.
NEEDS = {"training": ["memory", "generation"]}
RUN_ORDER = ("config", "memory", "api", "generation", "budget", "training")


@dataclass
class PreflightOptions:
    configs: list[str]
    teacher: str | None = None
    model: str | None = None
    prompts: list[str] = field(default_factory=list)
    budget_limit: float = 1.0
    samples: int = 20
    only: str = "pipeline"
    workdir: str | None = None
    price_input: float | None = None
    price_output: float | None = None
    api_key_env: str | None = None
    max_tokens: int | None = None  # per answer; None: generate.max_tokens
    overrides: list[str] = field(default_factory=list)  # `a.b=c`, as train and daemon take them
    log: object = print  # progress lines


def parts_to_run(only: str) -> list[str]:
    if only not in PARTS:
        raise UsageError(f"--only {only!r}: use one of {', '.join(PARTS)}")
    chosen = set(RUN_ORDER) if only == "pipeline" else {only, *NEEDS.get(only, [])}
    return [p for p in RUN_ORDER if p in chosen]


def _generate_section(opts: PreflightOptions) -> GenerateSection:
    flags = dict(teacher=opts.teacher, model=opts.model, prompts=opts.prompts or None, max_tokens=opts.max_tokens,
                 price_input=opts.price_input, price_output=opts.price_output, api_key_env=opts.api_key_env,
                 top_logprobs=_kd_top_logprobs(merge_configs(opts.configs, opts.overrides)))
    return load_section(opts.configs, "generate", flags, opts.overrides)


def _kd_top_logprobs(merged: dict) -> int | None:
    """The top-k the samples need when the config trains sparse KD on stored logprobs (a KL loss, no
    teacher.path or teacher.url to score): teacher.top_logprobs, unless generate.top_logprobs is set.
    Without it the training item's samples carried none and KD stopped on "no teacher_logprobs"."""
    loss, teacher = merged.get("loss") or {}, merged.get("teacher") or {}
    if "top_logprobs" in (merged.get("generate") or {}) or loss.get("kind", "ce") == "ce":
        return None
    if teacher.get("path") or teacher.get("url"):
        return None
    return teacher.get("top_logprobs", 20)


def _tokenizer_vocab(cfg: Config | None) -> int | None:
    path = cfg and (cfg.io.tokenizer_path or cfg.model.path)
    if not path or not Path(path).exists():
        return None
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False))


class Preflight:
    """The run's state between parts: options, configs, budget, what earlier parts produced."""

    def __init__(self, opts: PreflightOptions, work: Path):
        self.opts, self.work, self.log = opts, work, opts.log
        self.items: dict[str, Item] = {}
        self.merged = merge_configs(opts.configs, opts.overrides)
        self.cfg: Config | None = None
        self.config_error: ConfigError | None = None
        try:
            self.cfg = from_dict(self.merged, ", ".join(opts.configs))
        except ConfigError as e:
            self.config_error = e
        self.gen: GenerateSection = _generate_section(opts)
        self.prices = None
        self.price_error: KdforgeError | None = None
        try:
            self.prices = teacher.section_prices(self.gen)
        except KdforgeError as e:
            self.price_error = e
        self.purse = teacher.Purse(opts.budget_limit, self.prices)
        self.api_key = os.environ.get(self.gen.api_key_env) or None
        self.samples = teacher.Samples(None, 0)
        self.student = None
        self.refused = False
        self._context: list[ContextFit | None] = []  # [sent, whole]: read once, when a paid part first needs it

    # ---------------------------------------------------------------- parts
    def config(self) -> None:
        if self.config_error is not None:
            e = self.config_error
            self.items["config"] = failed("config", "; ".join(f"{f}: {m}" for f, m in e.problems),
                                          f"fix {', '.join(sorted({f for f, _ in e.problems}))} in the config",
                                          problems=[list(p) for p in e.problems])
            return
        self.items["config"] = machine.check_config_item(self.cfg, self.merged)

    def memory(self) -> None:
        if self.cfg is None:
            self.items["memory"] = skipped("memory", "not run: the config does not load (see the config item)")
            return
        item, self.student = machine.check_memory(self.cfg, _tokenizer_vocab(self.cfg))
        self.items["memory"] = item

    def _teacher_problem(self, context: bool = True) -> tuple[str, str] | None:
        """(what is missing, the fix) when no teacher part can run; `context`: also when the planned
        requests do not fit the teacher's advertised context (the api probe's few tokens do)."""
        if not self.gen.teacher or not self.gen.model:
            return ("no teacher configured",
                    "set generate.teacher and generate.model in the config, or pass --teacher URL --model NAME")
        if self.price_error is not None:
            return str(self.price_error), "give both generate.price_input and generate.price_output, or neither"
        if self.prices is None:
            return (f"no prices for model {self.gen.model!r} (not in the shipped table): the preflight budget cannot "
                    "be enforced", f"{unknown_price_fix(config=True)}; or {unknown_price_fix()}")
        fit = self._context_fit() if context else None
        if fit is not None and fit.over:
            return fit.problem(), fit.fix()
        return None

    def _context_fit(self, whole: bool = False) -> ContextFit | None:
        """The requests the preflight sends (the plan's first max(samples, 20)), or with `whole` the
        real run's (the plan's first generate.total), against the context the teacher advertises
        (None: it does not say). Prompts are counted by the teacher's /tokenize where it has one."""
        if not self._context:
            jobs = build_jobs(self.gen, plan_prompts(self.gen.prompts, self.gen.mix, self.gen.seed,
                                                     warn=lambda m: None))
            sent = max(self.opts.samples, 20)
            plan = jobs[:max(self.gen.total or len(jobs), sent)]
            fit, counts = plan_context_fit(self.gen, plan, self.api_key)
            self._context += [fit and context_fit(self.gen, plan[:sent], fit.context, counts, fit.source), fit]
        return self._context[1 if whole else 0]

    def _with_context(self, item: Item) -> Item:
        """The generation item, told how the real run's prompts fit the context: a warning naming
        those that do not (the preflight's own requests fit, or it would not have run)."""
        fit = self._context_fit(whole=True)
        if fit is None or item.status not in ("pass", "warn"):
            return item
        item.numbers.update(longest_prompt_tokens=fit.longest_prompt, prompt_tokens_exact=fit.exact,
                            prompts_over_context=fit.over)
        if not fit.over:
            item.evidence += f"; context: {fit.line()}"
            return item
        item.evidence += f"; the real run: {fit.problem()}"
        item.fix = f"{item.fix}; {fit.fix()}" if item.fix else fit.fix()
        item.status = "warn"
        return item

    def _needs_teacher(self, key: str, context: bool = True) -> bool:
        problem = self._teacher_problem(context)
        if problem:
            self.items[key] = failed(key, f"cannot run: {problem[0]}", problem[1])
        return problem is None

    def api(self) -> None:
        if self._needs_teacher("api", context=False):
            self.items["api"] = teacher.check_api(self.gen, self.work / "api", self.purse, self.api_key)

    def generation(self) -> None:
        if not self._needs_teacher("generation"):
            return
        item, self.samples = teacher.check_generation(self.gen, self.work / "generation", self.purse,
                                                      self.api_key, self.opts.samples)
        self.items["generation"] = self._with_context(item)
        self._dataset_items()

    def _dataset_items(self) -> None:
        from kdforge.preflight.dataset import check_dataset, check_quality

        if self.samples.path is None:
            for key in ("dataset", "quality"):
                self.items[key] = skipped(key, "not run: no samples were generated (see the generation item)")
            return
        if self.cfg is not None:
            tok, seq = self.cfg.io.tokenizer_path or self.cfg.model.path, max(self.cfg.train.seq_lengths)
        else:  # a config that does not validate may still name its tokenizer
            tok, seq = (self.merged.get("io") or {}).get("tokenizer_path"), 4096
        self.items["dataset"] = check_dataset(self.samples.path, tok, seq)
        self.items["quality"] = check_quality(self.samples.path, tok)

    def budget(self) -> None:
        if self._needs_teacher("budget"):
            self.items["budget"] = teacher.check_budget(self.gen, self.work / "budget", self.purse, self.api_key)

    def training(self) -> None:
        self.items["smoke"] = training.check_smoke(self.work / "smoke")
        why = None
        if self.cfg is None or self.items.get("config", Item("config", "pass", "")).status == "fail":
            why = "not run: the config has problems (see the config item)"
        elif self.samples.path is None:
            why = "not run: no generated samples to train on (see the generation item)"
        elif self.student is None:
            why = "not run: the memory part did not run"
        if why:
            for key in ("training", "resume"):
                self.items[key] = skipped(key, why)
            return
        work = self.work / "training"
        item, losses = training.check_training(self.merged, self.samples.path, work, self.student)
        self.items["training"] = item
        if item.status == "fail":
            self.items["resume"] = skipped("resume", "not run: training failed")
            return
        self.items["resume"] = training.check_resume(self.merged, self.samples.path, work, self.student, losses)

    # ---------------------------------------------------------------- the run
    def run(self, parts: list[str]) -> None:
        for part in parts:
            if self.refused:
                for key in ITEMS[part]:
                    self.items[key] = skipped(key, "not run: the teacher refused us (see above); nothing else spends")
                continue
            self.log(f"preflight: {part} ...")
            t0 = time.perf_counter()
            getattr(self, part)()
            for key in ITEMS[part]:
                it = self.items.get(key)
                if it is not None:
                    self.refused |= it.refused
                    self.log(f"preflight: {key}: {it.status} ({time.perf_counter() - t0:.1f}s)")


def run_preflight(opts: PreflightOptions) -> Report:
    """Run the chosen parts in a scratch dir; write the reports there (a temp dir, no --workdir, is
    removed instead when nothing failed: only a failure needs its evidence); return the Report."""
    parts = parts_to_run(opts.only)
    if opts.samples <= 0:
        raise UsageError(f"--samples must be positive, got {opts.samples}")
    if not opts.budget_limit >= 0 or opts.budget_limit == float("inf"):
        raise UsageError(f"--budget-limit must be a finite amount of USD >= 0, got {opts.budget_limit}")
    work = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="kdforge-preflight-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pf = Preflight(opts, work.resolve())
    chosen = set(parts) if opts.only == "pipeline" else {opts.only}
    pf.run(parts)
    for part in RUN_ORDER:  # items of parts only run as prerequisites still show: they ran
        if part not in chosen and part not in parts:
            for key in ITEMS[part]:
                pf.items.setdefault(key, skipped(key, f"not run (--only {opts.only})"))
    report = Report(pf.items, pf.purse.spent if pf.prices is not None else None, opts.budget_limit, str(work),
                    pf.gen.teacher, pf.gen.model, list(opts.configs), parts, time.perf_counter() - t0)
    if opts.workdir is None and report.exit_code == 0:  # a temp dir: its evidence is needed only on failure
        shutil.rmtree(work, ignore_errors=True)
        report.kept = False
        return report
    (work / "preflight_report.md").write_text(render_markdown(report), encoding="utf-8")
    (work / "preflight_report.json").write_text(render_json(report), encoding="utf-8")
    return report
