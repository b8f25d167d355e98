"""The engine core: token ids in, sampled token ids out (vLLM v1's EngineCore).

    core = EngineCore(model, EngineConfig(num_blocks=256), eos_token_id=0)
    req = core.add_request([5, 9, 2], SamplingParams(max_tokens=20, temperature=0))
    while core.has_unfinished():
        for out in core.step():        # EngineCoreOutput per request that sampled
            ...

One `step()` = `scheduler.schedule()` -> `runner.execute()` (packed forward + sampling) ->
`scheduler.update_from_output()`, the one place request state moves on. The core knows no
text: detokenisation, stop strings and streaming are the output processor's
(`output_processor.OutputProcessor`), which runs outside the core (in the caller's thread,
or on the server's event loop) and finishes a request that hit a stop string with `finish`.

`add_request` is the one place a request is checked (token ids of the prompt and of
`logit_bias` in the vocabulary, prompt and max_tokens inside the context, the request able
to fit the KV pool, the adapter loaded); it raises `InvalidRequestError` (a ValueError
naming the input at fault).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ..settings import setting
from .block_pool import BlockPool
from .cuda_graph import DecodeGraphOptions
from .kv_cache_manager import KVCacheManager
from .lora import LoRAAdapter, MultiLoRA
from .request import EngineCoreOutput, FinishReason, InvalidRequestError, Request, SamplingParams
from .runner import ModelRunner
from .scheduler import Scheduler

__all__ = ["EngineCore", "EngineConfig", "EngineStats", "StepError"]

logger = logging.getLogger(__name__)


class StepError(RuntimeError):
    """The model runner failed in a step (raised from its exception). `request_ids`: the requests
    that step ran; their state has not moved on (K/V the step wrote are past their computed
    tokens, so nothing reads them), so aborting them leaves every other request as it was."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(f"the model runner failed on a step of {len(request_ids)} request(s)")
        self.request_ids = request_ids


@dataclass
class EngineConfig:
    block_size: int = setting(16, "tokens per KV block")
    num_blocks: int = setting(1024, "KV blocks in the pool (memory = num_blocks * block_size slots per layer)")
    max_num_seqs: int = setting(64, "requests running at once")
    max_num_batched_tokens: int = setting(512, "tokens per engine step (prefill chunks + decode tokens)")
    early_exit_threshold: float = setting(1.0, "top probability at which decoding exits early; 1.0 = never")
    exit_layers: tuple[int, ...] | None = setting(None, "layers after which an early exit is tried; none = every "
                                                        "layer (`autoglm serve`: the run's trained exit layers "
                                                        "when its run.json records them)")
    cuda_graphs: bool | None = setting(None, "replay decode steps from CUDA graphs; none = when the model is on CUDA")
    cuda_graph_batch_sizes: tuple[int, ...] = setting((1, 2, 4, 8, 16, 32), "batch sizes captured (lazily, on first use)")
    cuda_graph_capture: bool = setting(True, "capture the graphs; off runs the same fixed-shape decode eagerly "
                                             "(a CPU check of the graph path)")
    compile_decode: bool = setting(False, "torch.compile the decode forward before capturing it (slow start, "
                                          "faster steps)")
    speculative_layer: int | None = setting(None, "self-speculative decoding: draft from the exit after this many "
                                                  "layers, verify with the rest (exact); none = no speculation "
                                                  "(`autoglm serve`: the run's first trained exit layer when its "
                                                  "run.json records early exits and early exit is off)")
    speculative_tokens: int = setting(0, "tokens drafted per step for requests that do not set their own "
                                         "`speculative_tokens`; 0 = speculate only when a request asks")
    speculative_min_prob: float = setting(0.0, "stop drafting a step at a draft whose exit top probability is "
                                               "below this (0 = always draft k); the output stays exact")
    prefix_caching: bool | None = setting(None, "share the K/V of blocks that earlier requests computed (the "
                                                "same leading tokens, prompt or generated, and adapter); none = "
                                                "on, except with early exit (its deferred tokens leave K/V "
                                                "incomplete)")
    speculative_draft_vocab: int = setting(0, "draft from the N lowest token ids only (a byte-level BPE's most "
                                              "frequent tokens): a draft head N/V as costly; 0 = the whole "
                                              "vocabulary; the output stays exact")

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.early_exit_threshold:
            raise ValueError(f"early_exit_threshold must be > 0 (1.0 = never exit), got {self.early_exit_threshold}")
        if self.speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0 (0 = off), got {self.speculative_tokens}")
        if (self.speculative_layer is not None or self.speculative_tokens) and self.early_exit_threshold < 1.0:
            raise ValueError("speculative decoding (speculative_layer, speculative_tokens) and early exit "
                             "(early_exit_threshold < 1) cannot be combined: exact self-speculative decoding and "
                             "approximate early exit use the same exit and do not combine; drop one of the two")
        if self.speculative_draft_vocab < 0:
            raise ValueError(f"speculative_draft_vocab must be >= 0 (0 = the whole vocabulary), "
                             f"got {self.speculative_draft_vocab}")
        if self.prefix_caching and self.early_exit_threshold < 1.0:
            raise ValueError("prefix caching and early exit (early_exit_threshold < 1) cannot be combined: an exited "
                             "token's upper-layer K/V is computed a step later, so its block cannot be shared when "
                             "written; leave prefix_caching unset (off with early exit) or drop early exit")
        if self.exit_layers is not None and (not self.exit_layers or min(self.exit_layers) < 1):
            raise ValueError(f"exit_layers must be layer counts >= 1 (e.g. 2,4), got {self.exit_layers}; "
                             f"none tries every layer")


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    kv_slots_allocated: int = 0  # summed over steps: live blocks * block_size
    kv_slots_used: int = 0  # summed over steps: slots holding a token some future query may attend to
    layers_run: int = 0  # summed over decode steps
    decode_steps: int = 0
    spec_steps: int = 0  # speculative steps, counted per request
    spec_drafted: int = 0  # draft tokens proposed in them
    spec_accepted: int = 0  # of those, accepted by the full model
    spec_emitted: int = 0  # tokens the speculative steps produced (accepted + the full model's corrections)
    prefix_queried: int = 0  # tokens of admitted requests looked up in the prefix cache (prompt, + output if preempted)
    prefix_hits: int = 0  # of those, served from cached blocks (not computed)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queried if self.prefix_queried else 0.0

    @property
    def tokens_per_spec_step(self) -> float:
        """Tokens a request gets from one speculative step (1 .. k + 1): the speed-up's upper bound."""
        return self.spec_emitted / self.spec_steps if self.spec_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.spec_accepted / self.spec_drafted if self.spec_drafted else 0.0

    @property
    def kv_waste(self) -> float:
        return 1.0 - self.kv_slots_used / self.kv_slots_allocated if self.kv_slots_allocated else 0.0


class EngineCore:
    def __init__(self, model, config: EngineConfig | None = None, eos_token_id: int | None = None) -> None:
        self.model = model.eval()
        self.config = cfg = config or EngineConfig()
        mc = model.config
        self.max_model_len = mc.max_position_embeddings
        self.sparse = mc.attention == "sparse"
        self.pool = BlockPool(cfg.num_blocks)
        self.prefix_caching = cfg.prefix_caching if cfg.prefix_caching is not None else cfg.early_exit_threshold >= 1.0
        self.kv = KVCacheManager(self.pool, cfg.block_size, mc.window_size if self.sparse else None,
                                 mc.num_global_tokens if self.sparse else 0, prefix_caching=self.prefix_caching)
        eos = mc.eos_token_id if eos_token_id is None else eos_token_id
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len, eos)
        L = mc.num_hidden_layers
        exit_layers = tuple(cfg.exit_layers or range(1, L))
        if any(not 1 <= e < L for e in exit_layers):
            raise ValueError(f"exit_layers {exit_layers} must be in [1, {L - 1}]: exits after one of the "
                             f"model's {L} layers except the last (which is the full model)")
        on_cuda = next(model.parameters()).device.type == "cuda"
        graphs = None
        if cfg.cuda_graphs or (cfg.cuda_graphs is None and on_cuda):
            sizes = tuple(b for b in cfg.cuda_graph_batch_sizes if b <= cfg.max_num_seqs) or (1,)
            graphs = DecodeGraphOptions(sizes, capture=cfg.cuda_graph_capture, compile=cfg.compile_decode)
        if cfg.speculative_tokens and cfg.speculative_layer is None:
            raise ValueError(f"speculative_tokens {cfg.speculative_tokens} needs a draft exit and the engine has none: "
                             f"set speculative_layer to a layer the model's exit was trained at (`autoglm train "
                             f"--early-exit --exit-layers 2`; `autoglm serve` takes it from the run's run.json)")
        if cfg.speculative_draft_vocab and cfg.speculative_layer is None:
            raise ValueError(f"speculative_draft_vocab {cfg.speculative_draft_vocab} sets the draft head of "
                             f"self-speculative decoding, and the engine has no draft exit: set speculative_layer")
        if cfg.speculative_tokens >= self.max_model_len:
            raise ValueError(f"speculative_tokens ({cfg.speculative_tokens}) must be smaller than the model's context "
                             f"({self.max_model_len} tokens)")
        self.runner = ModelRunner(model, self.kv, cfg.early_exit_threshold, exit_layers, graphs,
                                  speculative_layer=cfg.speculative_layer,
                                  speculative_min_prob=cfg.speculative_min_prob,
                                  speculative_draft_vocab=cfg.speculative_draft_vocab)
        self.requests: dict[str, Request] = {}  # unfinished requests
        self.stats = EngineStats()

    # --------------------------------------------------------------- requests
    @property
    def lora(self) -> MultiLoRA:
        return self.runner.lora

    def add_lora(self, name: str, path) -> LoRAAdapter:
        """Load a PEFT LoRA adapter directory and serve it under `name` (requests pick it with `lora=name`).
        Raises ValueError / FileNotFoundError at load time for an adapter that does not fit the model."""
        if self.config.early_exit_threshold < 1.0:
            raise ValueError("LoRA adapters cannot be served by an engine with early exit: the exits were trained "
                             "on the base model and deferred rows are not routed to adapters; set "
                             "early_exit_threshold=1.0 (or serve the adapter from a second engine)")
        return self.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        if any(r.lora == name for r in self.requests.values()):
            raise ValueError(f"LoRA adapter {name!r} is in use by unfinished requests; wait for them or abort them")
        self.lora.remove(name)
        self.kv.forget_prefixes(name)  # the name may come back with other weights

    def reset_prefix_cache(self) -> int:
        """Stop sharing every cached block (call it after changing the model's weights in place);
        returns how many were cached."""
        return self.kv.forget_prefixes(everything=True)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    lora: str | None = None) -> Request:
        """Queue a prompt (token ids) on the base model or the LoRA adapter `lora`; the one check
        of a request. Raises InvalidRequestError for one the engine cannot serve."""
        if lora is not None and lora not in self.lora:
            raise InvalidRequestError(f"no LoRA adapter named {lora!r}; loaded: {self.lora.names() or 'none'} "
                                      f"(add one with add_lora)", "model", "model_not_found")
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise InvalidRequestError("prompt is empty; give at least one token", "prompt")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}",
                                      "prompt")
        bad = [t for t in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab}) (the vocabulary); got {bad[0]}",
                                      "logit_bias")
        n, ctx = len(ids), self.max_model_len
        if n > ctx or (n == ctx and params.max_tokens != 0):  # a scoring request (max_tokens 0) may fill it
            raise InvalidRequestError(f"prompt has {n} tokens but the model's context is {ctx}; shorten the prompt",
                                      "prompt", "context_length_exceeded")
        if params.max_tokens is None:
            params = replace(params, max_tokens=ctx - n)
        params = self._check_speculation(params, lora)
        if n + params.max_tokens > ctx:
            raise InvalidRequestError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                                      f"context of {ctx} tokens; shorten the prompt or lower max_tokens",
                                      "max_tokens", "context_length_exceeded")
        need = self._max_blocks_per_seq(n + params.max_tokens)
        if need > self.pool.num_blocks:
            raise InvalidRequestError(f"this request can need {need} KV blocks but the pool has "
                                      f"{self.pool.num_blocks}; raise num_blocks or lower max_tokens", "max_tokens")
        if request_id is not None and request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        req = Request(ids, params, request_id=request_id or "", lora=lora)
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        self.stats.prompt_tokens += n
        return req

    def _check_speculation(self, params: SamplingParams, lora: str | None) -> SamplingParams:
        """Resolve a request's speculative_tokens (its own, else the engine's) and refuse what cannot run."""
        k = self.config.speculative_tokens if params.speculative_tokens is None else params.speculative_tokens
        if k and self.runner.speculator is None and self.config.early_exit_threshold < 1.0:
            raise InvalidRequestError(f"speculative_tokens: this server runs approximate early exit (threshold "
                                      f"{self.config.early_exit_threshold}), which exact self-speculative decoding "
                                      f"does not combine with; drop speculative_tokens, or serve without "
                                      f"--early-exit-threshold to speculate", "speculative_tokens")
        if k and self.runner.speculator is None:
            raise InvalidRequestError("speculative_tokens needs a draft exit, and this engine has none: serve a model "
                                      "trained with early exit (`autoglm train --early-exit`) with "
                                      "speculative_layer set, or drop speculative_tokens", "speculative_tokens")
        if k >= self.max_model_len:
            raise InvalidRequestError(f"speculative_tokens ({k}) must be smaller than the model's context "
                                      f"({self.max_model_len} tokens)", "speculative_tokens")
        if k >= self.config.max_num_batched_tokens:
            raise InvalidRequestError(f"speculative_tokens ({k}) + 1 verify rows exceed the engine's step budget "
                                      f"(max_num_batched_tokens {self.config.max_num_batched_tokens}); lower it",
                                      "speculative_tokens")
        if k and lora is not None:
            raise InvalidRequestError("speculative decoding runs on the base model only (its exit was trained "
                                      "there); drop speculative_tokens for LoRA requests", "speculative_tokens")
        if params.speculative_tokens is None and k:  # the engine's default applies
            return replace(params, speculative_tokens=k)
        return params  # (unchanged: None and 0 both mean no speculation)

    def _max_blocks_per_seq(self, total: int) -> int:
        if self.sparse:  # globals + window + one step's chunk, rounded out to blocks
            mc = self.model.config
            # (speculative drafts are counted in the step's token budget)
            span = mc.num_global_tokens + mc.window_size + self.config.max_num_batched_tokens
            if self.config.early_exit_threshold < 1.0:  # deferred tokens keep their windows' keys
                span += self.runner.max_deferred
            return min(-(-total // self.config.block_size), span // self.config.block_size + 3)
        return -(-total // self.config.block_size)

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks go back to the pool. False if it is unknown or done."""
        return self.finish(request_id, FinishReason.ABORT)

    def finish(self, request_id: str, reason: FinishReason, stop_reason: str | int | None = None,
               num_output_tokens: int | None = None) -> bool:
        """End a request from outside the step (an abort, or a stop string the output processor
        found): its blocks go back to the pool; tokens past `num_output_tokens` (sampled after
        the stop, before the processor saw it) are dropped. False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        if num_output_tokens is not None and num_output_tokens < len(req.output_ids):
            for seq in (req.output_ids, req.exit_layers, req.token_times):
                del seq[num_output_tokens:]
        self.scheduler.finish(req, reason, stop_reason)
        self._release_finished()
        return True

    def _release_finished(self) -> None:
        for rid in self.scheduler.take_finished():
            self.runner.forget(rid)
            self.requests.pop(rid, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def snapshot(self) -> dict[str, int]:
        """Queue depth and KV usage (plain counters: cheap, and safe to read from another thread)."""
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_blocks_used": self.pool.num_used, "kv_blocks_total": self.pool.num_blocks,
                "kv_blocks_cached": self.pool.num_cached, "prefix_queried_tokens": self.kv.prefix_queried,
                "prefix_hit_tokens": self.kv.prefix_hits}

    # ------------------------------------------------------------------- step
    def step(self) -> list[EngineCoreOutput]:
        so = self.scheduler.schedule()
        if not so.scheduled:
            if self.scheduler.has_unfinished and not self.scheduler.running:
                raise RuntimeError("no request could be scheduled with an empty batch: the KV pool is too small "
                                   "for the next request; raise num_blocks")
            return []
        self._account_kv()
        try:
            runner_out = self.runner.execute(so)
        except Exception as exc:
            raise StepError([s.request.request_id for s in so.scheduled]) from exc
        outs = self.scheduler.update_from_output(so, runner_out)
        st = self.stats
        st.steps += 1
        if all(s.num_new_tokens == 1 for s in so.scheduled):
            st.decode_steps += 1
            st.layers_run += runner_out.exit_layer
        st.generated_tokens += sum(len(o.new_token_ids) for o in outs)
        for res in runner_out.speculated.values():
            st.spec_steps += 1
            st.spec_drafted += res.num_drafted
            st.spec_accepted += res.num_accepted
            st.spec_emitted += len(res.token_ids)
        st.preemptions = self.scheduler.num_preemptions
        st.prefix_queried, st.prefix_hits = self.kv.prefix_queried, self.kv.prefix_hits
        self._release_finished()
        return outs

    def _account_kv(self) -> None:
        """Allocated vs used KV slots of the running requests. A slot is used when it holds (or this
        step writes) a token that a query of this step or later can still attend to: position
        < num_tokens and, for sparse attention, inside the window of the step's first query or
        global."""
        bs = self.config.block_size
        mc = self.model.config
        G = mc.num_global_tokens if self.sparse else 0
        for r in self.scheduler.running:
            table = self.kv.tables.get(r.request_id, [])
            live = [j for j, b in enumerate(table) if b is not None]
            self.stats.kv_slots_allocated += len(live) * bs
            last = r.num_tokens
            lo = max(0, r.num_computed_tokens - mc.window_size + 1) if self.sparse else 0
            for j in live:
                a, b = j * bs, min((j + 1) * bs, last)
                used = max(0, b - max(a, lo)) + max(0, min(b, G, lo) - a)  # window part + global part
                self.stats.kv_slots_used += used
