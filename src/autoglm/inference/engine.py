"""The engine: requests in, streamed tokens out. Wires scheduler, KV-cache manager, runner.

    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=256))
    rid = engine.add_request("def f(", SamplingParams(max_tokens=20, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():      # RequestOutput per request that advanced
            ...
    engine.generate(["a", "b"], SamplingParams(...))  # convenience: run to completion
    engine.add_lora("sql", "runs/a-lora")  # PEFT adapter dir; then add_request(..., lora="sql")

One `step()` = schedule -> one packed forward -> sample -> detokenize -> stop checks.
Requests on different LoRA adapters (and on the base model) share a step: the adapters'
deltas are added per packed token by `MultiLoRA` hooks, never merged into the weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .block_pool import BlockPool
from .cuda_graph import CUDAGraphDecoder
from .kv_cache_manager import KVCacheManager
from .lora import LoRAAdapter, MultiLoRA
from .request import FinishReason, Request, RequestOutput, SamplingParams, TokenLogprob
from .runner import ModelRunner
from .sampling import sample_token
from .scheduler import Scheduler

__all__ = ["LLMEngine", "EngineConfig", "EngineStats"]

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 1024  # KV blocks in the pool (memory = num_blocks * block_size slots per layer)
    max_num_seqs: int = 64  # running requests at most
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decode tokens)
    early_exit_threshold: float = 1.0  # top-probability at which decoding exits early; >= 1.0 never
    exit_layers: tuple[int, ...] | None = None  # layers after which an exit is tried; None = every layer
    cuda_graphs: bool | None = None  # replay decode steps from CUDA graphs; None = when the model is on CUDA
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # buckets captured (lazily, on first use)
    compile_decode: bool = False  # torch.compile the decode forward before capturing it (slow start, faster steps)


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

    @property
    def kv_waste(self) -> float:
        return 1.0 - self.kv_slots_used / self.kv_slots_allocated if self.kv_slots_allocated else 0.0


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-probability of `token` under softmax(logits (V,)) and the `top` most likely tokens."""
    lp = logits.float().log_softmax(-1)
    alts = []
    if top:
        v, i = lp.topk(top)
        alts = list(zip(i.tolist(), v.tolist()))
    return TokenLogprob(token, float(lp[token]), alts)


class LLMEngine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = cfg = config or EngineConfig()
        mc = model.config
        self.sparse = mc.attention == "sparse"
        window = mc.window_size if self.sparse else None
        num_global = mc.num_global_tokens if self.sparse else 0
        self.pool = BlockPool(cfg.num_blocks)
        self.kv = KVCacheManager(self.pool, cfg.block_size, window, num_global)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv)
        self.lora = MultiLoRA(model)
        if cfg.cuda_graphs or (cfg.cuda_graphs is None and self.runner.device.type == "cuda"):
            sizes = tuple(b for b in cfg.cuda_graph_batch_sizes if b <= cfg.max_num_seqs) or (1,)
            self.runner.graphs = CUDAGraphDecoder(self.runner, sizes, compile=cfg.compile_decode)
        self.exit_layers = tuple(cfg.exit_layers or range(1, mc.num_hidden_layers))
        self.requests: dict[str, Request] = {}
        self._gens: dict[str, torch.Generator] = {}
        self._text: dict[str, str] = {}  # text streamed so far per request
        self.stats = EngineStats()
        self.max_len = mc.max_position_embeddings
        self.eos = mc.eos_token_id if tokenizer is None else tokenizer.eos_token_id

    # --------------------------------------------------------------- requests
    def _max_blocks_per_seq(self, total: int) -> int:
        if self.sparse:  # globals + window + one step's chunk, rounded out to blocks
            mc = self.model.config
            span = mc.num_global_tokens + mc.window_size + self.config.max_num_batched_tokens
            if self.config.early_exit_threshold < 1.0:  # deferred tokens keep their windows' keys
                span += self.runner.max_deferred
            return min(-(-total // self.config.block_size), span // self.config.block_size + 3)
        return -(-total // self.config.block_size)

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

    def list_loras(self) -> list[str]:
        return self.lora.names()

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, lora: str | None = None) -> str:
        """Queue a prompt (text, or token ids), on the base model or the LoRA adapter named `lora`.
        Raises ValueError for a prompt the model cannot serve or an adapter that is not loaded."""
        params = params or SamplingParams()
        if lora is not None and lora not in self.lora:
            raise ValueError(f"no LoRA adapter named {lora!r}; loaded: {self.list_loras() or 'none'} "
                             f"(add one with add_lora)")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompt given but the engine has no tokenizer; pass token ids")
            ids = self.tokenizer(prompt).input_ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty; give at least one token")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt has {len(ids)} tokens but the model's context is {self.max_len}; "
                             f"shorten the prompt")
        need = self._max_blocks_per_seq(min(len(ids) + params.max_tokens, self.max_len))
        if need > self.pool.num_blocks:
            raise ValueError(f"this request can need {need} KV blocks but the pool has {self.pool.num_blocks}; "
                             f"raise num_blocks or lower max_tokens")
        req = Request(ids, params, request_id=request_id or "", lora=lora)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        if params.seed is not None:
            self._gens[req.request_id] = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        self._text[req.request_id] = ""
        self.scheduler.add(req)
        self.stats.prompt_tokens += len(ids)
        return req.request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its KV blocks go back to the pool. False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self.scheduler.finish(req, FinishReason.ABORT)
        self._forget(req)
        return True

    def _forget(self, req: Request) -> None:
        self.runner.forget(req.request_id)
        self.requests.pop(req.request_id, None)
        self._gens.pop(req.request_id, None)
        self._text.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        so = self.scheduler.schedule()
        if not so.scheduled:
            if self.scheduler.has_unfinished and not self.scheduler.running:
                raise RuntimeError("no request could be scheduled with an empty batch: the KV pool is too small "
                                   "for the next request; raise num_blocks")
            return []
        self._account_kv()
        decode_only = all(s.num_new_tokens == 1 for s in so.scheduled)
        with self.lora.batch([(s.request.lora, s.num_new_tokens) for s in so.scheduled]):
            # LoRA deltas come from Python hooks, which a replayed (or captured) CUDA graph would
            # skip or bake in: a step with LoRA tokens runs the eager packed forward
            out = self.runner.execute(so, self.config.early_exit_threshold, self.exit_layers,
                                      use_graphs=not self.lora.active)
        self.stats.steps += 1
        if decode_only:
            self.stats.decode_steps += 1
            self.stats.layers_run += out.exit_layer
        now = time.perf_counter()
        results, row = [], 0
        for s in so.scheduled:
            req = s.request
            samples = s.samples
            req.num_computed_tokens += s.num_new_tokens
            if not samples:
                continue
            logits = out.logits[row]
            row += 1
            tok = sample_token(logits, req.params, req.all_token_ids, self._gens.get(req.request_id))
            req.output_ids.append(tok)
            req.exit_layers.append(out.exit_layer)
            req.token_times.append(now)
            if req.first_token_time is None:
                req.first_token_time = now
            self.stats.generated_tokens += 1
            out_i = self._check_stop(req, tok)
            if req.params.logprobs is not None:
                out_i.logprobs = [token_logprob(logits, tok, req.params.logprobs)]
            results.append(out_i)
        self.stats.preemptions = self.scheduler.num_preemptions
        return results

    def _account_kv(self) -> None:
        """Allocated vs used KV slots of the running requests. A slot is used when it holds (or this
        step writes) a token that a query of this step or later can still attend to: position
        < num_tokens and, for sparse attention, inside the window of the step's first query or
        global."""
        bs = self.config.block_size
        mc = self.model.config
        for r in self.scheduler.running:
            table = self.kv.tables.get(r.request_id, [])
            live = [j for j, b in enumerate(table) if b is not None]
            self.stats.kv_slots_allocated += len(live) * bs
            last = r.num_tokens
            lo = max(0, r.num_computed_tokens - mc.window_size + 1) if self.sparse else 0
            G = mc.num_global_tokens if self.sparse else 0
            for j in live:
                a, b = j * bs, min((j + 1) * bs, last)
                used = max(0, b - max(a, lo)) + max(0, min(b, G, lo) - a)  # window part + global part
                self.stats.kv_slots_used += used

    def _decode(self, req: Request) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(req.output_ids, skip_special_tokens=True)

    def _check_stop(self, req: Request, tok: int) -> RequestOutput:
        """EOS / stop tokens / stop strings / length; returns the text that is safe to stream.

        Text that could be the start of a stop string (or an incomplete UTF-8 sequence) is
        held back until the next token decides it, so streamed pieces always concatenate to
        the final text and never contain any part of a matched stop string."""
        p = req.params
        emitted = self._text[req.request_id]
        text = self._decode(req)
        reason = stop_reason = None
        if not p.ignore_eos and tok == self.eos:
            reason, stop_reason = FinishReason.STOP, tok
        elif tok in p.stop_token_ids:
            reason, stop_reason = FinishReason.STOP, tok
        else:
            hits = [(text.find(s), s) for s in p.stop if s in text]  # a stop string may span tokens
            if hits:
                i, s = min(hits)
                text, reason, stop_reason = text[:i], FinishReason.STOP, s
        if reason is None and (len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_len):
            reason = FinishReason.LENGTH
        visible = text
        if reason is None:
            if text.endswith("\ufffd"):
                visible = emitted  # an incomplete UTF-8 sequence: wait for the next token
            else:
                hold = max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                visible = text[:len(text) - hold]
        new_text = visible[len(emitted):] if visible.startswith(emitted) else ""
        if visible.startswith(emitted):
            self._text[req.request_id] = visible
        if reason is not None:
            self.scheduler.finish(req, reason, stop_reason)
            self._forget(req)
        queue_time = req.scheduled_time - req.arrival_time if len(req.output_ids) == 1 else None
        return RequestOutput(req.request_id, [tok], new_text, reason is not None, reason, stop_reason,
                             len(req.prompt_ids), len(req.output_ids), queue_time)

    # ------------------------------------------------------------- offline use
    def generate(self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
                 lora: str | None | list[str | None] = None) -> list[Request]:
        """Run prompts to completion with continuous batching; returns the finished requests in order.
        `lora`: one adapter name (or None) for all prompts, or one per prompt."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        llist = lora if isinstance(lora, list) else [lora] * len(prompts)
        reqs = []
        for p, sp, lo in zip(prompts, plist, llist):
            rid = self.add_request(p, sp, lora=lo)
            reqs.append(self.requests[rid])
        while self.has_unfinished():
            self.step()
        return reqs

    def text_of(self, req: Request) -> str:
        """Decoded output text of a request (stop strings cut off)."""
        text = self._decode(req)
        if req.stop_reason in req.params.stop:
            text = text[:text.find(req.stop_reason)]
        return text
