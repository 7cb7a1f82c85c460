"""Typed config tree (pydantic), YAML merge, `a.b=c` overrides and validation.

Defaults live here and only here. Each component takes its own section. `load_config` merges
YAML files left to right, applies overrides, and raises one ConfigError listing every problem
(each naming its field); `check_config` adds the checks that need the filesystem (paths,
tokenizer vocabulary, LoRA target modules).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdforge.errors import ConfigError, UsageError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraCfg(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None: PEFT's "all-linear", every Linear and Conv1D layer but the output head, whatever the
    # architecture names them (q_proj in Llama, c_attn in GPT-2, dense/fc1 in Phi).
    target_modules: list[str] | None = None


class ModelSection(Section):
    """Either a preset/number-built student or `path` to any local causal LM."""

    preset: str | None = "toy"
    path: str | None = None
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_head: int | None = None
    vocab_size: int | None = None
    ffn_dim: int | None = None
    max_seq_len: int | None = None
    rope_theta: float | None = None
    tie_embeddings: bool | None = None
    lora: LoraCfg | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    def model_cfg(self):
        """The ModelCfg the numbers describe: the preset, overridden by any number given."""
        from kdforge.model.shape import ModelCfg, preset

        # No preset: every number from this section; the vocabulary from the tokenizer unless given.
        base = preset(self.preset) if self.preset else ModelCfg(vocab_size=None)
        over = {k: v for k, v in self.model_dump().items()
                if k in ModelCfg.__dataclass_fields__ and v is not None}
        from dataclasses import replace
        return replace(base, **over)


class IOSection(Section):
    tokenizer_path: str | None = None
    train_shards: list[str] = []
    eval_shards: list[str] = []
    output_dir: str = "runs/kdforge"
    reasoning: Literal["think", "drop"] = Field("think", description=(
        "a thinking teacher's teacher_reasoning: 'think' trains it before the answer (<think>...</think>, or the "
        "chat template's own thinking format), 'drop' trains the answer only (records.Record.training_response)"))

    @field_validator("train_shards", "eval_shards", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class TeacherSection(Section):
    path: str | None = None  # local teacher model for dense logit KD
    url: str | None = None  # an OpenAI-compatible server that scores tokens (on-policy KD over HTTP)
    model: str | None = None  # the model to ask `url` for; None: the server's only one
    api_key_env: str = "OPENAI_API_KEY"
    top_logprobs: int = Field(20, gt=0, le=20)  # teacher alternatives per scored token (K)


class OnPolicySection(Section):
    """On-policy distillation: the student answers, the teacher scores the student's own tokens."""

    fraction: float = Field(0.0, ge=0, le=1)  # probability that an optimizer step is on-policy
    max_new_tokens: int = Field(128, gt=0)  # tokens the student samples per prompt
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    prompts: list[str] = []  # prompt-only files (JSONL prompt/messages, or text); else the step's data

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class LossSection(Section):
    kind: Literal["ce", "fkl", "rkl", "jsd"] = "ce"
    kd_weight: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.5, ge=0, le=1)
    # Tokens per chunk for the chunked loss (logits recomputed in backward); null = plain; "auto" =
    # chunks of 256 once the labelled tokens x vocab would pass 16M logits (64 MB in fp32).
    chunk_size: int | Literal["auto"] | None = "auto"
    # A teacher with another tokenizer (stored top-k, or teacher.path): "auto" carries its
    # distribution onto the student's tokens by bytes (data/align.py) and logs the share of
    # positions that aligned 1:1; "off" refuses such data (exit 2), as before.
    cross_tokenizer: Literal["auto", "off"] = "auto"

    @field_validator("chunk_size")
    @classmethod
    def _positive_chunk(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be positive, 'auto' or null")
        return v


class TrainSection(Section):
    micro_batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    seq_lengths: list[int] = [512]
    max_steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: share of steps spent decaying
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0)
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(3, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    eval_batches: int = Field(8, gt=0)
    log_steps: int = Field(1, gt=0)
    seed: int = 0
    packing: bool = False
    gradient_checkpointing: bool = False
    bf16: bool | Literal["auto"] = "auto"
    device: str = "auto"
    fsdp: bool = False
    # Experiment trackers fed every metrics.jsonl record (train/reporters.py), all offline-capable.
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []

    @field_validator("report_to", mode="before")
    @classmethod
    def _name_or_list(cls, v):
        return [] if v in (None, "none") else [v] if isinstance(v, str) else v

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, v):
        return list(dict.fromkeys(v))  # `[tensorboard, tensorboard]` is one writer, not two

    @field_validator("seq_lengths", mode="before")
    @classmethod
    def _int_or_list(cls, v):
        return [v] if isinstance(v, int) else v

    @field_validator("seq_lengths")
    @classmethod
    def _positive(cls, v):
        if not v:
            raise ValueError("needs at least one sequence length")
        bad = [x for x in v if x <= 0]
        if bad:
            raise ValueError(f"sequence lengths must be positive, got {bad}")
        return v

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        return self


class DaemonSection(Section):
    base_model: str | None = None
    save_steps: int = Field(100, gt=0)
    save_total_limit: int = Field(3, gt=0)
    epochs_per_batch: float = Field(1, gt=0)
    snapshot_time: str = "03:00"
    snapshot_keep: int = Field(7, gt=0)
    consolidate_every_batches: int | None = Field(None, gt=0)
    consolidate_daily: bool = False
    delete_processed: bool = True
    archive_dir: str | None = None  # with delete_processed false: where trained files go (default BASE/processed)
    # constant: train.lr from the first step; wsd: train.warmup_steps of warmup, then stable (an
    # open-ended stream never reaches a decay phase). The scheduler state carries across batches.
    schedule: Literal["constant", "wsd"] = "constant"
    poll_interval: float = Field(2.0, gt=0)  # seconds between inbox scans
    settle_seconds: float = Field(2.0, ge=0)  # a file must be unchanged this long to be taken
    # a bigger inbox file is rejected unread (1 GiB): one file must not exhaust memory or disk time
    max_batch_bytes: int = Field(1073741824, gt=0)
    # held-out KD data (JSONL, as `kdforge eval --data`) scored after every batch and consolidation:
    # ce, perplexity, kl (plus exact_match, token_f1, accuracy with eval_greedy, which generates: slower)
    eval_file: str | None = None
    eval_greedy: bool = False
    # `kdforge verify` fails when the latest held-out ce is more than this share above the lowest it
    # reached (0.10: 10% relative): the student is forgetting what earlier batches taught it
    forgetting_threshold: float = Field(0.10, gt=0)

    @field_validator("snapshot_time")
    @classmethod
    def _hhmm(cls, v):
        try:
            h, m = v.split(":")
            assert 0 <= int(h) < 24 and 0 <= int(m) < 60
        except Exception:
            raise ValueError(f"must be HH:MM (24h), got {v!r}") from None
        return v


class GenerateSection(Section):
    teacher: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    out: str | None = None
    checkpoint_dir: str | None = None
    cache_dir: str | None = None
    prompts: list[str] = []
    mix: dict[str, float] = {}  # source/category -> weight
    total: int | None = Field(None, gt=0)
    budget_limit: float | None = Field(None, ge=0)
    price_input: float | None = Field(None, ge=0)  # USD per million input tokens
    price_output: float | None = Field(None, ge=0)  # USD per million output tokens
    concurrency: int = Field(8, gt=0)
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)
    delay: float = Field(0.0, ge=0)  # minimum seconds between request starts
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int = Field(0, ge=0, le=20)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(8, ge=0)
    retry_base: float = Field(1.0, gt=0)  # seconds: first backoff after a 5xx/timeout (doubles, jittered)
    retry_max: float = Field(60.0, gt=0)  # seconds: longest backoff
    seed: int = 0
    system_prompt: str | None = None
    # Batch API (--batch): files of batch_size rows at batch_discount x the online price (unless the
    # price table has a batch price); failed or expired rows retried online or in the next file.
    batch: bool = False
    batch_size: int = Field(1000, gt=0, le=50000)  # OpenAI's cap: 50,000 requests a file
    batch_discount: float = Field(0.5, gt=0, le=1)
    batch_fallback: Literal["online", "batch"] = "online"
    batch_poll: float = Field(10.0, gt=0)  # seconds before the first status poll; backs off to 60 s

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class Config(Section):
    model: ModelSection = ModelSection()
    io: IOSection = IOSection()
    teacher: TeacherSection = TeacherSection()
    on_policy: OnPolicySection = OnPolicySection()
    loss: LossSection = LossSection()
    train: TrainSection = TrainSection()
    daemon: DaemonSection = DaemonSection()
    generate: GenerateSection = GenerateSection()


# ----------------------------------------------------------------------------- loading

def deep_merge(a: dict, b: dict) -> dict:
    """b over a; dicts merge recursively, everything else replaces."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([(item, "overrides take the form section.key=value, e.g. train.lr=1e-4")])
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([(item, "overrides take the form section.key=value")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([("--config", f"file not found: {p}")])
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError([("--config", f"{p}{where}: invalid YAML ({getattr(e, 'problem', e)})")]) from None
    if not isinstance(data, dict):
        raise ConfigError([("--config", f"{p}: the top level must be a mapping of sections")])
    return data


def merge_configs(paths: list[str | Path], overrides: list[str] | None = None) -> dict:
    """The seed's `merge_configs`: YAML files merged left to right, then overrides. Returns a dict."""
    data: dict = {}
    for p in paths:
        data = deep_merge(data, read_yaml(p))
    for item in overrides or []:
        keys, value = parse_override(item)
        d = data
        for k in keys[:-1]:
            d = d.setdefault(k, {})
            if not isinstance(d, dict):
                raise ConfigError([(".".join(keys), f"'{k}' is not a section")])
        d[keys[-1]] = value
    return data


def _pydantic_problems(e: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            section = ".".join(str(x) for x in err["loc"][:-1])
            msg = "unknown key" + (f" in section '{section}'" if section else " (unknown section)") + \
                  "; check the spelling against configs/toy.yaml"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        out.append((loc, msg))
    return out


def _drop(data: dict, loc: tuple) -> None:
    d = data
    for k in loc[:-1]:
        if not isinstance(d, dict) or k not in d:
            return
        d = d[k]
    if isinstance(d, dict):
        d.pop(loc[-1], None)


def _typed(data: dict) -> tuple[Config | None, list[tuple[str, str]]]:
    """Type-check; on errors also return what the rest of the config would give, so that the
    static checks still run and every problem is reported at once."""
    import copy

    try:
        return Config.model_validate(data), []
    except ValidationError as e:
        problems = _pydantic_problems(e)
        rest = copy.deepcopy(data)
        for err in e.errors():
            _drop(rest, tuple(x for x in err["loc"] if isinstance(x, str)))
        try:
            return Config.model_validate(rest), problems
        except ValidationError:
            return None, problems


def from_dict(data: dict, source: str | None = None, check_files: bool = False,
              for_run: bool = False) -> Config:
    cfg, problems = _typed(data)
    if cfg is not None:
        problems += static_problems(cfg)
        if check_files:
            problems += check_config(cfg, for_run=for_run)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(paths: list[str | Path], overrides: list[str] | None = None) -> Config:
    """Merge, override, type-check and statically validate. Raises ConfigError listing everything."""
    source = ", ".join(str(p) for p in paths) or None
    return from_dict(merge_configs(paths, overrides), source)


def load_section(paths: list[str | Path], name: str, values: dict[str, Any] | None = None,
                 overrides: list[str] | None = None):
    """One section of the merged config files (`a.b=c` overrides applied), with `values` (a
    command's flags that were given) over the files' keys, type-checked with the whole tree. For
    commands that use one section (`generate`) and so skip the training checks. Raises
    ConfigError listing everything."""
    data = merge_configs(paths, overrides)
    data[name] = {**(data.get(name) or {}), **{k: v for k, v in (values or {}).items() if v is not None}}
    cfg, problems = _typed(data)
    if problems:
        raise ConfigError(problems, ", ".join(str(p) for p in paths) or "flags")
    return getattr(cfg, name)


# ----------------------------------------------------------------------------- validation

def static_problems(cfg: Config) -> list[tuple[str, str]]:
    """Checks that need no filesystem: shapes, batch arithmetic, sequence lengths."""
    p: list[tuple[str, str]] = []
    m = cfg.model
    if m.path is None and not daemon_only(cfg):
        if m.preset is not None:
            from kdforge.model.shape import PRESETS
            if m.preset not in PRESETS:
                p.append(("model.preset", f"unknown preset {m.preset!r}; known: {', '.join(PRESETS)}"))
                return p
        mc = m.model_cfg()
        p += [(f"model.{f}", msg) for f, msg in mc.problems()]
        for L in cfg.train.seq_lengths:
            if L > mc.max_seq_len:
                p.append(("train.seq_lengths", f"{L} is above the model's max_seq_len ({mc.max_seq_len}); "
                          f"lower it or raise model.max_seq_len"))
    t = cfg.train
    if t.max_steps is None and t.epochs is None and not daemon_only(cfg):
        p.append(("train.max_steps", "set train.max_steps or train.epochs"))
    if t.max_steps is not None and t.epochs is not None:
        p.append(("train.epochs", "set train.max_steps or train.epochs, not both"))
    if t.max_steps is not None and t.warmup_steps >= t.max_steps and t.max_steps > 1:
        p.append(("train.warmup_steps", f"{t.warmup_steps} is not below train.max_steps ({t.max_steps})"))
    if t.seq_lengths != sorted(t.seq_lengths):
        p.append(("train.seq_lengths", f"a curriculum goes from short to long; got {t.seq_lengths}"))
    if t.max_steps is not None and len(t.seq_lengths) > t.max_steps:
        p.append(("train.seq_lengths", f"{len(t.seq_lengths)} curriculum stages for {t.max_steps} steps"))
    if t.micro_batch_size * t.grad_accum > 65536:
        p.append(("train.grad_accum", f"global batch {t.micro_batch_size}x{t.grad_accum} is not sensible"))
    # kd_weight 0 with on-policy steps: dataset steps train CE alone, on-policy steps the divergence.
    if cfg.loss.kind != "ce" and cfg.loss.kd_weight == 0 and cfg.on_policy.fraction == 0:
        p.append(("loss.kd_weight", f"loss.kind={cfg.loss.kind} with kd_weight 0 trains no KD; use kind: ce"))
    return p


def looks_like_hub_id(s: str) -> bool:
    """'org/name' with no local file: a Hugging Face hub id (allowed where there is a network)."""
    import re
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not s.startswith((".", "/"))


def _tokenizer_vocab(path: str) -> int | None:
    from kdforge.data.vocab import tokenizer_vocab_size  # reads tokenizer.json without transformers
    return tokenizer_vocab_size(path)


def _model_vocab(path: str) -> int | None:
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, trust_remote_code=False).vocab_size


def daemon_only(cfg: Config) -> bool:
    """A `kdforge daemon` config: a base model and no training shards (the inbox is the data)."""
    return cfg.daemon.base_model is not None and not cfg.io.train_shards


def check_config(cfg: Config, for_run: bool = False, job: str = "train") -> list[tuple[str, str]]:
    """Checks that touch the filesystem. `for_run=False` (config validate) lets outputs and
    data shards that a run will create be absent; `for_run=True` requires every input."""
    p: list[tuple[str, str]] = []
    io = cfg.io
    tok_vocab = None
    if job == "train" and daemon_only(cfg):
        job = "daemon"
    if job == "daemon":
        bm = cfg.daemon.base_model
        if not bm and not cfg.model.path:
            p.append(("daemon.base_model", "set the base model folder the daemon trains (a local HF model)"))
        elif bm and not cfg.model.path and (Path(bm) / "config.json").is_file():
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": bm})})
        elif bm and not cfg.model.path and (for_run or Path(bm).exists()):
            p.append(("daemon.base_model", f"no Hugging Face model folder (config.json) at {bm} "
                      "(make one: kdforge init-model --preset toy --tokenizer DIR --out DIR)"))
    if job == "train":
        if cfg.model.lora and not cfg.model.path:
            p.append(("model.lora", "LoRA needs a pretrained base: set model.path (or drop model.lora)"))
        if not io.tokenizer_path and not cfg.model.path:
            p.append(("io.tokenizer_path", "set a tokenizer folder (make one: kdforge tokenizer train ...)"))
        elif io.tokenizer_path:
            tp = Path(io.tokenizer_path)
            if not tp.exists() and looks_like_hub_id(io.tokenizer_path):
                pass  # fetched from the Hugging Face hub at run time (needs a network)
            elif not tp.exists():
                p.append(("io.tokenizer_path", f"not found: {tp} (make one: kdforge tokenizer train --out {tp} ...)"))
            else:
                try:
                    tok_vocab = _tokenizer_vocab(str(tp))
                except Exception as e:  # noqa: BLE001 - the message is what matters
                    p.append(("io.tokenizer_path", f"cannot load a tokenizer from {tp}: {e}"))
        if not io.train_shards:
            p.append(("io.train_shards", "no training data: list one or more JSONL files"))
        for i, s in enumerate(io.train_shards + io.eval_shards):
            field = f"io.train_shards[{i}]" if i < len(io.train_shards) else f"io.eval_shards[{i - len(io.train_shards)}]"
            if for_run and not Path(s).is_file():
                p.append((field, f"not found: {s}"))
    student_vocab = None
    if cfg.model.path:
        mp = Path(cfg.model.path)
        if not (mp / "config.json").is_file():
            p.append(("model.path", f"no Hugging Face model folder (config.json) at {mp}"))
        else:
            student_vocab = _model_vocab(str(mp))
            if cfg.model.lora:
                p += _lora_problems(str(mp), cfg.model.lora)
    else:
        mc = cfg.model.model_cfg()
        student_vocab = mc.vocab_size or tok_vocab
        if tok_vocab and mc.vocab_size and mc.vocab_size < tok_vocab:
            p.append(("model.vocab_size", f"{mc.vocab_size} is smaller than the tokenizer's {tok_vocab} tokens"))
        if cfg.model.lora:
            known = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
            bad = [t for t in cfg.model.lora.target_modules or [] if t not in known]
            if bad:
                p.append(("model.lora.target_modules", f"{bad} not in the model; it has {sorted(known)}"))
    if cfg.teacher.path:
        tp = Path(cfg.teacher.path)
        if not (tp / "config.json").is_file():
            p.append(("teacher.path", f"no Hugging Face model folder (config.json) at {tp}"))
        elif cfg.loss.kind != "ce":
            tv = _model_vocab(str(tp))
            # wider is a padded embedding (or another tokenizer, carried by bytes): trained on the shared ids
            if student_vocab and tv is not None and tv < student_vocab:
                p.append(("teacher.path", f"teacher vocabulary ({tv}) differs from the student's ({student_vocab}): "
                          "logit KD needs the same tokenizer on both sides"))
    p += _on_policy_problems(cfg, for_run)
    return p


def _on_policy_problems(cfg: Config, for_run: bool) -> list[tuple[str, str]]:
    """on_policy.fraction > 0 needs a teacher that scores tokens and a divergence to train on."""
    op, p = cfg.on_policy, []
    if op.fraction <= 0:
        return p
    if not cfg.teacher.path and not cfg.teacher.url:
        p.append(("on_policy.fraction", f"{op.fraction} needs a teacher to score the student's answers: set "
                  "teacher.path (a local model, dense) or teacher.url (kdforge serve, vLLM)"))
    if cfg.loss.kind == "ce":
        p.append(("loss.kind", "ce cannot train on the student's own answers (no teacher text there): "
                  "use rkl (the usual for on-policy), fkl or jsd, or set on_policy.fraction=0"))
    if cfg.teacher.url and not cfg.teacher.path and cfg.generate.budget_limit is not None:
        from kdforge.teacher.pricing import resolve_prices

        g = cfg.generate
        try:
            prices = resolve_prices(cfg.teacher.model or g.model, g.price_input, g.price_output)
        except UsageError as e:  # one of the two prices given: its message names the fix
            prices, why = None, str(e)
        else:
            why = (f"no price known for model {cfg.teacher.model or g.model!r}: set generate.price_input and "
                   "generate.price_output (USD per million tokens)")
        if prices is None:
            p.append(("generate.budget_limit", f"a budget for scoring over teacher.url needs a price; {why}"))
    for i, f in enumerate(op.prompts):
        if for_run and not Path(f).is_file():
            p.append((f"on_policy.prompts[{i}]", f"not found: {f}"))
    return p


def _lora_problems(model_path: str, lora) -> list[tuple[str, str]]:
    """What PEFT would refuse when training starts, found now: given target names that are not
    layers PEFT can adapt (the error lists those it can), or an adapter PEFT cannot build on this
    model (e.g. dropout on Mixtral's expert parameters). Built on the meta device: no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from kdforge.model.adapters import with_lora
    from kdforge.model.memory import lora_field
    from kdforge.model.student import peft_lora_config

    conf = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf, trust_remote_code=False)
    if lora.target_modules is not None:
        # GPT-2's attention and MLP are Conv1D (a transposed Linear): PEFT adapts those too.
        names = {n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                 if isinstance(mod, (torch.nn.Linear, Conv1D))}
        bad = [t for t in lora.target_modules if t not in names]
        if bad:
            return [("model.lora.target_modules", f"{bad} not in the model; the layers LoRA can adapt "
                     f"(Linear, Conv1D): {sorted(names)}; or leave target_modules unset for all of them but the "
                     "output head (PEFT's all-linear)")]
    try:
        with_lora(model, peft_lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules))
    except ValueError as e:  # PEFT's own refusal, e.g. lora_dropout on parameter (expert) wrappers
        field = lora_field(e)
        fix = "set model.lora.dropout: 0" if field == "model.lora.dropout" else "change model.lora.target_modules"
        return [(field, f"PEFT cannot build this adapter on {model_path}: {e}; {fix}")]
    return []


def config_notes(cfg: Config) -> list[tuple[str, str]]:
    """Not errors: inputs absent now that a run will need (e.g. data `kdforge generate` will write)."""
    notes = []
    for name, shards in (("io.train_shards", cfg.io.train_shards), ("io.eval_shards", cfg.io.eval_shards)):
        for i, s in enumerate(shards):
            if not Path(s).is_file():
                notes.append((f"{name}[{i}]", f"{s} does not exist yet (must exist before training)"))
    return notes


def validate_files(paths: list[str | Path], overrides: list[str] | None = None,
                   for_run: bool = False) -> Config:
    """`kdforge config validate`: every problem at once, static and filesystem, then raise."""
    source = ", ".join(str(p) for p in paths) or None
    return from_dict(merge_configs(paths, overrides), source, check_files=True, for_run=for_run)
