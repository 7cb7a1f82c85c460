"""Training memory: `estimate` (a built student, from the formula), `trace` (any local causal
LM, one fake forward traced), `report` (the `kdforge estimate-memory` text and JSON) and
`request` (what the command asks for, turned into one of them). Everything is importable from
`kdforge.model.memory`, as before the split."""

from kdforge.model.memory.estimate import (ALL_LINEAR, ATTENTIONS, DTYPE_BYTES, GB, LORA_TARGETS, MB, Estimate,
                                           LoraSetup, Setup, Term, alternatives, estimate, head_terms, layer_terms,
                                           lora_params, lora_setup)
from kdforge.model.memory.report import describe, formula_lines, model_json, model_report, report, to_json
from kdforge.model.memory.trace import (ModelEstimate, Traced, estimate_model, hf_config, lora_field,
                                        model_alternatives, trace_model)

__all__ = ["ALL_LINEAR", "ATTENTIONS", "DTYPE_BYTES", "GB", "LORA_TARGETS", "MB", "Estimate", "LoraSetup", "ModelEstimate",
           "Setup", "Term", "Traced", "alternatives", "describe", "estimate", "estimate_model", "formula_lines",
           "head_terms", "hf_config", "layer_terms", "lora_field", "lora_params", "lora_setup", "model_alternatives",
           "model_json", "model_report", "report", "to_json", "trace_model"]
