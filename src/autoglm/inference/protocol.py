"""The OpenAI protocol: request schemas (pydantic) and the adapters between them and the engine.

Requests in: `CompletionRequest` / `ChatCompletionRequest` (unknown or unsupported fields
are refused with a 400 naming the field, never silently ignored), `sampling_params(req)`
-> one `SamplingParams` per candidate of a prompt (`best_of`, default `n`),
`encode_prompts` -> the token ids of each prompt (a completion's `prompt` is a string, a
list of strings, a list of token ids or a list of such lists: a batch of prompts),
`chat_prompt` -> text. Responses out: `ResponseBuilder` turns the engine's
`RequestOutput`s of one API call into the whole response (`text_completion` /
`chat.completion`) or its SSE chunks: prompt i's choices are indices i*n .. i*n+n-1 (of
`best_of` candidates, the n with the highest cumulative log-probability), with logprobs in
the completions shape `{tokens, token_logprobs, top_logprobs, text_offset}` (with `echo`,
the prompt's tokens first, the very first scored `null`) or the chat shape `{content:
[{token, logprob, bytes, top_logprobs}]}`. `APIError` is the OpenAI error body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
import weakref
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .request import MAX_LOGPROBS, RequestOutput, SamplingParams

__all__ = ["CompletionRequest", "ChatCompletionRequest", "ChatMessage", "StreamOptions", "UNSUPPORTED",
           "LoadLoRARequest", "UnloadLoRARequest", "APIError", "ImagePart", "decode_image_url",
           "chat_prompt", "echo_texts", "encode_prompt", "encode_prompts",
           "sampling_params", "LogprobFormatter", "ResponseBuilder"]


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
    min_p: float = 0.0  # extension (vLLM)
    repetition_penalty: float = 1.0  # extension (vLLM)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's shape) -> bias in [-100, 100]
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # int64; candidate i of n draws with seed + i
    user: str | None = None
    ignore_eos: bool = False  # extension
    # extension: self-speculative decoding, tokens drafted per step from the exit layer (0 = off; none = the
    # server's default). The output is unchanged (greedy) or identically distributed (sampling)
    speculative_tokens: int | None = Field(default=None, ge=0)
    logprobs: Union[bool, int, None] = None  # completions: int (top alternatives); chat: bool
    top_logprobs: int | None = None  # chat only: alternatives per token (needs logprobs: true)
    # accepted only at their neutral values (see UNSUPPORTED)
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None


# field -> value it must keep (anything else is a 400: the server does not implement it)
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "suffix": (None, "")}


class CompletionRequest(_Common):
    # a text, a batch of texts, token ids, or a batch of token-id lists (one choice set per prompt)
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]  # strict: true or "1" is no token id
    echo: bool = False  # the prompt comes back before the completion (with its logprobs when asked)
    best_of: int | None = Field(default=None, ge=1, le=16)  # candidates per prompt; the n likeliest are returned
    suffix: str | None = None


class TextPart(BaseModel):
    """One text part of a chat message's content (OpenAI's list form)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """An image part (OpenAI's `image_url`); served as a data URL (`data:image/png;base64,...`)
    when the model has an image projector (see `autoglm.multimodal.projector`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[Union[TextPart, ImagePart]]]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def image_urls(self) -> list[str]:
        return [] if isinstance(self.content, str) else [p.image_url.url for p in self.content
                                                         if isinstance(p, ImagePart)]


def decode_image_url(url: str) -> bytes:
    """The bytes of a base64 image data URL; APIError 400 for anything else (the server fetches
    no remote URL)."""
    import base64
    import binascii

    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise APIError(400, "image_url must be a base64 data URL (data:image/png;base64,...); the server does not "
                            "fetch remote images", "messages")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url's data is not valid base64", "messages") from None


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


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------ requests in
def chat_prompt(messages) -> str:
    """A plain chat template: one "role: content" line per message, then "assistant:"; a
    message's `name` (which participant of that role speaks) goes in brackets after the role,
    "user (alice): ...". An assistant message goes verbatim right after "assistant:", where the
    model wrote it (the API returns the answer as generated, e.g. with its leading space), so a
    conversation's next turn repeats the tokens of the one before and reuses their cached K/V
    blocks."""
    def line(m) -> str:
        name = getattr(m, "name", None)
        role = f"{m.role} ({name})" if name else m.role
        return f"{role}:{'' if m.role == 'assistant' else ' '}{getattr(m, 'text', m.content)}\n"
    return "".join(line(m) for m in messages) + "assistant:"


def encode_prompt(tokenizer, prompt) -> list[int]:
    """One prompt (text or token ids) as token ids."""
    if isinstance(prompt, list):
        return list(prompt)
    return tokenizer(prompt).input_ids


def encode_prompts(tokenizer, prompt, max_prompts: int | None = None) -> list[list[int]]:
    """A completion's `prompt` in any of its four shapes as one token-id list per prompt.
    Raises APIError (400, param 'prompt') for an empty prompt or a batch over `max_prompts`."""
    if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
        batch = [prompt]
    else:
        batch = list(prompt)
    if not batch:
        raise APIError(400, "'prompt' is an empty list; send a text, a list of token ids or a list of prompts",
                       "prompt")
    if max_prompts is not None and len(batch) > max_prompts:
        raise APIError(400, f"'prompt' holds a batch of {len(batch)} prompts but this server takes at most "
                            f"{max_prompts} per request; split the batch", "prompt", "too_many_prompts")
    out = []
    for i, p in enumerate(batch):
        ids = encode_prompt(tokenizer, p)
        if not ids:
            where = "'prompt'" if len(batch) == 1 else f"prompt {i} of the batch"
            raise APIError(400, f"{where} is empty (no tokens); give at least one token", "prompt")
        out.append(ids)
    return out


def echo_texts(tokenizer, prompt, prompts: list[list[int]]) -> list[str]:
    """The text `echo` returns for each prompt: a text prompt as it was sent, token ids as they decode."""
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [tokenizer.decode(ids) for ids in prompts]


def _logit_bias(req) -> dict[int, float]:
    out = {}
    for k, v in (req.logit_bias or {}).items():
        try:
            out[int(k)] = float(v)
        except ValueError:
            raise APIError(400, f"'logit_bias' keys are token ids; {k!r} is not an integer", "logit_bias") from None
    return out


def sampling_params(req: CompletionRequest | ChatCompletionRequest) -> list[SamplingParams]:
    """One SamplingParams per candidate of a prompt (`best_of`, default n; a seeded request's
    candidate i gets seed + i). The engine checks them against the prompt and the context
    (and logit_bias against the vocabulary) when it adds the request."""
    for name, neutral in UNSUPPORTED.items():
        if getattr(req, name, neutral[0]) not in neutral:
            raise APIError(400, f"'{name}' is not supported by this server; remove it from the request", name,
                           "unsupported_parameter")
    rf = req.response_format
    if rf is not None and rf.get("type") != "text":
        raise APIError(400, f"response_format {rf.get('type')!r} is not supported (no constrained decoding); "
                            "use type 'text' or drop the field", "response_format", "unsupported_parameter")
    chat = isinstance(req, ChatCompletionRequest)
    # chat: up to the context when not given (the engine resolves None); completions: OpenAI's 16
    if chat:
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
    else:
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
    echo = not chat and req.echo
    best_of = (None if chat else req.best_of) or req.n
    if best_of < req.n:
        raise APIError(400, f"'best_of' ({best_of}) must be >= n ({req.n}): it is how many candidates the n "
                            f"choices are picked from", "best_of")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "'stream_options' applies to streamed responses only; send stream: true or drop it",
                       "stream_options")
    if req.stream and echo:
        raise APIError(400, "'echo' cannot be streamed (the prompt's logprobs come with the whole response); "
                            "send stream: false", "echo")
    if req.stream and best_of > req.n:
        raise APIError(400, f"'best_of' ({best_of}) > n ({req.n}) cannot be streamed (the best candidates are "
                            "known only at the end); send stream: false or best_of = n", "best_of")
    if max_tokens == 0 and not echo:
        raise APIError(400, "'max_tokens' 0 generates nothing; it scores the prompt only with echo: true "
                            "(and logprobs)", "max_tokens")
    logprobs = _logprobs_arg(req, chat)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    # best_of ranks candidates by their tokens' logprobs: computed even when not shown
    sample_logprobs = 0 if logprobs is None and best_of > req.n else logprobs
    prompt_logprobs = logprobs if echo else None
    if max_tokens == 0 and prompt_logprobs is None:
        prompt_logprobs = 0  # a scoring request still needs a result to wait for
    try:
        return [SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                               min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                               presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                               logit_bias=_logit_bias(req), seed=None if req.seed is None else req.seed + i,
                               stop=stop, ignore_eos=req.ignore_eos, logprobs=sample_logprobs,
                               prompt_logprobs=prompt_logprobs, speculative_tokens=req.speculative_tokens)
                for i in range(best_of)]
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), field if field in type(req).model_fields else None) from None


def _logprobs_arg(req, chat: bool) -> int | None:
    """Number of top alternatives per token, or None when logprobs are not asked for.
    Completions: `logprobs: N`. Chat: `logprobs: true` with optional `top_logprobs: N`."""
    if not chat:
        if req.top_logprobs is not None:
            raise APIError(400, "'top_logprobs' belongs to chat completions; for completions send 'logprobs': N",
                           "top_logprobs")
        if req.logprobs is None:
            return None
        if isinstance(req.logprobs, bool):
            raise APIError(400, "'logprobs' of a completion is an integer (top alternatives per token, 0-"
                                f"{MAX_LOGPROBS}), not a boolean", "logprobs")
        n = req.logprobs
    else:
        if req.logprobs is not None and not isinstance(req.logprobs, bool):
            raise APIError(400, "'logprobs' of a chat completion is a boolean; give the number of alternatives "
                                "in 'top_logprobs'", "logprobs")
        if not req.logprobs:
            if req.top_logprobs:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        n = req.top_logprobs or 0
    if not 0 <= n <= MAX_LOGPROBS:
        raise APIError(400, f"the number of top logprobs must be in [0, {MAX_LOGPROBS}], got {n}",
                       "top_logprobs" if chat else "logprobs")
    return n


# ---------------------------------------------------------------- responses out
_TOKEN_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _token_texts(tokenizer) -> dict[int, str]:
    """The text of each single token id, decoded once per tokenizer and kept while it lives
    (logprobs name every scored token and its alternatives; an echoed prompt has hundreds)."""
    return _TOKEN_TEXTS.setdefault(tokenizer, {})


_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.cache
def _byte_of_symbol() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's printable stand-in for each of the 256 bytes),
    inverted: symbol -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {sym: b for b, sym in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """The UTF-8 bytes one token stands for (the chat logprobs' `bytes`). A byte-level token can
    hold part of a character (an emoji spans several tokens): its decoded `text` is then U+FFFD,
    so its bytes come from its byte-level symbols, which clients join across tokens to rebuild
    the character. A tokenizer that is not byte-level gives the bytes of `text`."""
    cache = _TOKEN_BYTES.setdefault(tokenizer, {})
    if token_id not in cache:
        to_piece = getattr(tokenizer, "convert_ids_to_tokens", None)
        table, piece = _byte_of_symbol(), to_piece(token_id) if to_piece else None
        if isinstance(piece, str) and piece and all(c in table for c in piece):
            cache[token_id] = [table[c] for c in piece]
        else:
            cache[token_id] = list(text.encode("utf-8"))
    return cache[token_id]


class LogprobFormatter:
    """One choice's logprobs in the OpenAI shape (see module docstring); completions keep the
    running `text_offset` across calls."""

    def __init__(self, tokenizer, chat: bool) -> None:
        self.tok, self.chat, self.offset = tokenizer, chat, 0

    def _text(self, token_id: int) -> str:
        return _token_texts(self.tok)[token_id]

    def _decode_missing(self, ids) -> None:
        """Decode, in one batch, the token ids not yet cached."""
        texts = _token_texts(self.tok)
        missing = sorted(set(ids) - texts.keys())
        if missing:
            texts.update(zip(missing, self.tok.batch_decode([[i] for i in missing])))

    def payload(self, entries) -> dict | None:
        if entries is None:
            return None
        self._decode_missing([e.token_id for e in entries] + [i for e in entries for i, _ in e.top])
        if self.chat:
            def item(tid, lp):
                t = self._text(tid)
                return {"token": t, "logprob": lp, "bytes": token_bytes(self.tok, tid, t)}
            return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]}
                                for e in entries]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            t = self._text(e.token_id)
            out["tokens"].append(t)
            out["token_logprobs"].append(e.logprob)
            tops = {}
            for i, v in e.top:
                tops.setdefault(self._text(i), v)  # two ids can decode to the same text: keep the likelier
            out["top_logprobs"].append(tops)
            out["text_offset"].append(self.offset)
            self.offset += len(t)
        return out

    def prompt_payload(self, prompt_ids: list[int], entries) -> dict:
        """The echoed prompt's logprobs (completions shape): its first token has no context, so
        its logprob and top alternatives are null; entry i of `entries` scores token i + 1."""
        self._decode_missing(prompt_ids[:1])
        first = self._text(prompt_ids[0])
        out = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [self.offset]}
        self.offset += len(first)
        return self.merge(out, self.payload(entries))

    @staticmethod
    def merge(a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return a or b
        return {k: a[k] + b[k] for k in a}


class ResponseBuilder:
    """The response of one API call, whole or as SSE chunks. The call ran `best_of` candidates
    (default n) for each of its prompts, in order: candidate j of prompt i is slot
    i * best_of + j of the engine's stream. The whole response returns, per prompt, the n
    candidates with the highest cumulative log-probability (all of them, in order, when
    best_of == n); streams need best_of == n, so a slot is its choice index."""

    def __init__(self, req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]], tokenizer,
                 prompt_texts: list[str] | None = None) -> None:
        self.chat = isinstance(req, ChatCompletionRequest)
        self.model, self.n = req.model, req.n
        self.best_of = (None if self.chat else req.best_of) or req.n
        self.echo = not self.chat and req.echo
        self.show_logprobs = req.logprobs is not None and req.logprobs is not False
        self.prompts, self.prompt_texts = prompts, prompt_texts
        self.num_slots = len(prompts) * self.best_of
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.logprobs = [LogprobFormatter(tokenizer, self.chat) for _ in range(self.num_slots)]
        chunk_object = self.object + (".chunk" if self.chat else "")
        # every SSE event starts alike: serialise that part once
        self._event_head = "data: " + json.dumps({"id": self.id, "object": chunk_object, "created": self.created,
                                                  "model": self.model})[:-1] + ', "choices": '
        self._delta_key, self._delta_end = ('"delta": {"content"', "}") if self.chat else ('"text"', "")
        self.texts, self.lps = [""] * self.num_slots, [None] * self.num_slots
        self.cum_logprob = [0.0] * self.num_slots
        self._started = [False] * self.num_slots
        self.finals: list[RequestOutput | None] = [None] * self.num_slots

    def usage(self) -> dict:
        c = sum(o.num_output_tokens for o in self.finals if o is not None)
        p = sum(len(ids) for ids in self.prompts)  # each prompt once, whatever n / best_of (OpenAI, vLLM)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _choice(self, i: int, text: str, lp: dict | None, final: RequestOutput | None, whole: bool) -> dict:
        c = {"index": i, "finish_reason": final.finish_reason.value if final else None, "logprobs": lp}
        if final is not None:
            c["stop_reason"] = final.stop_reason
        if self.chat:
            c["message" if whole else "delta"] = {"role": "assistant", "content": text} if whole else {"content": text}
        else:
            c["text"] = text
        return c

    # -------------------------------------------------------------- whole
    def add(self, batch: list[tuple[int, RequestOutput]]) -> None:
        for k, o in batch:
            f = self.logprobs[k]
            if self.echo and not self._started[k]:
                self._started[k] = True
                p = k // self.best_of  # the slot's first output: the prompt comes first
                self.texts[k] = self.prompt_texts[p] if self.prompt_texts is not None else ""
                if o.prompt_logprobs is not None and self.show_logprobs:
                    self.lps[k] = f.prompt_payload(self.prompts[p], o.prompt_logprobs)
                else:
                    f.offset = len(self.texts[k])
            self.texts[k] += o.new_text
            if o.logprobs:
                self.cum_logprob[k] += sum(e.logprob for e in o.logprobs)
                if self.show_logprobs:
                    self.lps[k] = LogprobFormatter.merge(self.lps[k], f.payload(o.logprobs))
            if o.finished:
                self.finals[k] = o

    def response(self) -> dict:
        choices = []
        for p in range(len(self.prompts)):
            slots = list(range(p * self.best_of, (p + 1) * self.best_of))
            if self.best_of > self.n:  # the n likeliest candidates, best first
                slots = sorted(slots, key=lambda k: -self.cum_logprob[k])[:self.n]
            choices += [self._choice(p * self.n + j, self.texts[k], self.lps[k], self.finals[k], True)
                        for j, k in enumerate(slots)]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------- chunks
    def _sse(self, choices: list[dict], **extra) -> str:
        tail = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items())
        return f"{self._event_head}{json.dumps(choices)}{tail}}}\n\n"

    def first_chunk(self) -> str:
        """Chat streams open with the assistant role of every choice; completions send nothing."""
        if not self.chat:
            return ""
        return self._sse([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                          for i in range(self.num_slots)])

    def chunk(self, batch: list[tuple[int, RequestOutput]]) -> str:
        """One SSE event for the outputs that arrived together; a choice that advanced several
        tokens since the last event gets them merged into one entry."""
        merged: dict[int, list] = {}
        for i, o in batch:
            lp = self.logprobs[i].payload(o.logprobs)
            if i in merged:
                m = merged[i]
                m[0] += o.new_text
                m[1] = LogprobFormatter.merge(m[1], lp)
                m[2] = o if o.finished else m[2]
            else:
                merged[i] = [o.new_text, lp, o if o.finished else None]
            if o.finished:
                self.finals[i] = o
        parts = [(f'{{"index": {i}, "finish_reason": null, "logprobs": null, {self._delta_key}: '
                  f'{json.dumps(t)}{self._delta_end}}}') if lp is None and f is None  # the common event, formatted directly
                 else json.dumps(self._choice(i, t, lp, f, False)) for i, (t, lp, f) in merged.items()]
        return f"{self._event_head}[{', '.join(parts)}]}}\n\n"

    def last_chunks(self) -> str:
        return (self._sse([], usage=self.usage()) if self.include_usage else "") + "data: [DONE]\n\n"

    def error_chunk(self, e: APIError) -> str:
        return f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind}})}\n\n"
