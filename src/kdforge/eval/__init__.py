"""`kdforge eval`: how close a student is to its teacher on held-out KD data.

    metrics.py    exact match, token F1, perplexity (pure functions)
    data.py       eval files -> EvalData (KD records and prompt/answer records, tokenised once)
    model_dir.py  MODEL_DIR -> model + tokenizer (full, LoRA, daemon checkpoint)
    scoring.py    a teacher over HTTP that scores tokens (top-K logprobs by token id)
    run.py        evaluate_loaded (in-process, for the daemon) and evaluate_model (MODEL_DIR) -> EvalResult

Heavy imports (torch, transformers) happen inside the functions: `kdforge eval --help` stays fast.
"""

from kdforge.eval.data import EvalData, load_eval_data
from kdforge.eval.run import EvalResult, evaluate_loaded, evaluate_model

__all__ = ["EvalData", "EvalResult", "evaluate_loaded", "evaluate_model", "load_eval_data"]
