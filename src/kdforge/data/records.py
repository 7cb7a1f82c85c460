"""Record formats: every JSONL shape kdforge accepts, normalised to one `Record`.

Accepted lines (SPEC "generate" and "train"):
- kdforge generate output: {"prompt", "teacher_text", "messages"?, "teacher_reasoning"?, "teacher_logprobs"?,
  "metadata"?} (`teacher_reasoning`: a thinking teacher's reasoning; `Record.training_response`)
- {"prompt", "completion"}
- OpenAI chat: {"messages": [...]} whose last message is the assistant's answer
- Alpaca: {"instruction", "input"?, "output"}
- plain text: {"text"} (no prompt: every token is a training target)

With `prompt_only=True` (the daemon under on-policy distillation) a line that is only a prompt is a
record too: {"prompt"} with no answer field, or {"messages"} whose last message is not the
assistant's. Its `response` is "" and `prompt_only` is set: the student answers it on-policy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from kdforge.errors import DataError

ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass
class Record:
    """One training example. `prompt_messages` is None only for plain-text records."""

    prompt_messages: list[dict[str, str]] | None
    response: str
    teacher_logprobs: list[dict[str, Any]] | None = None
    id: str | None = None
    source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0  # 1-based line number in its file
    prompt_only: bool = False  # a prompt with no answer (parse_record(prompt_only=True)): on-policy only
    reasoning: str | None = None  # a thinking teacher's reasoning (`teacher_reasoning`), whole

    @property
    def is_text(self) -> bool:
        return self.prompt_messages is None

    @property
    def prompt(self) -> str:
        if not self.prompt_messages:
            return ""
        return "\n".join(m["content"] for m in self.prompt_messages if m["role"] != "system")

    def training_response(self, reasoning: str = "think", tokenizer=None) -> str:
        """The text the student learns as its answer, by `io.reasoning`: "drop" (or a record without
        thinking): the answer alone; "think": the thinking, then the answer, in the tokenizer's chat
        template's own thinking format where it has one (a template that renders an assistant
        message's `reasoning_content`, as Qwen3's does), else `<think>\n{reasoning}\n</think>\n\n{answer}`.
        Always `thinking_prefix(...) + response`."""
        return self.thinking_prefix(reasoning, tokenizer) + self.response

    def thinking_prefix(self, reasoning: str = "think", tokenizer=None) -> str:
        """What `training_response` puts before the answer ("" under "drop" or without thinking),
        for a caller that tokenises the answer on its own (its teacher logprobs cover the answer)."""
        if reasoning not in REASONING_MODES:
            raise ValueError(f"io.reasoning must be one of {', '.join(REASONING_MODES)}, got {reasoning!r}")
        if reasoning == "drop" or not self.reasoning:
            return ""
        own = _template_thinking(tokenizer, self) if tokenizer is not None and not self.is_text else None
        return own if own is not None else THINK_FORMAT.format(reasoning=self.reasoning, answer="")

REASONING_MODES = ("think", "drop")
THINK_FORMAT = "<think>\n{reasoning}\n</think>\n\n{answer}"
_END = "\u2063kdforge-end\u2063"  # marks where the answer ends inside a rendered template


def _template_thinking(tokenizer, rec: "Record") -> str | None:
    """What the chat template renders before the answer in an assistant turn with
    `reasoning_content`; None when the template has no thinking format (or changes the answer)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "reasoning_content" not in template:
        return None
    turn = {"role": "assistant", "content": rec.response + _END, "reasoning_content": rec.reasoning}
    try:
        head = tokenizer.apply_chat_template(rec.prompt_messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(rec.prompt_messages + [turn], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this: the plain format
        return None
    if not full.startswith(head) or _END not in full or rec.reasoning not in full:
        return None
    turn_text = full[len(head):full.index(_END)]
    if not turn_text.endswith(rec.response):
        return None
    return turn_text[:len(turn_text) - len(rec.response)]


def _check_messages(msgs: Any, key: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"'{key}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"'{key}[{i}]' needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"'{key}[{i}].role' is {m['role']!r}; expected one of {sorted(ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"'{key}[{i}].content' must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# A stored logprob may round a little above 0 (APIs print a few digits); beyond this it is not a logprob.
LOGPROB_SLACK = 1e-4  # nats


def is_byte_list(v: Any) -> bool:
    """Whether a decoded `bytes` value is what it must be: a list of integers 0-255 (no bools)."""
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in v)


def _check_token(e: Any, where: str) -> None:
    """One {token, logprob, bytes?} entry of teacher_logprobs (or of its `top`)."""
    if not isinstance(e, dict):
        raise ValueError(f"'{where}' must be an object {{token, logprob, top?, bytes?}}, got {type(e).__name__}")
    for key in ("token", "logprob"):
        if key not in e:
            raise ValueError(f"'{where}' needs '{key}'")
    if not isinstance(e["token"], str):
        raise ValueError(f"'{where}.token' must be a string")
    lp = e["logprob"]
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
        raise ValueError(f"'{where}.logprob' must be a finite number, got {lp!r}")
    if lp > LOGPROB_SLACK:
        raise ValueError(f"'{where}.logprob' must be <= 0 (a log-probability in nats), got {lp!r}")
    b = e.get("bytes")
    if b is not None and not is_byte_list(b):
        raise ValueError(f"'{where}.bytes' must be a list of integers 0-255 (the token's UTF-8 bytes)")


def _check_logprobs(lp: Any) -> list[dict[str, Any]] | None:
    """generate's teacher_logprobs, checked entry by entry so a bad teacher or file is a named error."""
    if lp is None:
        return None
    if not isinstance(lp, list):
        raise ValueError("'teacher_logprobs' must be a list")
    for t, e in enumerate(lp):
        _check_token(e, f"teacher_logprobs[{t}]")
        top = e.get("top")
        if top is None:
            continue
        if not isinstance(top, list):
            raise ValueError(f"'teacher_logprobs[{t}].top' must be a list")
        for k, alt in enumerate(top):
            _check_token(alt, f"teacher_logprobs[{t}].top[{k}]")
    return lp or None


ANSWER_KEYS = ("teacher_text", "completion", "output", "text")


def _prompt_only(obj: dict) -> Record | None:
    """{"prompt"} without any answer field, or {"messages"} not ending with the assistant's: a
    prompt-only record (response ""), else None."""
    if any(k in obj for k in ANSWER_KEYS):
        return None
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    if "messages" in obj:
        msgs = _check_messages(obj["messages"], "messages")
        if msgs[-1]["role"] == "assistant":
            return None
    elif isinstance(obj.get("prompt"), str):
        msgs = [{"role": "user", "content": obj["prompt"]}]
    else:
        return None
    if not any(m["content"].strip() for m in msgs if m["role"] != "system"):
        raise ValueError("the prompt is empty")
    return Record(msgs, "", None, obj.get("id"), meta.get("source") or obj.get("source"), meta, prompt_only=True)


def parse_record(obj: Any, prompt_only: bool = False) -> Record:
    """Normalise one decoded JSON line. Raises ValueError with a reason if it is unusable.
    `prompt_only`: a line that is only a prompt is a record too (see the module docstring)."""
    if prompt_only and isinstance(obj, dict) and (rec := _prompt_only(obj)) is not None:
        return rec
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    rid = obj.get("id")
    source = meta.get("source") or obj.get("source")

    if "teacher_text" in obj:
        response = obj["teacher_text"]
        if "messages" in obj and obj["messages"]:
            prompt_msgs = _check_messages(obj["messages"], "messages")
        elif isinstance(obj.get("prompt"), str):
            prompt_msgs = [{"role": "user", "content": obj["prompt"]}]
        else:
            raise ValueError("a 'teacher_text' record needs 'prompt' (string) or 'messages'")
        rec = Record(prompt_msgs, response, _check_logprobs(obj.get("teacher_logprobs")), rid, source, meta)
    elif "completion" in obj and "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise ValueError("'prompt' must be a string")
        rec = Record([{"role": "user", "content": obj["prompt"]}], obj["completion"], None, rid, source, meta)
    elif "messages" in obj:
        msgs = _check_messages(obj["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise ValueError("the last of 'messages' must be the assistant's answer (role 'assistant')")
        if len(msgs) < 2:
            raise ValueError("'messages' needs at least one prompt message before the assistant's answer")
        rec = Record(msgs[:-1], msgs[-1]["content"], None, rid, source, meta)
    elif "instruction" in obj and "output" in obj:
        inst, inp = obj["instruction"], obj.get("input") or ""
        if not isinstance(inst, str) or not isinstance(inp, str):
            raise ValueError("'instruction' and 'input' must be strings")
        prompt = inst + ("\n\n" + inp if inp.strip() else "")
        rec = Record([{"role": "user", "content": prompt}], obj["output"], None, rid, source, meta)
    elif "text" in obj:
        rec = Record(None, obj["text"], None, rid, source, meta)
    else:
        keys = ", ".join(sorted(obj)[:8]) or "none"
        raise ValueError(
            f"unknown record format (keys: {keys}); expected one of: prompt+teacher_text, "
            "prompt+completion, messages, instruction+output, text"
        )
    thinking = obj.get("teacher_reasoning")
    if thinking is not None and not isinstance(thinking, str):
        raise ValueError(f"'teacher_reasoning' must be a string (the teacher's thinking), got {type(thinking).__name__}")
    rec.reasoning = thinking or None
    if not isinstance(rec.response, str):
        raise ValueError("the response must be a string")
    if not rec.response.strip():
        raise ValueError("the response is empty")
    if rec.prompt_messages is not None and not any(m["content"].strip() for m in rec.prompt_messages):
        raise ValueError("the prompt is empty")
    return rec


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped text) for each non-blank line."""
    with open(path, "r", encoding="utf-8", errors="strict") as f:
        for i, line in enumerate(f, 1):
            s = line.strip()
            if s:
                yield i, s


def parse_lines(lines: Iterable[tuple[int, str]], where: str, strict: bool = True,
                prompt_only: bool = False) -> tuple[list[Record], list[DataError]]:
    """Parse (line number, text) pairs of the file `where` (its name in messages), as `read_records`
    and the daemon's batch reader both do. strict=True raises the first unusable line as DataError
    (file:line); strict=False returns the good records and a DataError for each bad line."""
    records: list[Record] = []
    problems: list[DataError] = []
    for lineno, text in lines:
        try:
            rec = parse_record(json.loads(text), prompt_only)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            reason = f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
            err = DataError(reason + "; fix or remove the line", where, lineno)
            if strict:
                raise err from None
            problems.append(err)
            continue
        rec.line = lineno
        records.append(rec)
    return records, problems


def read_records(path: str | Path, strict: bool = True) -> tuple[list[Record], list[DataError]]:
    """Read every record of a JSONL file.

    strict=True raises the first unusable line as DataError (file:line). strict=False returns
    the good records and a DataError for each bad line, so a caller can train the good ones
    and report the rest.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", str(path))
    try:
        lines = list(iter_lines(path))
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", str(path)) from None
    return parse_lines(lines, str(path), strict)
