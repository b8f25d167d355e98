"""OpenAI-compatible request schemas (pydantic). Unknown or unsupported fields are refused
with a 400 naming the field, never silently ignored."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "UNSUPPORTED",
           "LoadLoRARequest", "UnloadLoRARequest"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (vLLM has it too)
    repetition_penalty: float = 1.0  # extension
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension
    # accepted only at their neutral values (see UNSUPPORTED)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Union[bool, int, None] = None  # completions: int (top alternatives); chat: bool
    top_logprobs: int | None = None  # chat only: alternatives per token (needs logprobs: true)
    logit_bias: dict | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


# field -> value it must keep (anything else is a 400: the server does not implement it)
UNSUPPORTED = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
               "echo": False, "best_of": (None, 1), "suffix": (None, "")}


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class LoadLoRARequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's route and fields)."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRARequest(BaseModel):
    """POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1)
