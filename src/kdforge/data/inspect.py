"""`kdforge data inspect`: the first samples of a JSONL file, as the seed plan's snippet showed
them: prompt and response (cut to `width` characters) and the token counts."""

from __future__ import annotations

import json
from pathlib import Path

from kdforge.data.records import iter_lines, parse_record
from kdforge.errors import DataError


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text[:width] + ("..." if len(text) > width else "")


def _tokens(meta: dict) -> str:
    """The teacher's token counts in words. Servers count the token that ends the answer (EOS,
    <|im_end|>) in `completion` when it stopped on its own (finish_reason "stop"), so an answer of
    3 words can show 4: say so rather than leave the extra token unexplained."""
    t = meta.get("tokens")
    if not isinstance(t, dict) or not any(isinstance(t.get(k), int) for k in ("prompt", "completion")):
        return "not recorded (no metadata.tokens: not written by kdforge generate)"
    p, c = t.get("prompt"), t.get("completion")
    total = t.get("total", (p or 0) + (c or 0))
    r = t.get("reasoning")
    text = (f"{p if p is not None else '?'} prompt + {c if c is not None else '?'} completion"
            + (f" ({r} of them reasoning)" if r else "") + f" = {total}, as the teacher counted")
    reason = meta.get("finish_reason")
    if reason == "stop":
        text += " (finish_reason stop: completion includes the end-of-answer token, as kdforge serve and vLLM count)"
    elif reason == "length":
        text += " (the answer was cut at max_tokens)"
    return text


def inspect_file(path: str | Path, n: int = 3, width: int = 100) -> str:
    """Up to n samples; an unusable line is shown with its reason instead of being skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", str(path))
    out = []
    for k, (lineno, text) in enumerate(iter_lines(path)):
        if k >= n:
            break
        try:
            rec = parse_record(json.loads(text))
        except (ValueError, json.JSONDecodeError) as e:
            out.append(f"\nSample {k + 1} (line {lineno}): unusable: {e}")
            continue
        meta = rec.metadata
        head = ", ".join(x for x in (f"line {lineno}", f"id {rec.id}" if rec.id else "",
                                     f"source {rec.source}" if rec.source else "") if x)
        out.append(f"\nSample {k + 1} ({head}):")
        out.append(f"  Prompt: {_cut(rec.prompt, width)}")
        out.append(f"  Response: {_cut(rec.response, width)}")
        if rec.reasoning:
            out.append(f"  Reasoning: {_cut(rec.reasoning, width)} ({len(rec.reasoning)} characters)")
        out.append(f"  Tokens: {_tokens(meta)}")
        if rec.teacher_logprobs:
            out.append(f"  Logprobs: {len(rec.teacher_logprobs)} tokens, top-{len(rec.teacher_logprobs[0].get('top', []))}")
    if not out:
        out.append(f"{path}: no samples")
    return "\n".join(out).lstrip("\n")
