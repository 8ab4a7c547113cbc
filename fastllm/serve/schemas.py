"""The request bodies the server accepts: the subset of OpenAI's completions and chat-completions schema that
fastllm implements, checked strictly (wrong types are not coerced, unknown fields are refused, NaN and
infinities are refused) so that a malformed request is answered 400 before it reaches the engine.

Parameters, as OpenAI defines them: max_tokens (completions default 16; chat default: the rest of the
context), temperature in [0, 2] (default 1; 0 = greedy), top_p in (0, 1], top_k >= 0 (an extension, as in
vLLM; 0 = no limit), stop (a string or up to 4), seed, n = 1, stream (+ stream_options.include_usage),
presence_penalty and frequency_penalty in [-2, 2] (default 0), repetition_penalty (an extension, as in vLLM
and transformers) in [0.01, 100] (default 1). Log-probabilities: completions `logprobs: k` (the chosen token
and the k most likely, k in [0, 20]); chat `logprobs: true` and `top_logprobs: k` (k in [0, 20]).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4
"""At most this many stop strings per request (OpenAI's limit)."""
MAX_SEED = 2 ** 64 - 1
"""torch.Generator.manual_seed takes seeds in [0, 2**64)."""
MAX_LOGPROBS = 20
"""At most this many alternatives per token in logprobs (OpenAI's chat limit; vLLM's default)."""
REPETITION_PENALTY_RANGE = (0.01, 100.0)
"""Bounds of repetition_penalty: it divides or multiplies logits, which stay finite and ordered within them."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop: Union[str, list[str], None] = Field(None, validate_default=True)
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or ())
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return tuple(stops)

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]] = Field(description="text, or token ids")
    max_tokens: int = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS,
                                    description="report the chosen token's and the k most likely tokens' logprobs")

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: Optional[bool] = Field(None, description="report the log-probability of each output token")
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, description="and of the k most likely tokens")

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
