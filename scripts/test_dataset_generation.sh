#!/usr/bin/env bash
# The seed plan's scripts/test_dataset_generation.sh, on your own setup: kdforge preflight --only generation.
#
#   scripts/test_dataset_generation.sh --config configs/my.yaml [--teacher URL --model NAME] [--budget-limit 1.0] ...
#
# Generates --samples (default 20) samples with the budget, checks their format, that every one
# tokenises with the config's tokenizer, that none is empty or corrupted and that a re-run sends
# nothing (the cache and the resume work).
#
# Runs in a scratch dir (--workdir DIR, default a new temp dir): never touches your outputs, cache
# or checkpoints. Spends at most --budget-limit (default $1.00) on the teacher named by the config's
# generate section (or the flags). Prints the checklist and writes preflight_report.md there.
# Exit 0: nothing failed; 2: a check failed (the report says the fix); 4: the teacher refused us.
set -euo pipefail
# KDFORGE may name another entry point, e.g. KDFORGE="python -m kdforge" (split into words on purpose).
exec ${KDFORGE:-kdforge} preflight --only generation "$@"
