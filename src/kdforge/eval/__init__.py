"""`kdforge eval`: how close a student is to its teacher on held-out KD data.

    metrics.py    exact match, token F1, perplexity (pure functions)
    data.py       eval files -> EvalData (KD records and prompt/answer records, tokenised once)
    model_dir.py  MODEL_DIR -> model + tokenizer (full, LoRA, daemon checkpoint)
    run.py        evaluate_loaded (in-process, for the daemon) and evaluate_model (MODEL_DIR) -> EvalResult

A teacher over HTTP (`--teacher URL`) is `teacher.scoring.TokenScorer`: top-K logprobs by token id.

Heavy imports (torch, transformers) happen inside the functions: `kdforge eval --help` stays fast.
"""

from kdforge.eval.data import EvalData, load_eval_data
from kdforge.eval.run import EvalResult, evaluate_loaded, evaluate_model

__all__ = ["EvalData", "EvalResult", "evaluate_loaded", "evaluate_model", "load_eval_data"]
