"""Request bodies of the OpenAI API subset `kdforge serve` implements.

Unknown fields are accepted and ignored (clients send many: `presence_penalty`, `user`, …), so
a client written for OpenAI works unchanged. Out-of-range values are rejected with 400 and the
offending field named (`param`), as OpenAI does.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kdforge.serve.api_error import invalid
from kdforge.serve.limits import MAX_PROMPTS, MAX_ROWS
from kdforge.serve.sampling import MAX_TOP_LOGPROBS

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_N = 16


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

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


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
