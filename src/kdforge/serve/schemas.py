"""Request bodies of the OpenAI API subset `kdforge serve` implements.

Fields that change no output are accepted and ignored (clients send many: `user`, `store`,
`metadata`, …), so a client written for OpenAI works unchanged. Sampling fields a local model can
honour are honoured (OpenAI's `logit_bias`, `presence_penalty`, `frequency_penalty`; vLLM's
`top_k`, `min_tokens`, `repetition_penalty`, `ignore_eos`); a field that would change the output
and is not implemented (`response_format`, `tools`, `best_of`, `min_p`, guided decoding, …) is
refused with 400 naming it, never silently ignored. Out-of-range values are rejected with 400 and
the offending field named (`param`), as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kdforge.serve.api_error import invalid
from kdforge.serve.limits import MAX_PROMPTS, MAX_ROWS
from kdforge.serve.sampling import MAX_TOP_LOGPROBS

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_N = 16
MAX_LOGIT_BIAS = 300  # entries; OpenAI caps each bias at +-100


def _is_default(v: Any, *defaults: Any) -> bool:
    return v is None or any(v == d for d in defaults)


# field -> (values that change nothing, why it is refused otherwise). A client that sends one of
# these expects an output this server cannot give: 400 naming it beats an answer that ignores it.
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "response_format": (({"type": "text"},), "structured output (JSON mode / schema) is not supported: "
                                             "drop response_format and validate the text yourself"),
    "tools": (([],), "tool calling is not supported by kdforge serve"),
    "tool_choice": (("none", "auto"), "tool calling is not supported by kdforge serve"),
    "functions": (([],), "function calling is not supported by kdforge serve"),
    "function_call": (("none", "auto"), "function calling is not supported by kdforge serve"),
    "best_of": ((1,), "best_of is not supported: ask for n choices and pick one yourself"),
    "min_p": ((0, 0.0), "min_p is not supported: use top_p or top_k"),
    "typical_p": ((1, 1.0), "typical_p is not supported: use top_p or top_k"),
    "use_beam_search": ((False,), "beam search is not supported"),
    "length_penalty": ((1, 1.0), "length_penalty (beam search) is not supported"),
    "stop_token_ids": (([],), "stop_token_ids is not supported: use stop strings"),
    "bad_words": (([],), "bad_words is not supported: use logit_bias -100 on their tokens"),
    "allowed_token_ids": (([],), "allowed_token_ids is not supported: use logit_bias"),
    "guided_json": ((), "guided decoding is not supported"),
    "guided_regex": ((), "guided decoding is not supported"),
    "guided_choice": ((), "guided decoding is not supported"),
    "guided_grammar": ((), "guided decoding is not supported"),
    "structured_outputs": ((), "structured output is not supported"),
    "include_stop_str_in_output": ((False,), "include_stop_str_in_output is not supported"),
    "skip_special_tokens": ((True,), "skip_special_tokens false is not supported"),
    "truncate_prompt_tokens": ((), "truncate_prompt_tokens is not supported: shorten the prompt"),
    "prediction": ((), "predicted outputs are not supported"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "chat_template": ((), "a request's own chat_template is not supported: the model's template is used"),
    "chat_template_kwargs": (({},), "chat_template_kwargs is not supported"),
    "continue_final_message": ((False,), "continue_final_message is not supported"),
    "add_generation_prompt": ((True,), "add_generation_prompt false is not supported"),
    "web_search_options": ((), "web search is not supported"),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    # torch seeds a generator with a 64-bit integer: anything wider is refused here (400), not
    # deep in the engine (it was a 500 carrying the raw OverflowError).
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: return the generated (and prompt) token ids beside the text.
    return_token_ids: bool = False
    # What a local model honours with logits processors (sampling.py RowLogits).
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    top_k: int = Field(0, ge=-1)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # Declared only so that a request asking for them is refused (see UNSUPPORTED), not ignored.
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    best_of: Any = None
    min_p: Any = None
    typical_p: Any = None
    use_beam_search: Any = None
    length_penalty: Any = None
    stop_token_ids: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    truncate_prompt_tokens: Any = None
    prediction: Any = None
    audio: Any = None
    modalities: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    continue_final_message: Any = None
    add_generation_prompt: Any = None
    web_search_options: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if not v:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
        for k, b in v.items():
            if not k.strip().isdigit():
                raise ValueError(f"keys are token ids (digits), got {k[:40]!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"biases lie in [-100, 100], got {b} for token {k}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refuse_unsupported(self) -> None:
        """400 naming the first field that asks for something this server does not do."""
        for name, (defaults, why) in UNSUPPORTED.items():
            if not _is_default(getattr(self, name), *defaults):
                raise invalid(name, f"{why} (got {name}={str(getattr(self, name))[:80]})")
        if self.min_tokens and self.limit is not None and self.min_tokens > self.limit:
            raise invalid("min_tokens", f"min_tokens ({self.min_tokens}) is more than max_tokens ({self.limit})")

    def logit_bias_pairs(self, vocab_size: int) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias), every id checked against the vocabulary (400 naming it)."""
        pairs = tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())
        bad = [t for t, _ in pairs if not 0 <= t < vocab_size]
        if bad:
            raise invalid("logit_bias", f"token id {bad[0]} is not in the vocabulary [0, {vocab_size})")
        return pairs


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        """The message's text; parts other than text (images, audio) are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise ValueError(f"content parts of type {bad[0]!r} are not supported (text only)")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    prompt_logprobs: int | None = None  # declared only to refuse it (not silently ignore it)

    def check(self) -> None:
        """Rules across fields; raises APIError(400) naming the field."""
        self.refuse_unsupported()
        if self.prompt_logprobs is not None:
            raise invalid("prompt_logprobs", "prompt_logprobs is served on /v1/completions: send the "
                                             "conversation's token ids as `prompt` there (return_token_ids "
                                             "gives them as prompt_token_ids)")
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs requires logprobs: true")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's legacy default; 0: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # the prompt comes back before the completion (with its logprobs if asked)
    # vLLM's extension: logprobs of the prompt's own tokens, with this many alternatives each.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    def check(self) -> None:
        """Rules across fields; raises APIError(400) naming the field."""
        self.refuse_unsupported()
        if self.suffix:
            raise invalid("suffix", "suffix is not supported by kdforge serve")
        if isinstance(self.prompt, list) and not self.prompt:
            raise invalid("prompt", "prompt must not be an empty list")
        if self.max_tokens == 0 and not self.scores_prompt:
            raise invalid("max_tokens", "max_tokens 0 generates nothing: use it with echo: true and logprobs "
                                        "(or prompt_logprobs) to score the prompt, or ask for at least 1 token")
        n_prompts = len(self.prompts())
        if n_prompts > MAX_PROMPTS:
            raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request, got {n_prompts}: "
                                    "split them over several requests (they are batched together anyway)")
        if n_prompts * self.n > MAX_ROWS:
            raise invalid("n", f"prompts x n is {n_prompts} x {self.n} = {n_prompts * self.n} sequences; at most "
                               f"{MAX_ROWS} per request: lower n or send fewer prompts per request")

    @property
    def scores_prompt(self) -> bool:
        return (self.echo and self.logprobs is not None) or self.prompt_logprobs is not None

    @property
    def prompt_top(self) -> int | None:
        """Alternatives per prompt token the response needs (None: the prompt is not scored)."""
        ks = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(ks) if ks else None

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: texts, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)
