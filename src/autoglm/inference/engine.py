"""`LLMEngine`: the synchronous engine, requests (text or token ids) in, streamed text out.

    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=256))
    rid = engine.add_request("def f(", SamplingParams(max_tokens=20, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():      # RequestOutput per request that advanced
            ...
    engine.generate(["a", "b"], SamplingParams(...))  # convenience: run to completion
    engine.add_lora("sql", "runs/a-lora")  # PEFT adapter dir; then add_request(..., lora="sql")

It is the engine core (`engine_core.EngineCore`: schedule -> execute -> update) and an
output processor (`output_processor.OutputProcessor`: detokenisation, stop strings) run
one after the other in the caller's thread; the server (`async_engine.AsyncEngine`) runs
the same two parts on two threads. Requests on different LoRA adapters (and on the base
model) share a step: the adapters' deltas are added per packed token by `MultiLoRA` hooks,
never merged into the weights.
"""

from __future__ import annotations

from .engine_core import EngineConfig, EngineCore, EngineStats
from .lora import LoRAAdapter
from .output_processor import OutputProcessor
from .request import FinishReason, Request, RequestOutput, SamplingParams

__all__ = ["LLMEngine", "EngineConfig", "EngineStats"]


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.core = EngineCore(model, config, None if tokenizer is None else tokenizer.eos_token_id)
        self.processor = OutputProcessor(tokenizer)
        self._reqs: dict[str, Request] = {}  # requests added here and not finished yet

    # the core's parts, for callers that inspect them (tests, benchmarks)
    model = property(lambda self: self.core.model)
    config = property(lambda self: self.core.config)
    stats = property(lambda self: self.core.stats)
    pool = property(lambda self: self.core.pool)
    kv = property(lambda self: self.core.kv)
    scheduler = property(lambda self: self.core.scheduler)
    runner = property(lambda self: self.core.runner)
    lora = property(lambda self: self.core.lora)
    requests = property(lambda self: self.core.requests, doc="unfinished requests by id")
    max_len = property(lambda self: self.core.max_model_len)

    # --------------------------------------------------------------- requests
    def add_lora(self, name: str, path) -> LoRAAdapter:
        """Serve a PEFT LoRA adapter directory under `name` (see `EngineCore.add_lora`)."""
        return self.core.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.core.remove_lora(name)

    def list_loras(self) -> list[str]:
        return self.core.lora.names()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, lora: str | None = None) -> str:
        """Queue a prompt (text, or token ids), on the base model or the LoRA adapter named `lora`.
        Raises ValueError (InvalidRequestError) for a request the engine cannot serve."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompt given but the engine has no tokenizer; pass token ids")
            prompt = self.tokenizer(prompt).input_ids
        req = self.core.add_request(prompt, params or SamplingParams(), request_id, lora)
        self.processor.add_request(req.request_id, req.params, len(req.prompt_ids))
        self._reqs[req.request_id] = req
        return req.request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks go back to the pool. False if it is unknown or done."""
        self.processor.abort(request_id)
        self._reqs.pop(request_id, None)
        return self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return len(self.core.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.core.scheduler.running)

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        res = self.processor.process(self.core.step())
        for hit in res.stops:
            self.core.finish(hit.request_id, FinishReason.STOP, hit.stop, hit.num_output_tokens)
        for o in res.outputs:
            if o.finished:  # a stop string can end a request the core finished on length: say so
                req = self._reqs.pop(o.request_id, None)
                if req is not None:
                    req.finish_reason, req.stop_reason = o.finish_reason, o.stop_reason
        return res.outputs

    # ------------------------------------------------------------- offline use
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 lora: str | None | list[str | None] = None) -> list[Request]:
        """Run prompts to completion with continuous batching; returns the finished requests in order.
        `lora`: one adapter name (or None) for all prompts, or one per prompt."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        llist = lora if isinstance(lora, list) else [lora] * len(prompts)
        reqs = [self._reqs[self.add_request(p, sp, lora=lo)] for p, sp, lo in zip(prompts, plist, llist)]
        while self.has_unfinished():
            self.step()
        return reqs

    def text_of(self, req: Request) -> str:
        """Decoded output text of a request (stop strings cut off), by a full decode."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        if req.stop_reason in req.params.stop:
            text = text[:text.find(req.stop_reason)]
        return text
