#!/usr/bin/env bash
# The seed plan's scripts/test_full_pipeline.sh.
#
#   scripts/test_full_pipeline.sh                          # the shipped example: kdforge demo (offline)
#   scripts/test_full_pipeline.sh --config configs/my.yaml [--teacher URL --model NAME] [...]
#
# Without arguments it runs `kdforge demo`: serve the shipped teacher, generate, validate, train,
# resume, evaluate, all on this machine. With a --config (and any other kdforge preflight flag) it
# runs `kdforge preflight --only pipeline` on your own teacher, tokenizer and config: every part of
# the seed's checklist in order, in a scratch dir, for at most --budget-limit (default $1.00).
# Exit 0: nothing failed; 2: a check failed (the report says the fix); 4: the teacher refused us.
set -euo pipefail
# KDFORGE may name another entry point, e.g. KDFORGE="python -m kdforge" (split into words on purpose).
KDFORGE="${KDFORGE:-kdforge}"
if [ "$#" -eq 0 ]; then
    exec $KDFORGE demo
fi
exec $KDFORGE preflight --only pipeline "$@"
