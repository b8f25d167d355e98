"""Model runner: one forward pass over a scheduler step, then one sampled token per request.

The KV store is two tensors per model, (layers, Hkv, num_blocks * block_size + scratch, D).
A step's tokens from every scheduled request are packed into one (1, N) row (no padding:
prefill chunks and decode tokens side by side), so the projections and FFNs run once on N
tokens; attention reads the store through block tables (`paged_attention`), with every
layout made by one `LayoutBuilder`.

The runner owns what a step needs beyond the scheduler's decision: the KV tensors, the
LoRA hooks of the step's adapters (`MultiLoRA`), each seeded request's random generator,
the deferred rows of early exit and, when asked for, the CUDA-graph decoder
(`cuda_graph.CUDAGraphDecoder`, built here from `DecodeGraphOptions`) that replays
decode-only steps. `execute(scheduler_output)` returns a `ModelRunnerOutput`: the sampled
token (and its logprobs) of every request that samples, in scheduled order, and the prompt
logprobs of the requests that asked for them (`SamplingParams.prompt_logprobs`): the LM head
also runs on the rows of their prompt chunk, so scoring a prompt costs one prefill, chunked
or not, and no second model.

Early exit (decode steps): after each of `exit_layers`, the shared final norm + LM head
give a distribution per row; when every row's top probability reaches the threshold the
step ends there and samples from those logits. The skipped layers of the exited tokens
are *deferred*, not approximated (as in FREE's synchronised parallel decoding): the runner
keeps each exited token's hidden state and depth, and the next step of that request that
goes deeper runs them through the missing layers as extra rows of the same packed batch,
each joining at the layer after its depth. So every K/V entry a later token reads is the
full model's, and a token that does not exit gets exactly the full model's logits; exits
cost no K/V work of their own. threshold >= 1.0 never exits.

Self-speculative decoding (exact, unlike early exit): requests scheduled with drafts run
through `speculative.SelfSpeculator` after the step's other rows (draft passes through the
exit layer, one verify pass through the rest); their 1 .. k tokens come back in
`ModelRunnerOutput.speculated`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..modules.attention import AttentionMetadata
from .cuda_graph import CUDAGraphDecoder, DecodeGraphOptions
from .kv_cache_manager import KVCacheManager
from .layout import LayoutBuilder, Segment, StepLayout
from .lora import MultiLoRA
from .paged_attention import PagedAttention, PagedKVCache, Workspace
from .request import TokenLogprob
from .sampling import prompt_logprobs, sample_tokens, token_logprob
from .scheduler import SchedulerOutput
from .speculative import SelfSpeculator, SpeculationResult

__all__ = ["DeferredToken", "LMHead", "ModelRunner", "ModelRunnerOutput", "ForwardOutput"]


@dataclass
class DeferredToken:
    """A token that exited early: its hidden state after `depth` layers, awaiting the rest."""

    position: int
    hidden: torch.Tensor  # (d,)
    depth: int


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # (R, V) one row per request that samples, in scheduled order
    exit_layer: int  # number of layers run in full (num_layers when no early exit)
    score_logits: torch.Tensor | None = None  # (S, V) the rows of `ScoreRows.rows` (prompt logprobs)


@dataclass
class ScoreRows:
    """The prompt rows of a step whose next-token logprobs are asked for: packed row indices,
    the prompt token each row predicts, and whose they are (request id, row count, top)."""

    rows: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    owners: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class ModelRunnerOutput:
    """One step's result: a token per sampling request, in scheduled order."""

    sampled_token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    exit_layer: int
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # request id -> this step's
    # request id -> its speculative step (the tokens it emits replace its entry in sampled_token_ids)
    speculated: dict[str, SpeculationResult] = field(default_factory=dict)


# (weight shape, dtype, has bias) -> row-count bucket -> `h @ W^T` was the faster form (LMHead._time)
_TIMED_FORMS: dict[tuple, dict[int, bool]] = {}


class LMHead:
    """The model's LM head as the runner calls it. On a CPU a plain `nn.Linear` head can also run
    as `h @ W^T` with W^T kept contiguous (d, V), a second copy of the weight. Which form streams
    the weight faster depends on the CPU's GEMM kernels and the row count: 2.5x faster at one
    row of 8192 x 256 on an AMD EPYC, but on an Intel Xeon equal at one row and 0.65x at three
    rows of 32000 x 1024 (`benchmarks/decode_ops.py`, docs/results/decode-ops.md). So each
    row-count bucket (1-4 exactly, then powers of two) times both forms on its first call
    (`trials` interleaved calls each, the faster minimum wins) and keeps that form: one
    engine's head never switches kernel for a bucket, and the two forms agree to float
    rounding. Before each timed call the model's other parameters (up to 64 MB) are read once,
    as a decode step's layers read them before the head: timed back to back, the head's weight
    stays in the core's caches and the two forms can rank the other way (on the Xeon at two
    rows of 8192 x 256 both take 0.31 ms hot, while inside a speculative verify step the
    module takes 0.56 ms and `h @ W^T` 0.82 ms). `transposed` True/False fixes the form
    instead. The copy is rebuilt when the weight changes (its version counter moves); a
    wrapped or hooked head (LoRA) is called as is. The timings are kept for the process, by
    the weight's shape and dtype and the bucket, so a second engine (or a benchmark's next
    run) does not time its buckets again."""

    def __init__(self, model, transposed: bool | None = None, trials: int = 3) -> None:
        self.model, self.transposed, self.trials = model, transposed, trials
        self._key: tuple | None = None
        self._wt: torch.Tensor | None = None
        self.choice: dict[int, bool] = {}  # row-count bucket -> the transposed form is faster (timed)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h (R, d), already normed -> logits (R, V)."""
        lin = self.model.lm_head
        if self.transposed is False or h.device.type != "cpu" or h.dim() != 2 or type(lin) is not torch.nn.Linear \
                or lin._forward_hooks or lin._forward_pre_hooks or h.dtype != lin.weight.dtype:
            return lin(h)
        w = lin.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        if key != self._key:
            self._wt, self._key = w.detach().t().contiguous(), key
        use = self.transposed
        if use is None:
            bucket = self.bucket(h.shape[0])
            use = self.choice.get(bucket)
            if use is None:  # another engine of this process may have timed this head shape already
                timed = _TIMED_FORMS.setdefault((tuple(w.shape), w.dtype, lin.bias is not None), {})
                if bucket not in timed:
                    timed[bucket] = self._time(lin, h)
                use = self.choice[bucket] = timed[bucket]
        return self._product(lin, h) if use else lin(h)

    @staticmethod
    def bucket(rows: int) -> int:
        """The row-count bucket a call of `rows` rows is timed and decided in."""
        return rows if rows <= 4 else 1 << (rows - 1).bit_length()

    def _product(self, lin: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
        return torch.matmul(h, self._wt) if lin.bias is None else torch.addmm(lin.bias, h, self._wt)

    def _time(self, lin: torch.nn.Linear, h: torch.Tensor) -> bool:
        """True when `h @ W^T` beat the module on `trials` interleaved calls each (best of each),
        each call after a pass over the model's other parameters (see the class docstring)."""
        best = {False: float("inf"), True: float("inf")}
        head, others, size = {lin.weight.data_ptr(), self._wt.data_ptr()}, [], 0
        for p in self.model.parameters():  # up to 64 MB of them: enough to push the head out of a core's caches
            if p.device == h.device and p.data_ptr() not in head and size < 64 * 2**20:
                others.append(p)
                size += p.numel() * p.element_size()
        for i in range(self.trials + 1):
            for form in (False, True):
                for p in others:  # stream the rest of the model through the caches, as a step does
                    p.detach().sum()
                t = time.perf_counter()
                if form:
                    self._product(lin, h)
                else:
                    lin(h)
                if i:  # round 0 warms both up
                    best[form] = min(best[form], time.perf_counter() - t)
        return best[True] < best[False]


class ModelRunner:
    def __init__(self, model, kv: KVCacheManager, exit_threshold: float = 1.0,
                 exit_layers: tuple[int, ...] = (), graphs: DecodeGraphOptions | None = None,
                 dtype: torch.dtype | None = None, speculative_layer: int | None = None,
                 speculative_min_prob: float = 0.0, speculative_draft_vocab: int = 0) -> None:
        cfg = model.config
        self.model, self.kv, self.config = model, kv, cfg
        self.block_size = kv.block_size
        self.exit_threshold, self.exit_layers = exit_threshold, tuple(exit_layers)
        param = next(model.parameters())
        self.device = param.device
        # one extra block past the pool: a scratch area no block table points to, where padding
        # rows and padding keys of a layout write and read
        self.scratch_slot = kv.pool.num_blocks * kv.block_size
        slots = self.scratch_slot + kv.block_size
        shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, slots, cfg.head_dim)  # head-major
        self.k_cache = torch.zeros(shape, dtype=dtype or param.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype or param.dtype, device=self.device)
        sparse = cfg.attention == "sparse"
        self.builder = LayoutBuilder(kv.block_size, self.scratch_slot, self.device,
                                     window=cfg.window_size if sparse else None,
                                     num_global=cfg.num_global_tokens if sparse else 0)
        # reused gather buffers of the decode attention (CPU: see paged_attention's docstring)
        self.workspace = Workspace() if self.device.type == "cpu" else None
        self.lora = MultiLoRA(model)
        self.head = LMHead(model)
        self.graphs = CUDAGraphDecoder(self.forward, model, self.builder, graphs) if graphs is not None else None
        # request id -> its exited tokens still missing their upper layers, by position
        self.deferred: dict[str, list[DeferredToken]] = {}
        self.max_deferred = kv.block_size  # longest run of exits before a step must go to full depth
        self.generators: dict[str, torch.Generator] = {}  # seeded requests' own random streams
        # self-speculative decoding: drafts from the exit after `speculative_layer` layers
        self.speculator = SelfSpeculator(self, speculative_layer, speculative_min_prob, speculative_draft_vocab) \
            if speculative_layer is not None else None
        self._prefix_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's image-prefix rows

    def forget(self, request_id: str) -> None:
        """Drop what the runner holds for a finished request."""
        self.deferred.pop(request_id, None)
        self.generators.pop(request_id, None)

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        """Run the step and sample a token for every request that reaches its end (1 .. k tokens
        for a speculating one: `speculative.SelfSpeculator`, after the other requests' forward)."""
        spec = [s for s in so.scheduled if s.num_draft]
        if not spec:
            return self._execute_plain(so)
        if self.speculator is None:
            raise RuntimeError("a request was scheduled to speculate but the runner has no speculative_layer")
        rest = SchedulerOutput([s for s in so.scheduled if not s.num_draft], so.preempted)
        out = self._execute_plain(rest) if rest.scheduled else \
            ModelRunnerOutput([], [], len(self.model.model.layers))
        results = self.speculator.run(spec, [self._generator(s.request) for s in spec])
        tokens, logprobs, i = [], [], 0
        it = iter(zip(spec, results))
        for s in so.scheduled:  # back into scheduled order
            if not s.samples:
                continue
            if s.num_draft:
                sr, res = next(it)
                out.speculated[sr.request.request_id] = res
                tokens.append(res.token_ids[0])
                logprobs.append(res.logprobs[0])
            else:
                tokens.append(out.sampled_token_ids[i])
                logprobs.append(out.logprobs[i])
                i += 1
        out.sampled_token_ids, out.logprobs = tokens, logprobs
        return out

    def _generator(self, r) -> torch.Generator | None:
        g = self.generators.get(r.request_id)
        if g is None and r.params.seed is not None:
            g = self.generators[r.request_id] = torch.Generator(device=self.device).manual_seed(r.params.seed)
        return g

    def _execute_plain(self, so: SchedulerOutput) -> ModelRunnerOutput:
        segs = [Segment(self.kv.get(s.request.request_id).block_ids, s.request.num_computed_tokens,
                        s.request.all_token_ids[s.request.num_computed_tokens:
                                                s.request.num_computed_tokens + s.num_new_tokens], s.samples)
                for s in so.scheduled]
        score = self._score_rows(so)
        self._prefix_rows = self._prefix_overrides(so)
        try:
            with self.lora.batch([(s.request.lora, s.num_new_tokens) for s in so.scheduled]):
                out = self._forward_step(so, segs, score)
        finally:
            self._prefix_rows = None
        return self._sample(so, out, score)

    def _prefix_overrides(self, so: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Image prefixes (`Request.prefix_embeds`, (P, d)): the packed rows of this step that hold
        prompt positions < P and the embeddings that replace theirs in `_start`. A step's own rows
        come first, in scheduled order (deferred early-exit rows join after them)."""
        rows, embs, start = [], [], 0
        for s in so.scheduled:
            r, a = s.request, s.request.num_computed_tokens
            pe = r.prefix_embeds
            if pe is not None and a < len(pe):
                hi = min(len(pe), a + s.num_new_tokens)
                rows += range(start, start + hi - a)
                embs.append(pe[a:hi])
            start += s.num_new_tokens
        if not rows:
            return None
        return torch.tensor(rows, dtype=torch.long, device=self.device), torch.cat(embs).to(self.device)

    @staticmethod
    def _score_rows(so: SchedulerOutput) -> ScoreRows:
        """Rows of this step whose logits score a prompt token: position p of a request with
        prompt_logprobs predicts prompt token p + 1 (positions already scored before a
        preemption are not scored again)."""
        sr, start = ScoreRows(), 0
        for s in so.scheduled:
            r, a = s.request, s.request.num_computed_tokens
            top = r.params.prompt_logprobs
            if top is not None:
                lo, hi = max(a, len(r.prompt_logprobs)), min(a + s.num_new_tokens, len(r.prompt_ids) - 1)
                if hi > lo:
                    sr.rows += range(start + lo - a, start + hi - a)
                    sr.targets += r.prompt_ids[lo + 1:hi + 1]
                    sr.owners.append((r.request_id, hi - lo, top))
            start += s.num_new_tokens
        return sr

    def _forward_step(self, so: SchedulerOutput, segs: list[Segment], score: ScoreRows) -> ForwardOutput:
        plain = self.exit_threshold >= 1.0 and not self.deferred
        # LoRA deltas come from Python hooks, which a replayed (or captured) CUDA graph would skip
        # or bake in: a step with adapter tokens runs the eager packed forward
        if plain and self.graphs is not None and not self.lora.active and not score.rows and self._prefix_rows is None:
            logits = self.graphs.run(segs)
            if logits is not None:
                return ForwardOutput(logits, len(self.model.model.layers))
        lay = self.builder.build(segs)
        if plain:
            return self.forward(lay, score_rows=score.rows)
        return self._forward_early_exit(so, segs, lay, score.rows)

    def _sample(self, so: SchedulerOutput, out: ForwardOutput, score: ScoreRows) -> ModelRunnerOutput:
        reqs = [s.request for s in so.scheduled if s.samples]
        gens = [self._generator(r) for r in reqs]
        seen = [r.all_token_ids if r.params.repetition_penalty != 1.0 else [] for r in reqs]
        tokens = sample_tokens(out.logits, [r.params for r in reqs], seen, gens, [r.output_ids for r in reqs])
        logprobs = [token_logprob(out.logits[i], t, r.params.logprobs) if r.params.logprobs is not None else None
                    for i, (r, t) in enumerate(zip(reqs, tokens))]
        scored: dict[str, list[TokenLogprob]] = {}
        if score.rows:
            top = max(t for _, _, t in score.owners)
            lps, i = prompt_logprobs(out.score_logits, score.targets, top), 0
            for rid, n, t in score.owners:
                scored[rid] = [lp if t == top else TokenLogprob(lp.token_id, lp.logprob, lp.top[:t])
                               for lp in lps[i:i + n]]
                i += n
        return ModelRunnerOutput(tokens, logprobs, out.exit_layer, scored)

    # ---------------------------------------------------------------- forward
    def forward(self, lay: StepLayout, rows: torch.Tensor | None = None,
                score_rows: list[int] | None = None) -> ForwardOutput:
        """The packed forward over a layout, every layer; static shapes and no host sync (so a CUDA
        graph can capture it). `score_rows`: packed rows whose logits are also wanted (prompt logprobs)."""
        bb = self.model.model
        x, meta, cache = self._start(lay)
        if rows is None:
            rows = torch.tensor(lay.sample_rows, dtype=torch.long, device=self.device)
        for layer in bb.layers:
            x, _ = layer(x, meta, cache)
        return self._head(x, rows, score_rows, len(bb.layers))

    def _head(self, x: torch.Tensor, rows: torch.Tensor, score_rows: list[int] | None, depth: int) -> ForwardOutput:
        """Final norm + LM head on the sampled rows and, apart, on the scored prompt rows."""
        bb = self.model.model
        logits = self.head(bb.norm(x[0, rows]))
        score = None
        if score_rows:
            idx = torch.tensor(score_rows, dtype=torch.long, device=self.device)
            score = self.head(bb.norm(x[0, idx]))
        return ForwardOutput(logits, depth, score)

    def _start(self, lay: StepLayout):
        """Embedded tokens (1, N, d) and the attention metadata / paged cache of a layout."""
        bb = self.model.model
        x = bb.embed_tokens(lay.input_ids[None])
        if self._prefix_rows is not None:  # image prefix rows of a prefill (see _prefix_overrides)
            rows, embs = self._prefix_rows
            x = x.index_copy(1, rows, embs[None].to(x.dtype))
        if bb.embed_positions is not None:  # positions are < the context length: the engine checks
            x = x + bb.embed_positions.lookup(lay.positions[None])
        return (x, *self._attention(lay))

    def _attention(self, lay: StepLayout):
        kernel = PagedAttention(self.k_cache, self.v_cache, lay, self.workspace)
        return AttentionMetadata(q_pos=lay.positions[None], kernel=kernel), PagedKVCache(self.k_cache, self.v_cache, lay)

    def _forward_early_exit(self, so: SchedulerOutput, segs: list[Segment], lay: StepLayout,
                            score_rows: list[int] | None = None) -> ForwardOutput:
        """The packed forward with exits (see the module docstring) and deferred rows joining;
        `segs` are the step's own segments, `lay` their layout."""
        bb = self.model.model
        n_layers = len(bb.layers)
        can_exit = self.exit_threshold < 1.0 and lay.decode_q is not None and not lay.prefills \
            and len(lay.sample_rows) == len(so.scheduled) and not score_rows
        segs, waiting = list(segs), []  # waiting: (request id, block table, DeferredToken) not yet joined
        for s, seg in zip(so.scheduled, segs):
            r = s.request
            queue = self.deferred.pop(r.request_id, [])
            r.deferred_from = None
            # a prefill (first pass or recompute after preemption) runs every layer itself
            if s.num_new_tokens == 1 and queue and queue[-1].position == seg.start - 1:
                waiting += [(r.request_id, seg.table, d) for d in queue]
                # at most `max_deferred` tokens wait: their keys stay allocated (the scheduler frees
                # blocks only out of the oldest one's window), so this bounds the extra KV memory
                can_exit = can_exit and seg.start - queue[0].position < self.max_deferred
        x, meta, cache = self._start(lay)
        rows = torch.tensor(lay.sample_rows, dtype=torch.long, device=self.device)
        joined: list[tuple[str, DeferredToken]] = []  # their rows follow the step's own rows, in order
        for i, layer in enumerate(bb.layers):
            new = [w for w in waiting if w[2].depth == i]
            if new:
                waiting = [w for w in waiting if w[2].depth != i]
                joined += [(rid, d) for rid, _, d in new]
                x = torch.cat([x, torch.stack([d.hidden for _, _, d in new])[None].to(x.dtype)], dim=1)
                segs += [Segment(table, d.position, [0], False) for _, table, d in new]
                meta, cache = self._attention(self.builder.build(segs))
            x, _ = layer(x, meta, cache)
            if can_exit and i + 1 in self.exit_layers and i + 1 < n_layers:
                logits = self.head(bb.norm(x[0, rows]))
                if bool((logits.float().softmax(-1).amax(-1) >= self.exit_threshold).all()):
                    self._defer(so, x, lay, joined, waiting, i + 1)
                    return ForwardOutput(logits, i + 1)
        return self._head(x, rows, score_rows, n_layers)

    def _defer(self, so: SchedulerOutput, x: torch.Tensor, lay: StepLayout,
               joined: list[tuple[str, DeferredToken]], waiting: list, depth: int) -> None:
        """After an exit at `depth`: every row of the step (its own tokens and the deferred ones
        that joined) waits, with its hidden state, for the layers above; tokens still waiting
        for a deeper layer keep theirs."""
        queues: dict[str, list[DeferredToken]] = {}
        for rid, _, d in waiting:
            queues.setdefault(rid, []).append(d)
        n = len(so.scheduled)
        for k, (rid, d) in enumerate(joined):
            queues.setdefault(rid, []).append(DeferredToken(d.position, x[0, n + k], depth))
        positions = lay.positions.tolist()
        for k, s in enumerate(so.scheduled):
            rid = s.request.request_id
            queues.setdefault(rid, []).append(DeferredToken(positions[k], x[0, k], depth))
        for s in so.scheduled:
            q = sorted(queues[s.request.request_id], key=lambda d: d.position)
            self.deferred[s.request.request_id] = q
            s.request.deferred_from = q[0].position
