"""Exact self-speculative decoding with the early-exit head (LayerSkip's self-speculation).

A request that speculates with k draft tokens (`SamplingParams.speculative_tokens`) runs,
in one engine step:

1. draft: k + 1 passes through the first E layers (E = `EngineConfig.speculative_layer`),
   one row per speculating request each, over its last token and then each new draft; the
   shared final norm + LM head on layer E's output (`model.exit_logits`) of passes 0 .. k-1
   give the draft distribution q_j, from which draft token d_j is picked by the request's
   own sampling rule (pass k, fed d_k, has no exit head: it is there for the bonus row).
   These passes write the K/V of layers < E for positions n-1 .. n+k-1: exactly the entries
   the full model would write there, since a layer's K/V depend on the layers below only;
2. verify: one pass through layers E .. L-1 over k + 1 rows per request (its last token
   and d_1 .. d_k), starting from the hidden states the draft left at layer E, so the
   shared layers are not run again; row j attends to the keys of rows <= j (written in the
   same layer just before) as an ordinary decode row. Its logits give the full model's
   distribution p_j at every drafted position, and after d_k;
3. accept: greedy requests keep the longest prefix of drafts equal to the full model's
   argmax and then take the full model's token at the first disagreement, so the output is
   token for token the full model's; sampling requests accept d_j with probability
   min(1, p_j(d_j) / q_j(d_j)) and on the first rejection draw from normalise(max(0,
   p_j - q_j)) (speculative sampling, Leviathan et al. / Chen et al.), so every emitted
   token is distributed as the full model's next token. p and q are the distributions the
   request's `SamplingParams` sample from (penalties, temperature, top-k/p, min-p,
   `sampling.target_probs`), with the drafts so far counted in the history. When all k
   drafts are kept, the last row's p_k gives one more token (the bonus: greedy argmax, or a
   draw from p_k), as in vLLM's and LayerSkip's verification.

Drafting stops early for a request whose exit is unsure (top probability below
`min_prob`, `EngineConfig.speculative_min_prob`): that draft is dropped and the step
verifies the j drafts before it, with the row after the last of them as its bonus row
(already fed by the pass that made the unsure draft, so no pass is wasted on a draft that
would likely be rejected). The rule looks at the draft only, so the output stays exact.

A step emits 1 .. k + 1 tokens: the accepted drafts, then the full model's token where the
first draft was rejected, or the bonus token when none was. Positions past the last emitted
token keep stale K/V that no query reads (a decode row reads keys up to its own position)
and that a later step overwrites. The scheduler gives a speculating request k + 1 slots
ahead (`ScheduledRequest.num_draft` = k) and clips k so that k + 1 tokens fit its
max_tokens and the model's context; it counts k + 1 rows against the step's budget.

A draft vocabulary (`draft_vocab` = N, `EngineConfig.speculative_draft_vocab`) makes the
draft head score only the N lowest token ids (a byte-level BPE numbers its tokens in merge
order, so these are the most frequent ones), as FR-Spec drafts from a frequency-ranked subset:
the exit's LM head then reads N rows of the weight instead of V. The draft distribution q is
zero outside the subset; greedy verification and the rejection rule (whose residual
max(0, p - q) covers the tokens the draft cannot propose) keep the output exact; `min_prob`
then reads the top probability within the subset. Greedy requests without penalties or
logit bias take the draft's argmax directly.

Sampled output is exact in distribution, not draw for draw: a seeded speculating request
is reproducible, but draws other tokens than the same seed without speculation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from .layout import Segment
from .request import TokenLogprob
from .sampling import greedy_ids, target_probs, token_logprob

__all__ = ["SelfSpeculator", "SpeculationResult"]


@dataclass
class SpeculationResult:
    """One request's speculative step: the tokens it emits (1 .. k + 1) and how many drafts were kept."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    num_drafted: int = 0
    num_accepted: int = 0


class SelfSpeculator:
    """Drafts from the exit after `draft_layer` layers and verifies with the rest (module docstring).

    `runner` is the `ModelRunner` whose KV store, layout builder and embedding this uses."""

    def __init__(self, runner, draft_layer: int, min_prob: float = 0.0, draft_vocab: int = 0) -> None:
        n_layers = len(runner.model.model.layers)
        if not 1 <= draft_layer < n_layers:
            raise ValueError(f"speculative_layer ({draft_layer}) must be in [1, {n_layers - 1}]: the drafts exit after "
                             f"one of the model's {n_layers} layers except the last")
        if not hasattr(runner.model, "exit_logits"):
            raise ValueError(f"{type(runner.model).__name__} has no exit head (exit_logits); self-speculative decoding "
                             f"needs a model whose intermediate layers can be read out (OpenAutoGLMForCausalLM)")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"speculative_min_prob must be in [0, 1) (0 = always draft k tokens), got {min_prob}")
        self.runner, self.draft_layer, self.min_prob = runner, draft_layer, min_prob
        head = runner.model.lm_head
        vocab = head.weight.shape[0]
        if not 0 <= draft_vocab <= vocab:
            raise ValueError(f"speculative_draft_vocab ({draft_vocab}) must be in [0, {vocab}]: the draft head scores "
                             f"the N lowest token ids of the model's {vocab} (0 = all of them)")
        self.vocab = vocab
        # the draft head over the N lowest ids: N rows of the LM head's weight (None = the whole head)
        self.draft_weight = self.draft_bias = None
        if 0 < draft_vocab < vocab:
            self.draft_weight = head.weight.detach()[:draft_vocab].contiguous()
            self.draft_bias = None if head.bias is None else head.bias.detach()[:draft_vocab].contiguous()

    @torch.inference_mode()
    def run(self, scheduled: list, generators: list[torch.Generator | None]) -> list[SpeculationResult]:
        """One speculative step for each `ScheduledRequest` (decoding, `num_draft` >= 1)."""
        rn = self.runner
        layers = rn.model.model.layers
        E = self.draft_layer
        reqs = [s.request for s in scheduled]
        ks = [s.num_draft for s in scheduled]  # drafts per request, lowered when one is unsure (min_prob)
        tables = [rn.kv.get(r.request_id).block_ids for r in reqs]
        starts = [r.num_tokens - 1 for r in reqs]
        params = [r.params for r in reqs]
        # tokens[i][j]: the input of draft pass j for request i (its last token, then the drafts)
        tokens = [[r.all_token_ids[-1]] for r in reqs]
        hidden: list[list[torch.Tensor]] = [[] for _ in reqs]  # layer-E output of each of those rows
        q_probs: list[list[torch.Tensor | None]] = [[] for _ in reqs]
        # the layout of every row the step may run, request-major (k + 1 per request): the
        # verify pass's, and each draft pass takes its rows from it (the drafts' ids go in later)
        first = list(itertools.accumulate((k + 1 for k in ks[:-1]), initial=0))  # request i's first row
        full = rn.builder.build([Segment(tables[i], starts[i] + j, [0], True)
                                 for i, k in enumerate(ks) for j in range(k + 1)])
        # pass j feeds tokens[i][j] through layers < E for every request with j <= ks[i]: passes
        # 0 .. k-1 also draft d_{j+1} from the exit, pass k (no exit head) is there so the
        # verify pass can score the position after d_k too (the bonus row)
        for j in range(max(ks) + 1):
            active = [i for i, k in enumerate(ks) if j <= k]
            if not active:  # every request stopped drafting early
                break
            x, meta, cache = rn._start(full.select([first[i] + j for i in active], [tokens[i][j] for i in active]))
            for layer in layers[:E]:
                x, _ = layer(x, meta, cache)
            for a, i in enumerate(active):
                hidden[i].append(x[0, a])
            rows = [a for a, i in enumerate(active) if j < ks[i]]  # those that draft d_{j+1}
            if not rows:
                continue
            drafting = [active[a] for a in rows]
            exit_logits = self._draft_logits(x[0, rows] if len(rows) < len(active) else x[0])
            if all(params[i].greedy and not params[i].adjusts_logits for i in drafting):
                probs, drafts = None, greedy_ids(exit_logits).tolist()  # the pick without the (R, V) one-hots
            else:
                probs = target_probs(self._full_vocab(exit_logits), [params[i] for i in drafting],
                                     *self._histories(reqs, tokens, drafting, j))
                drafts = self._draw(probs, [params[i] for i in drafting], [generators[i] for i in drafting])
            sure = (exit_logits.float().softmax(-1).amax(-1) >= self.min_prob).tolist() if self.min_prob else None
            for a, (i, d) in enumerate(zip(drafting, drafts)):
                if sure is not None and not sure[a]:  # an unsure draft is dropped: j drafts this step
                    ks[i] = j
                    continue
                tokens[i].append(d)
                q_probs[i].append(None if params[i].greedy else probs[a])

        # verify: k + 1 rows per request from layer E up, request-major
        nrows = [k + 1 for k in ks]
        rows = [(i, j) for i, n in enumerate(nrows) for j in range(n)]
        lay = full if len(rows) == full.input_ids.numel() else full.select([first[i] + j for i, j in rows])
        meta, cache = rn._attention(lay)
        x = torch.stack([hidden[i][j] for i, j in rows])[None]  # (1, R, d)
        for layer in layers[E:]:
            x, _ = layer(x, meta, cache)
        bb = rn.model.model
        logits = rn.head(bb.norm(x[0]))  # (R, V): the full model's, at every drafted position
        # picks: the full model's greedy token per row (a greedy row's target is one-hot there)
        if all(p.greedy and not p.adjusts_logits for p in params):  # no (R, V) targets needed
            p_all, picks = None, greedy_ids(logits).tolist()
        else:
            seen, outs = self._verify_histories(reqs, tokens, nrows)
            p_all = target_probs(logits, [params[i] for i, _ in rows], seen, outs)
            picks = greedy_ids(p_all).tolist()

        results, base = [], 0
        for i, r in enumerate(reqs):
            k, g = ks[i], generators[i]
            emitted: list[int] = []
            n_acc = 0
            for j in range(k):
                d = tokens[i][j + 1]
                if params[i].greedy:
                    ok = d == picks[base + j]
                else:
                    p, q = p_all[base + j], q_probs[i][j]
                    u = torch.rand((), generator=g, device=p.device)
                    ok = bool(u * q[d] < p[d])
                if ok:
                    emitted.append(d)
                    n_acc += 1
                    continue
                if params[i].greedy:
                    emitted.append(picks[base + j])
                else:
                    resid = (p - q).clamp_min(0)
                    total = resid.sum()
                    dist = resid / total if total > 0 else p
                    emitted.append(int(torch.multinomial(dist, 1, generator=g)))
                break
            else:  # every draft kept (or none made): the last row gives the full model's next token
                emitted.append(picks[base + k] if params[i].greedy
                               else int(torch.multinomial(p_all[base + k], 1, generator=g)))
            lps = [token_logprob(logits[base + j], t, params[i].logprobs) if params[i].logprobs is not None else None
                   for j, t in enumerate(emitted)]
            results.append(SpeculationResult(emitted, lps, k, n_acc))
            base += nrows[i]
        return results

    # ------------------------------------------------------------- internals
    def _draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The exit's logits (R, V), or (R, N) over the draft vocabulary's N lowest ids."""
        model = self.runner.model
        if self.draft_weight is None:  # the exit: the shared final norm + LM head
            return self.runner.head(model.model.norm(hidden))
        return torch.nn.functional.linear(model.model.norm(hidden), self.draft_weight, self.draft_bias)

    def _full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits (R, N) placed in (R, V), -inf outside: probability 0 there."""
        if logits.shape[-1] == self.vocab:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab), float("-inf"))
        full[:, :logits.shape[-1]] = logits
        return full

    @staticmethod
    def _draw(probs: torch.Tensor, params, generators) -> list[int]:
        """A draft token per row of the draft distribution (argmax of a greedy row's one-hot)."""
        out = greedy_ids(probs).tolist()
        for a, (p, g) in enumerate(zip(params, generators)):
            if not p.greedy:
                out[a] = int(torch.multinomial(probs[a], 1, generator=g))
        return out

    @staticmethod
    def _histories(reqs, tokens, active, j):
        """(seen, outputs) of the rows of draft pass j: each request's tokens plus its drafts so far."""
        seen, outs = [], []
        for i in active:
            r, p = reqs[i], reqs[i].params
            drafts = tokens[i][1:j + 1]
            seen.append(r.all_token_ids + drafts if p.repetition_penalty != 1.0 else [])
            outs.append(r.output_ids + drafts if (p.frequency_penalty or p.presence_penalty) else [])
        return seen, outs

    @staticmethod
    def _verify_histories(reqs, tokens, ks):
        seen, outs = [], []
        for i, k in enumerate(ks):
            for j in range(k):
                s, o = SelfSpeculator._histories(reqs, tokens, [i], j)
                seen += s
                outs += o
        return seen, outs
