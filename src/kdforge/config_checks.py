"""Config checks that touch the filesystem, models and prices, apart from the typed tree.

`kdforge.config` holds the schema and the static checks (shapes, batch arithmetic); this module
reads what a config points at: tokenizer and model folders (their vocabularies), the LoRA adapter
PEFT would build (on the meta device), data files, and the price of a scored teacher. Torch-free
at import (`kdforge config validate` starts without torch): the heavy imports stay inside the
functions that need them.
"""

from __future__ import annotations

import re
from pathlib import Path

from kdforge.config import Config, Job, config_job, from_dict, merge_configs
from kdforge.errors import UsageError

Problems = list[tuple[str, str]]  # (field, what is wrong and the fix)


def looks_like_hub_id(s: str) -> bool:
    """'org/name' with no local file: a Hugging Face hub id (allowed where there is a network)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s)) and not s.startswith((".", "/"))


def _tokenizer_vocab(path: str) -> int | None:
    from kdforge.data.vocab import tokenizer_vocab_size  # reads tokenizer.json without transformers
    return tokenizer_vocab_size(path)


def _model_vocab(path: str) -> int | None:
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, trust_remote_code=False).vocab_size


def check_config(cfg: Config, for_run: bool = False, job: Job | None = None) -> Problems:
    """Checks that touch the filesystem, for a config of `job` (None: guessed from its shape,
    `config.config_job`). `for_run=False` (config validate) lets outputs and data shards that a
    run will create be absent; `for_run=True` requires every input."""
    p: Problems = []
    job = job or config_job(cfg)
    tok_vocab = None
    if job == "daemon":
        cfg = _daemon_base(cfg, for_run, p)
    else:
        tok_vocab = _train_inputs(cfg, for_run, p)
    student_vocab = _student(cfg, tok_vocab, p)
    _teacher(cfg, student_vocab, p)
    p += _on_policy_problems(cfg, for_run)
    return p


def _daemon_base(cfg: Config, for_run: bool, p: Problems) -> Config:
    """The daemon's base model: a folder named by daemon.base_model becomes the model checked
    below (model.path), unless model.path is set. Appends problems to `p`."""
    bm = cfg.daemon.base_model
    if not bm and not cfg.model.path:
        p.append(("daemon.base_model", "set the base model folder the daemon trains (a local HF model)"))
    elif bm and not cfg.model.path and (Path(bm) / "config.json").is_file():
        return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": bm})})
    elif bm and not cfg.model.path and (for_run or Path(bm).exists()):
        p.append(("daemon.base_model", f"no Hugging Face model folder (config.json) at {bm} "
                  "(make one: kdforge init-model --preset toy --tokenizer DIR --out DIR)"))
    return cfg


def _train_inputs(cfg: Config, for_run: bool, p: Problems) -> int | None:
    """A training run's tokenizer and data shards; returns the tokenizer's vocabulary when read."""
    io, tok_vocab = cfg.io, None
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
    return tok_vocab


def _student(cfg: Config, tok_vocab: int | None, p: Problems) -> int | None:
    """The student's folder or numbers and its LoRA targets; returns its vocabulary when known."""
    if cfg.model.path:
        mp = Path(cfg.model.path)
        if not (mp / "config.json").is_file():
            p.append(("model.path", f"no Hugging Face model folder (config.json) at {mp}"))
            return None
        vocab = _model_vocab(str(mp))
        if cfg.model.lora:
            p += _lora_problems(str(mp), cfg.model.lora)
        return vocab
    mc = cfg.model.model_cfg()
    if tok_vocab and mc.vocab_size and mc.vocab_size < tok_vocab:
        p.append(("model.vocab_size", f"{mc.vocab_size} is smaller than the tokenizer's {tok_vocab} tokens"))
    if cfg.model.lora:
        known = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
        bad = [t for t in cfg.model.lora.target_modules or [] if t not in known]
        if bad:
            p.append(("model.lora.target_modules", f"{bad} not in the model; it has {sorted(known)}"))
    return mc.vocab_size or tok_vocab


def _teacher(cfg: Config, student_vocab: int | None, p: Problems) -> None:
    """teacher.path is a model folder whose vocabulary covers the student's (for logit KD)."""
    if not cfg.teacher.path:
        return
    tp = Path(cfg.teacher.path)
    if not (tp / "config.json").is_file():
        p.append(("teacher.path", f"no Hugging Face model folder (config.json) at {tp}"))
    elif cfg.loss.kind != "ce":
        tv = _model_vocab(str(tp))
        # wider is a padded embedding (or another tokenizer, carried by bytes): trained on the shared ids
        # narrower: another tokenizer, whose rows loss.cross_tokenizer auto carries by bytes (train/cross_scoring.py)
        # when the teacher folder has its tokenizer to read the student's text with
        narrower = bool(student_vocab and tv is not None and tv < student_vocab)
        if narrower and not any((tp / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            p.append(("teacher.path", f"teacher vocabulary ({tv}) differs from the student's ({student_vocab}) and "
                      f"{tp} has no tokenizer to carry its rows by bytes: logit KD needs the same tokenizer on both "
                      "sides, or the teacher's own tokenizer saved in its folder"))
        elif narrower and cfg.loss.cross_tokenizer == "off":
            p.append(("loss.cross_tokenizer", f"off, and the teacher.path vocabulary ({tv}) differs from the student's "
                      f"({student_vocab}): set loss.cross_tokenizer: auto (its rows carried onto the student's "
                      "tokens by bytes) or use the same tokenizer on both sides"))


def _on_policy_problems(cfg: Config, for_run: bool) -> Problems:
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
        p += _scoring_price_problems(cfg)
    for i, f in enumerate(op.prompts):
        if for_run and not Path(f).is_file():
            p.append((f"on_policy.prompts[{i}]", f"not found: {f}"))
    return p


def _scoring_price_problems(cfg: Config) -> Problems:
    """A budget for scoring over teacher.url needs the teacher's price (known or given)."""
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
        return [("generate.budget_limit", f"a budget for scoring over teacher.url needs a price; {why}")]
    return []


def _lora_problems(model_path: str, lora) -> Problems:
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


def config_notes(cfg: Config) -> Problems:
    """Not errors: inputs absent now that a run will need (e.g. data `kdforge generate` will write)."""
    notes = []
    for name, shards in (("io.train_shards", cfg.io.train_shards), ("io.eval_shards", cfg.io.eval_shards)):
        for i, s in enumerate(shards):
            if not Path(s).is_file():
                notes.append((f"{name}[{i}]", f"{s} does not exist yet (must exist before training)"))
    return notes


def validate_files(paths: list[str | Path], overrides: list[str] | None = None, for_run: bool = False,
                   job: Job | None = None) -> Config:
    """`kdforge config validate`: every problem at once, static and filesystem, for a config of
    `job` (None: guessed from its shape), then raise one ConfigError."""
    source = ", ".join(str(p) for p in paths) or None
    return from_dict(merge_configs(paths, overrides), source, check_files=True, for_run=for_run, job=job)
