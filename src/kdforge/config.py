"""Typed config tree (pydantic), YAML merge, `a.b=c` overrides and validation.

Defaults live here and only here (each field's docstring says what it means). Each component
takes its own section. `load_config` merges YAML files left to right, applies overrides, and
raises one ConfigError listing every problem (each naming its field); the checks that read
files, models and prices (paths, tokenizer vocabulary, LoRA target modules, a scored teacher's
price) are `kdforge.config_checks`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdforge.errors import ConfigError


class Section(BaseModel):
    # Each field's docstring (the string under it) is its description, as litgpt's args.py.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class LoraCfg(Section):
    """A LoRA adapter on a pretrained student (model.path); the base stays frozen."""

    r: int = Field(8, gt=0)
    """Rank of the low-rank update."""
    alpha: float = Field(16, gt=0)
    """Scale: the update is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (0: none; PEFT refuses it on expert parameters)."""
    target_modules: list[str] | None = None
    """Layer names to adapt. None: PEFT's "all-linear", every Linear and Conv1D layer but the
    output head, whatever the architecture names them (q_proj in Llama, c_attn in GPT-2, dense/fc1
    in Phi)."""


class ModelSection(Section):
    """Either a preset/number-built student or `path` to any local causal LM."""

    preset: str | None = "toy"
    """A named shape (model/shape.py PRESETS); the numbers below override it."""
    path: str | None = None
    """A local Hugging Face causal LM folder to train instead of a built student."""
    d_model: int | None = None
    """Hidden width."""
    n_layers: int | None = None
    """Transformer blocks."""
    n_heads: int | None = None
    """Query heads."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention when fewer than n_heads)."""
    d_head: int | None = None
    """Width of one head (default d_model // n_heads)."""
    vocab_size: int | None = None
    """Embedding rows (default: the preset's, or the tokenizer's without a preset)."""
    ffn_dim: int | None = None
    """MLP width (default: SwiGLU 8/3 * d_model rounded up to a multiple of 64)."""
    max_seq_len: int | None = None
    """Longest sequence the positions cover (tokens)."""
    rope_theta: float | None = None
    """RoPE base frequency."""
    tie_embeddings: bool | None = None
    """Share the input embedding and the output head."""
    lora: LoraCfg | None = None
    """Train a LoRA adapter instead of every weight (needs `path`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights' dtype; auto: the folder's own, float32 for a built student."""

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
    """Where a run reads its tokenizer and data and writes its checkpoints."""

    tokenizer_path: str | None = None
    """Tokenizer folder (default: model.path's own)."""
    train_shards: list[str] = []
    """Training data: JSONL files (one name or a list)."""
    eval_shards: list[str] = []
    """Held-out JSONL files for train.eval_steps."""
    output_dir: str = "runs/kdforge"
    """Checkpoints, metrics.jsonl and the run's log."""
    reasoning: Literal["think", "drop"] = Field("think", description=(
        "a thinking teacher's teacher_reasoning: 'think' trains it before the answer (<think>...</think>, or the "
        "chat template's own thinking format), 'drop' trains the answer only (records.Record.training_response)"))

    @field_validator("train_shards", "eval_shards", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class TeacherSection(Section):
    """The teacher distilled from during training (the data's stored top-k needs none)."""

    path: str | None = None
    """A local teacher model for dense logit KD."""
    url: str | None = None
    """An OpenAI-compatible server that scores tokens (on-policy KD over HTTP)."""
    model: str | None = None
    """The model to ask `url` for; None: the server's only one."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding `url`'s API key (never stored)."""
    top_logprobs: int = Field(20, gt=0, le=20)
    """Teacher alternatives per scored token (K)."""


class OnPolicySection(Section):
    """On-policy distillation: the student answers, the teacher scores the student's own tokens."""

    fraction: float = Field(0.0, ge=0, le=1)
    """Probability that an optimizer step is on-policy."""
    max_new_tokens: int = Field(128, gt=0)
    """Tokens the student samples per prompt."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the student's answers."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the student's answers (1: off)."""
    prompts: list[str] = []
    """Prompt-only files (JSONL prompt/messages, or text); else the step's data."""

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class LossSection(Section):
    """The training objective: CE on the data, plus a divergence from the teacher."""

    kind: Literal["ce", "fkl", "rkl", "jsd"] = "ce"
    """ce: cross-entropy only; fkl/rkl: forward/reverse KL to the teacher; jsd: generalised JSD."""
    kd_weight: float = Field(0.5, ge=0, le=1)
    """Share of the divergence in the loss (the rest is CE)."""
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of both distributions in the divergence."""
    beta: float = Field(0.5, ge=0, le=1)
    """jsd's mixing weight."""
    chunk_size: int | Literal["auto"] | None = "auto"
    """Tokens per chunk for the chunked loss (logits recomputed in backward); null = plain; "auto" =
    chunks of 256 once the labelled tokens x vocab would pass 16M logits (64 MB in fp32)."""
    cross_tokenizer: Literal["auto", "off"] = "auto"
    """A teacher with another tokenizer (stored top-k, or teacher.path): "auto" carries its
    distribution onto the student's tokens by bytes (data/align.py) and logs the share of
    positions that aligned 1:1; "off" refuses such data (exit 2), as before."""

    @field_validator("chunk_size")
    @classmethod
    def _positive_chunk(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be positive, 'auto' or null")
        return v


class TrainSection(Section):
    """The optimizer, schedule, batches, checkpoints and logs of `kdforge train`."""

    micro_batch_size: int = Field(1, gt=0)
    """Sequences per forward pass on one rank."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step on one rank."""
    seq_lengths: list[int] = [512]
    """Tokens per sequence; several: a curriculum from short to long over the steps."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to train (or set epochs)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the data (or set max_steps)."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The schedule's last learning rate as a share of lr."""
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    """Learning-rate shape after warmup; wsd: warmup, stable, decay."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup."""
    decay_fraction: float = Field(0.2, gt=0, le=1)
    """wsd: share of steps spent decaying."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Largest gradient norm (null: no clipping)."""
    save_steps: int = Field(100, gt=0)
    """Steps between checkpoints."""
    save_total_limit: int = Field(3, gt=0)
    """Checkpoints kept (the newest)."""
    eval_steps: int | None = Field(None, gt=0)
    """Steps between held-out evaluations on io.eval_shards (null: never)."""
    eval_batches: int = Field(8, gt=0)
    """Micro-batches per held-out evaluation."""
    log_steps: int = Field(1, gt=0)
    """Steps between metrics records."""
    seed: int = 0
    """Seed of the weights, data order and sampling."""
    packing: bool = False
    """Pack several examples into one sequence (attention kept within each)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, more time."""
    bf16: bool | Literal["auto"] = "auto"
    """Mixed precision in bfloat16; auto: where the device supports it."""
    device: str = "auto"
    """cpu, cuda, cuda:N or mps; auto: the best one here."""
    fsdp: bool = False
    """Shard the model over ranks (torchrun) instead of replicating it."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers fed every metrics.jsonl record (train/reporters.py), all offline-capable."""

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


class DaemonSection(Section):
    """`kdforge daemon`: continuous training on the batches dropped in BASE/inbox/."""

    base_model: str | None = None
    """The Hugging Face model folder the daemon trains."""
    save_steps: int = Field(100, gt=0)
    """Steps between checkpoints within a batch."""
    save_total_limit: int = Field(3, gt=0)
    """Checkpoints kept (the newest)."""
    epochs_per_batch: float = Field(1, gt=0)
    """Passes over each inbox batch."""
    snapshot_time: str = "03:00"
    """Daily snapshot time, HH:MM (24h, local)."""
    snapshot_keep: int = Field(7, gt=0)
    """Daily snapshots kept."""
    consolidate_every_batches: int | None = Field(None, gt=0)
    """Merge the adapter into the base every this many batches (null: never)."""
    consolidate_daily: bool = False
    """Merge the adapter into the base at snapshot_time."""
    delete_processed: bool = True
    """Delete a batch file once trained (false: move it to archive_dir)."""
    archive_dir: str | None = None
    """With delete_processed false: where trained files go (default BASE/processed)."""
    schedule: Literal["constant", "wsd"] = "constant"
    """constant: train.lr from the first step; wsd: train.warmup_steps of warmup, then stable (an
    open-ended stream never reaches a decay phase). The scheduler state carries across batches."""
    poll_interval: float = Field(2.0, gt=0)
    """Seconds between inbox scans."""
    settle_seconds: float = Field(2.0, ge=0)
    """A file must be unchanged this long (seconds) to be taken."""
    max_batch_bytes: int = Field(1073741824, gt=0)
    """A bigger inbox file is rejected unread (1 GiB): one file must not exhaust memory or disk time."""
    eval_file: str | None = None
    """Held-out KD data (JSONL, as `kdforge eval --data`) scored after every batch and consolidation:
    ce, perplexity, kl (plus exact_match, token_f1, accuracy with eval_greedy, which generates: slower)."""
    eval_greedy: bool = False
    """Also generate greedily on eval_file for the answer metrics."""
    forgetting_threshold: float = Field(0.10, gt=0)
    """`kdforge verify` fails when the latest held-out ce is more than this share above the lowest it
    reached (0.10: 10% relative): the student is forgetting what earlier batches taught it."""

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
    """`kdforge generate`: a teacher answers prompts into KD data, within a budget."""

    teacher: str | None = None
    """Base URL of the OpenAI-compatible teacher."""
    model: str | None = None
    """The teacher model to ask for."""
    api_key_env: str = "OPENAI_API_KEY"
    """The environment variable holding the API key (never stored)."""
    out: str | None = None
    """The output JSONL; re-running resumes it."""
    checkpoint_dir: str | None = None
    """The run's journal and state (default: out's name + _checkpoints)."""
    cache_dir: str | None = None
    """Answers cached by request (default: checkpoint_dir/cache)."""
    prompts: list[str] = []
    """Prompt files (JSONL prompt/messages, or text)."""
    mix: dict[str, float] = {}
    """source/category -> weight."""
    total: int | None = Field(None, gt=0)
    """Samples the output file should hold."""
    budget_limit: float | None = Field(None, ge=0)
    """USD; never exceeded, counts across resumes."""
    price_input: float | None = Field(None, ge=0)
    """USD per million input tokens."""
    price_output: float | None = Field(None, ge=0)
    """USD per million output tokens."""
    concurrency: int = Field(8, gt=0)
    """Requests in flight."""
    rpm: float | None = Field(None, gt=0)
    """Requests per minute at most (else learned from x-ratelimit headers)."""
    tpm: float | None = Field(None, gt=0)
    """Tokens per minute at most (else learned from x-ratelimit headers)."""
    delay: float = Field(0.0, ge=0)
    """Minimum seconds between request starts."""
    max_tokens: int = Field(512, gt=0)
    """Longest answer (tokens)."""
    temperature: float = Field(0.7, ge=0)
    """The teacher's sampling temperature."""
    top_p: float | None = Field(None, gt=0, le=1)
    """The teacher's nucleus sampling (null: the server's default)."""
    top_logprobs: int = Field(0, ge=0, le=20)
    """The teacher's top-K logprobs stored per token (0: text only)."""
    timeout: float = Field(120.0, gt=0)
    """Seconds a request may take."""
    max_retries: int = Field(8, ge=0)
    """Retries of a request after a 5xx, timeout or rate limit."""
    retry_base: float = Field(1.0, gt=0)
    """Seconds: first backoff after a 5xx/timeout (doubles, jittered)."""
    retry_max: float = Field(60.0, gt=0)
    """Seconds: longest backoff."""
    seed: int = 0
    """Prompt sampling order."""
    system_prompt: str | None = None
    """A system message put before every prompt."""
    batch: bool = False
    """Batch API (--batch): files of batch_size rows at batch_discount x the online price (unless the
    price table has a batch price); failed or expired rows retried online or in the next file."""
    batch_size: int = Field(1000, gt=0, le=50000)
    """Requests per batch file (OpenAI's cap: 50,000)."""
    batch_discount: float = Field(0.5, gt=0, le=1)
    """The Batch API's price as a share of the online one."""
    batch_fallback: Literal["online", "batch"] = "online"
    """Where failed or expired batch rows are retried."""
    batch_poll: float = Field(10.0, gt=0)
    """Seconds before the first status poll; backs off to 60 s."""

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class Config(Section):
    """The whole tree; each component takes only its own section."""

    model: ModelSection = ModelSection()
    """The student."""
    io: IOSection = IOSection()
    """Tokenizer, data and output folder."""
    teacher: TeacherSection = TeacherSection()
    """The teacher during training."""
    on_policy: OnPolicySection = OnPolicySection()
    """On-policy steps (the student's own answers)."""
    loss: LossSection = LossSection()
    """The objective."""
    train: TrainSection = TrainSection()
    """Optimizer, schedule, batches, checkpoints."""
    daemon: DaemonSection = DaemonSection()
    """Continuous training."""
    generate: GenerateSection = GenerateSection()
    """Data generation from a teacher."""


Job = Literal["train", "daemon"]  # what a config is for: its checks differ


def default(section: type[Section], name: str) -> Any:
    """The default of field `name` in `section`, for code outside the tree that must agree with it
    (LoopConfig, DistillObjective): the defaults are declared here only."""
    return section.model_fields[name].get_default(call_default_factory=True)


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
              for_run: bool = False, job: Job | None = None) -> Config:
    """Type-check and validate a config of `job` (None: guessed from its shape, `config_job`);
    `check_files` adds the checks that read files, models and prices (`kdforge.config_checks`).
    Raises one ConfigError listing everything."""
    cfg, problems = _typed(data)
    if cfg is not None:
        problems += static_problems(cfg, job)
        if check_files:
            from kdforge.config_checks import check_config  # reads files and models: kept apart from the schema

            problems += check_config(cfg, for_run=for_run, job=job)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(paths: list[str | Path], overrides: list[str] | None = None, job: Job | None = None) -> Config:
    """Merge, override, type-check and statically validate a config of `job` (None: guessed from
    its shape). Raises ConfigError listing everything."""
    source = ", ".join(str(p) for p in paths) or None
    return from_dict(merge_configs(paths, overrides), source, job=job)


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

def config_job(cfg: Config) -> Job:
    """The job a config's shape says, for a caller that has only the file (`config validate`,
    preflight, `kdforge train`): a base model and no training shards is a daemon's (the inbox is
    the data); anything else a training run's."""
    return "daemon" if cfg.daemon.base_model is not None and not cfg.io.train_shards else "train"


def static_problems(cfg: Config, job: Job | None = None) -> list[tuple[str, str]]:
    """Checks that need no filesystem: shapes, batch arithmetic, sequence lengths, for a config of
    `job` (None: guessed from its shape). A daemon trains its base model on open-ended batches: it
    needs no preset shape and no step count."""
    p: list[tuple[str, str]] = []
    training = (job or config_job(cfg)) == "train"
    m = cfg.model
    if m.path is None and training:
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
    if t.max_steps is None and t.epochs is None and training:
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

