"""What every route of `kdforge serve` reads: the engine, the served model and its tokenizer,
kept on the app as `app.state.serve` (`build_app` sets it, `routes.py` reads it).

Tokenizing runs on one worker thread (`off_loop`): a long prompt must not hold the event loop,
which answers every other client.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request

from kdforge.serve.api_error import APIError, invalid
from kdforge.serve.engine import Engine
from kdforge.serve.loader import ServedModel
from kdforge.serve.vocab import Vocab


class ServeState:
    """The served model, its engine and tokenizer, and the API key (None: no key needed)."""

    def __init__(self, engine: Engine, served: ServedModel, api_key: str | None):
        self.engine, self.served, self.api_key = engine, served, api_key
        self.tokenizer = served.tokenizer
        self.vocab = Vocab(self.tokenizer)
        # token ids a logit_bias may name: in the tokenizer and in the model's logits
        self.n_logits = min(len(self.tokenizer),
                            getattr(served.model.config, "vocab_size", None) or len(self.tokenizer))
        self.started = int(time.time())
        # One worker: tokenizers are not meant to be shared across threads, and one long prompt at
        # a time is what the engine could use anyway. The engine decodes with its own copy.
        self.tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="kdforge-tokenize")
        self.tokenize_jobs = 0  # calls run on the pool (GET /stats shows them)
        self.tokenize_running = 0  # of those, started and not yet ended

    async def off_loop(self, fn, *args):
        """`fn(*args)` on the tokenizer's thread, awaited without holding the event loop."""
        self.tokenize_jobs += 1
        self.tokenize_running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)
        finally:
            self.tokenize_running -= 1

    def check_model(self, name: str | None, *, optional: bool = False) -> None:
        """404 unless `name` is the served model's name (`optional`: None passes too)."""
        if name == self.served.name or (optional and name is None):
            return
        raise APIError(f"The model `{name}` does not exist. This server serves `{self.served.name}`"
                       + ("." if optional else " (see GET /v1/models)."),
                       status=404, param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.served.name, "object": "model", "created": self.started, "owned_by": "kdforge",
                "max_model_len": self.served.context_len}

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids: `messages` rendered as training renders them (`prompt_text`: the
        chat template, generation prompt added). 400 without a template (prompt_text's plain fallback
        is for training data; a client sending chat to a base model should hear so) or when the
        template rejects the conversation."""
        from kdforge.data.dataset import prompt_text

        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid("messages", f"cannot apply the chat template: model {self.served.name} has no chat "
                                      "template; use /v1/completions")
        try:
            text = prompt_text(self.tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - a template that rejects the conversation
            raise invalid("messages", f"cannot apply the chat template: {e}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenized(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Each prompt's token ids (a list of ids is taken as it is)."""
        return [prompt if isinstance(prompt, list) else self.tokenizer(prompt)["input_ids"] for prompt in prompts]


def serve_state(request: Request) -> ServeState:
    """The `ServeState` of the app answering `request`."""
    return request.app.state.serve
