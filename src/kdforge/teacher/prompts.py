"""Prompts: `--prompts` files, the built-in mix, weights, deterministic order, no duplicates.

- Files: JSONL lines with `prompt` (string) or `messages` (chat list; trailing assistant turns
  are dropped, the teacher answers the last user turn) or Alpaca `instruction`/`input`, each
  with an optional `source`; any other file is text, one prompt per non-empty line (a text line
  that parses as a JSON prompt object is still sent as text, with a warning naming the line: the
  file probably wants a .jsonl name). A file's source defaults to its name without extension.
- Built-in: `kdforge/teacher/prompts/{code,math,reasoning,writing,knowledge}.jsonl`, 60
  hand-written prompts each, used when no file is given.
- Mix: `generate.mix: {source: weight}` picks exactly those sources (built-in categories
  included by name) and samples them in proportion; without a mix every prompt weighs the same.
- Order: each source is shuffled by the seed, then sources are interleaved by weighted draws
  from the same seed. The order depends only on (prompts, mix, seed), and a larger `--total`
  extends it, so resuming with a new total continues the same sequence.
- Duplicates (same messages after lower-casing and collapsing whitespace) keep their first
  occurrence only.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from kdforge.errors import DataError, UsageError

BUILTIN_SOURCES = ("code", "math", "reasoning", "writing", "knowledge")
_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Prompt:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs, without any system prompt
    source: str

    @property
    def text(self) -> str:
        """The last user message: what the dataset's `prompt` field shows."""
        return next((c for r, c in reversed(self.messages) if r == "user"), self.messages[-1][1])

    def chat(self, system_prompt: str | None = None) -> list[dict[str, str]]:
        msgs = [{"role": r, "content": c} for r, c in self.messages]
        if system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return msgs


def prompt_key(messages) -> str:
    """Identity for de-duplication: roles and contents, lower-cased, whitespace collapsed."""
    pairs = [(m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in messages]
    norm = [(r, _WS.sub(" ", c).strip().lower()) for r, c in pairs if r != "system"]
    return hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()


def _from_object(obj, path: str, line: int, default_source: str) -> Prompt:
    def bad(msg: str) -> DataError:
        return DataError(msg + "; expected {\"prompt\": \"...\"} or {\"messages\": [...]}", path, line)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    source = str(obj.get("source") or default_source)
    if isinstance(obj.get("messages"), list):
        pairs = []
        for i, m in enumerate(obj["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
                raise bad(f"messages[{i}] needs string 'role' and 'content'")
            pairs.append((m["role"], m["content"]))
        while pairs and pairs[-1][0] == "assistant":
            pairs.pop()
        if not pairs or not any(r == "user" and c.strip() for r, c in pairs):
            raise bad("'messages' has no user message to answer")
        return Prompt(tuple(pairs), source)
    text = obj.get("prompt")
    if text is None and isinstance(obj.get("instruction"), str):
        text = obj["instruction"] + ("\n\n" + obj["input"] if str(obj.get("input") or "").strip() else "")
    if not isinstance(text, str):
        raise bad("no 'prompt' string")
    if not text.strip():
        raise bad("the prompt is empty")
    return Prompt((("user", text),), source)


def _looks_like_json_prompt(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and bool({"prompt", "messages", "instruction"} & obj.keys())


def read_prompt_file(path: str | Path, warn: Callable[[str], None] | None = None) -> list[Prompt]:
    """Every prompt of one file, in file order. Raises DataError naming file:line; `warn` hears
    about text lines that look like JSONL (sent as they are, braces and all)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("prompts file not found", str(p))
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", str(p)) from None
    is_jsonl = p.suffix.lower() in (".jsonl", ".json", ".ndjson")
    out, json_lines = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg}); fix or remove the line", str(p), i) from None
            out.append(_from_object(obj, str(p), i, p.stem))
        else:
            if warn and not json_lines and _looks_like_json_prompt(line):
                json_lines.append(i)
            out.append(Prompt((("user", line.strip()),), p.stem))
    if json_lines:
        warn(f"{p}:{json_lines[0]}: this line of a text prompts file is a JSON prompt object, and is sent as "
             f"raw JSON text like every line of a {p.suffix or 'suffix-less'} file; rename the file to .jsonl to "
             "read its lines as JSON")
    return out


def builtin_prompts() -> list[Prompt]:
    """The shipped mix: a few hundred prompts over code, math, reasoning, writing, knowledge."""
    out = []
    folder = resources.files("kdforge.teacher").joinpath("prompts")
    for name in BUILTIN_SOURCES:
        text = folder.joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
        out += [_from_object(json.loads(line), f"<built-in {name}>", i, name)
                for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    return out


def plan_prompts(files: list[str], mix: dict[str, float], seed: int,
                 warn: Callable[[str], None] | None = None) -> list[Prompt]:
    """All usable prompts, de-duplicated, in the deterministic order described above."""
    pool: list[Prompt] = []
    for f in files:
        pool += read_prompt_file(f, warn)
    wanted_builtin = [s for s in mix if s in BUILTIN_SOURCES] if files else list(BUILTIN_SOURCES)
    if wanted_builtin:
        pool += [p for p in builtin_prompts() if p.source in wanted_builtin]

    by_source: dict[str, list[Prompt]] = {}
    seen: set[str] = set()
    for p in pool:
        k = prompt_key(p.messages)
        if k not in seen:
            seen.add(k)
            by_source.setdefault(p.source, []).append(p)

    if mix:
        unknown = sorted(s for s in mix if s not in by_source)
        if unknown:
            raise UsageError(f"generate.mix names source(s) {unknown} that no prompt has; "
                             f"available: {sorted(by_source)} (built-in: {list(BUILTIN_SOURCES)})")
        weights = {s: float(w) for s, w in mix.items() if w > 0}
        if not weights:
            raise UsageError("generate.mix gives every source weight 0; give at least one a positive weight")
    else:
        weights = {s: float(len(ps)) for s, ps in by_source.items()}

    queues = {}
    for s in sorted(weights):
        items = list(by_source[s])
        random.Random(f"{seed}/{s}").shuffle(items)
        queues[s] = items[::-1]  # pop() from the end = the shuffled order
    rng = random.Random(seed)
    order: list[Prompt] = []
    while queues:
        names = list(queues)
        s = rng.choices(names, weights=[weights[n] for n in names])[0]
        order.append(queues[s].pop())
        if not queues[s]:
            del queues[s]
    return order
