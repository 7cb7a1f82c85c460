"""`kdforge preflight`: the seed plan's "before spending money" checklist on the user's own
teacher, tokenizer and config, in a scratch dir (see run.py)."""

from kdforge.preflight.report import CHECKLIST, SETUP_ITEMS, Item, Report
from kdforge.preflight.run import PARTS, PreflightOptions, run_preflight

__all__ = ["CHECKLIST", "SETUP_ITEMS", "Item", "Report", "PARTS", "PreflightOptions", "run_preflight"]
