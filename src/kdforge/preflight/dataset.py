"""The generated samples seen by the trainer (`dataset`: the seed's KDDataset snippet on the
config's tokenizer) and by a reader (`quality`: `kdforge data validate`'s report)."""

from __future__ import annotations

from pathlib import Path

from kdforge.errors import KdforgeError
from kdforge.preflight.report import Item, failed, passed, warned

TRUNCATED_WARN = 0.5  # share of answers cut at max_tokens that deserves a look


def check_dataset(samples: Path, tokenizer: str | None, max_seq_length: int) -> Item:
    """Every sample tokenises with the config's tokenizer and keeps response tokens to learn."""
    if not tokenizer:
        return failed("dataset", "no tokenizer in the config", "set io.tokenizer_path")
    if not Path(tokenizer).exists():
        return failed("dataset", f"io.tokenizer_path not found: {tokenizer}",
                      "fix io.tokenizer_path (see the config item)")
    from kdforge.data import KDDataset

    try:
        ds = KDDataset(jsonl_path=str(samples), tokenizer_path=tokenizer, max_seq_length=max_seq_length)
    except KdforgeError as e:
        return failed("dataset", f"KDDataset cannot read the samples: {e}", "see the named line; kdforge data "
                      f"validate {samples} --tokenizer {tokenizer} lists every problem")
    with open(samples, encoding="utf-8") as f:
        lines = sum(1 for line in f if line.strip())
    # From the store's lengths, as item() truncates them: no example is materialised.
    kept = [ds.kept(i) for i in range(len(ds))]
    inputs = [p + r for p, r in kept]
    targets = [r for _, r in kept]
    shown = ", ".join(f"{a}/{b}" for a, b in list(zip(inputs, targets))[:3])
    mean = sum(inputs) / max(1, len(inputs))
    evidence = (f"KDDataset({samples.name}, {tokenizer}, max_seq_length={max_seq_length}): {len(ds)} of {lines} "
                f"samples; input/label tokens of the first 3: {shown}; mean input {mean:.0f}"
                f" tokens, longest {max(inputs, default=0)}")
    nums = dict(samples=len(ds), lines=lines, input_lens=inputs, label_tokens=targets)
    empty = sum(1 for t in targets if t == 0)
    if len(ds) != lines or empty:
        return failed("dataset", evidence + f"; {lines - len(ds)} lines dropped, {empty} with no response token left",
                      f"kdforge data validate {samples} --tokenizer {tokenizer} names them", **nums)
    return passed("dataset", evidence, **nums)


def check_quality(samples: Path, tokenizer: str | None) -> Item:
    """No empty or corrupted sample, diverse prompts, sane token counts (the seed's section 5)."""
    from kdforge.data.quality import validate_files

    tok = tokenizer if tokenizer and Path(tokenizer).exists() else None
    rep = validate_files([samples], tok)[0]
    resp = rep.lengths.get("response", {})
    prompts = {}
    for src, stats in rep.diversity.items():
        prompts[src] = stats
    evidence = (f"{rep.valid}/{rep.lines} usable, {rep.empty} empty, {len(rep.unusable)} unusable, "
                f"{rep.truncated} cut at max_tokens, {rep.refusals} refusals, {rep.exact_duplicates} duplicates, "
                f"{rep.duplicate_prompts} repeated prompts, {len(rep.near_duplicates)} near-duplicate answers; "
                f"sources {', '.join(sorted(prompts)) or '-'}; response length mean {resp.get('mean', 0):.0f} "
                f"({rep.length_unit or 'no token counts'})")
    nums = dict(valid=rep.valid, lines=rep.lines, empty=rep.empty, unusable=len(rep.unusable),
                truncated=rep.truncated, refusals=rep.refusals, duplicates=rep.exact_duplicates, lengths=rep.lengths)
    fix = f"kdforge data validate {samples} and kdforge data inspect {samples} show them"
    if rep.unusable or rep.empty or not rep.valid:
        return failed("quality", evidence, fix, **nums)
    if rep.refusals or rep.exact_duplicates or rep.truncated > TRUNCATED_WARN * rep.valid:
        return warned("quality", evidence, fix + "; answers cut at max_tokens: raise generate.max_tokens", **nums)
    return passed("quality", evidence, **nums)
