#!/usr/bin/env bash
# The seed plan's scripts/test_training_execution.sh, on your own setup: kdforge preflight --only training.
#
#   scripts/test_training_execution.sh --config configs/my.yaml [--teacher URL --model NAME] [--budget-limit 1.0] ...
#
# Generates the samples it trains on (--samples, default 20), then: kdforge smoke, the configured
# student (shrunk, said so, when it cannot fit this machine) for 5 steps, a checkpoint with every
# file, and a run killed with SIGKILL and resumed to the same step.
#
# Runs in a scratch dir (--workdir DIR, default a new temp dir): never touches your outputs, cache
# or checkpoints. Spends at most --budget-limit (default $1.00) on the teacher named by the config's
# generate section (or the flags). Prints the checklist and writes preflight_report.md there.
# Exit 0: nothing failed; 2: a check failed (the report says the fix); 4: the teacher refused us.
set -euo pipefail
# KDFORGE may name another entry point, e.g. KDFORGE="python -m kdforge" (split into words on purpose).
exec ${KDFORGE:-kdforge} preflight --only training "$@"
