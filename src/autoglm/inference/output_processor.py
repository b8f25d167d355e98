"""The output processor: engine-core outputs (token ids) in, streamable text out.

It runs outside the engine core (vLLM v1's split): in `LLMEngine.step` right after the
core's step, and in the server on the event loop, while the core's thread steps on. Per
request it keeps

* an `IncrementalDetokenizer`: each new token costs one decode of a short window of ids
  (the tokens since the last complete piece of text plus a few before it, for the decoders
  that treat the start of a text specially), not a re-decode of the whole output. Text
  ending in an incomplete UTF-8 sequence (U+FFFD from a byte-level tokenizer) is held back
  until the next token completes it;
* the stop-string check: only the text not yet streamed is searched (a stop string can
  only start there, because any suffix that could begin one is held back), and a match
  cuts the text and finishes the request with `FinishReason.STOP` and the string as
  `stop_reason`. The processor cannot free the request's KV blocks itself: it returns a
  `StopStringHit` and its caller tells the engine core to `finish` the request.

So streamed pieces concatenate to the final text and never contain any part of a matched
stop string. Outputs for a request the processor no longer tracks (finished by a stop
string or aborted while the core was still stepping it) are dropped.

Example:
    >>> class Chars:                                     # a toy tokenizer: one character per id
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(map(chr, ids))
    >>> from autoglm.inference.request import EngineCoreOutput, SamplingParams
    >>> p = OutputProcessor(Chars())
    >>> p.add_request("r", SamplingParams(stop=["lo w"]), num_prompt_tokens=1)
    >>> res = p.process([EngineCoreOutput("r", [ord(c)]) for c in "hello world"])
    >>> "".join(o.new_text for o in res.outputs), res.outputs[-1].stop_reason, res.stops
    ('hel', 'lo w', [StopStringHit(request_id='r', stop='lo w', num_output_tokens=7)])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import EngineCoreOutput, FinishReason, RequestOutput, SamplingParams

__all__ = ["IncrementalDetokenizer", "OutputProcessor", "ProcessedOutputs", "StopStringHit"]

_INCOMPLETE = "\ufffd"  # what a byte-level decoder gives for an unfinished UTF-8 sequence


class IncrementalDetokenizer:
    """Text of a growing list of token ids, decoded a short window at a time.

    The window is ids[prefix:]; `prefix_text` = decode(ids[prefix:read]) is context
    already emitted. The new text is decode(ids[prefix:]) past `prefix_text` (and past
    what was emitted from this window before). When it does not end in U+FFFD the window
    moves on (prefix = read, read = end)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.prefix_text = ""
        self.emitted_in_window = 0  # characters past prefix_text already emitted from this window

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int], final: bool = False) -> str:
        """Add tokens; return the text they complete. `final`: flush everything (an incomplete
        character at the end is emitted as U+FFFD, as a full decode gives it)."""
        self.ids.extend(new_ids)
        full = self._decode(self.ids[self.prefix:])
        complete = full if final else full.rstrip(_INCOMPLETE)
        start = len(self.prefix_text) + self.emitted_in_window
        new = complete[start:]
        if final or len(complete) == len(full):  # nothing pending: slide the window
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self._decode(self.ids[self.prefix:self.read])
            self.emitted_in_window = 0
        else:
            self.emitted_in_window += len(new)
        return new


@dataclass
class StopStringHit:
    """A request the processor finished on a stop string: the engine core must finish it too
    (and drop the tokens it sampled past `num_output_tokens`)."""

    request_id: str
    stop: str
    num_output_tokens: int


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    stops: list[StopStringHit] = field(default_factory=list)


class _RequestState:
    def __init__(self, tokenizer, params: SamplingParams, num_prompt_tokens: int) -> None:
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = list(params.stop) if tokenizer is not None else []
        self.num_prompt_tokens = num_prompt_tokens
        self.num_output_tokens = 0
        self.pending = ""  # text decoded but not streamed yet: it may begin a stop string

    def update(self, o: EngineCoreOutput) -> tuple[str, str | None]:
        """The text to stream for this output and the stop string it completed (or None)."""
        self.num_output_tokens += len(o.new_token_ids)
        if self.detok is None:
            return "", None
        # a stop token or EOS ends the text as it is; a length finish still loses to a stop string
        final = o.finished
        text = self.pending + self.detok.push(o.new_token_ids, final=final)
        if self.stop and o.finish_reason != FinishReason.STOP:
            hits = [(i, s) for s in self.stop if (i := text.find(s)) >= 0]
            if hits:
                i, s = min(hits)
                self.pending = ""
                return text[:i], s
        if final or not self.stop:
            self.pending = ""
            return text, None
        hold = max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])),
                   default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], None


class OutputProcessor:
    def __init__(self, tokenizer=None) -> None:
        """tokenizer: anything with `decode(ids, skip_special_tokens=True)`; None = no text (ids only)."""
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, params: SamplingParams, num_prompt_tokens: int) -> None:
        self._states[request_id] = _RequestState(self.tokenizer, params, num_prompt_tokens)

    def abort(self, request_id: str) -> None:
        """Stop tracking a request (cancelled, or refused by the core)."""
        self._states.pop(request_id, None)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._states

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        res = ProcessedOutputs()
        for o in core_outputs:
            st = self._states.get(o.request_id)
            if st is None:  # already finished here (a stop string) or aborted
                continue
            text, stop = st.update(o)
            reason, stop_reason = o.finish_reason, o.stop_reason
            if stop is not None:
                reason, stop_reason = FinishReason.STOP, stop
                if not o.finished:
                    res.stops.append(StopStringHit(o.request_id, stop, st.num_output_tokens))
            if reason is not None:
                del self._states[o.request_id]
            res.outputs.append(RequestOutput(o.request_id, o.new_token_ids, text, reason is not None, reason,
                                             stop_reason, st.num_prompt_tokens, st.num_output_tokens, o.queue_time,
                                             o.logprobs, o.prompt_logprobs))
        return res
