"""Pipeline parallelism with `torch.distributed.pipelining` for the Open-AutoGLM model.

The model is cut at block boundaries into `pp` contiguous stages, one per rank
(`split_layers`: as even as possible, earlier stages take the remainder). Stage 0 also
holds the embeddings, the last stage the final norm and the LM head. Each rank keeps the
same `OpenAutoGLMForCausalLM` object with the other stages' parts removed
(`prune_to_stage`): `model.layers` becomes a `ModuleDict` keyed by the global block index,
so every parameter keeps the unsplit model's name and the union of the ranks' state dicts
is the full model's (as torchtitan does it). `PipelineStageModule` is the stage's forward
(ids or hidden states in, hidden states or logits out) that `PipelineStage` runs.

`PipelineRunner` drives a `ScheduleGPipe` or `Schedule1F1B` over `n_microbatches`
micro-batches of one batch. Two ways to train with it:

* `step(input_ids, labels)`: the schedule computes the next-token loss on the last stage
  and averages the gradients over the micro-batches (`scale_grads`), as the
  single-process loop's `loss / grad_accum` does; `PipelineParallelStrategy.forward_backward`
  feeds it a whole optimizer step (the micro-batches of gradient accumulation);
* inside the unchanged training loop (`--strategy pp`): `PipelineModel` gives every rank
  the logits and aux loss of a micro-batch (a forward-only pass), the loop's objective
  computes its loss from them, and the strategy's `backward` sends the loss's gradients
  w.r.t. the logits back through the schedule (`backward_from_logits`: a surrogate loss
  `<logits, grad>` whose parameter gradients are exactly the objective's). Each loop
  micro-batch is cut into `microbatches` pipeline micro-batches (default: one per stage);
  the forward runs twice (once to give the objective its logits, once inside the
  schedule), the price of keeping the loop and the objectives unchanged.

Two things do not travel between stages as activations and are handled here:

* the MoE auxiliary loss: every stage computes its layers' share (the model's aux loss
  is a mean over all MoE layers, so a stage's share is its layers' sum over the model's
  count) and adds it to the backward pass with `_AttachAux`, an identity on the hidden
  state whose backward also sends gradient 1 into the aux loss (the device Megatron-LM
  uses for MoE aux losses under pipelining);
* tied embeddings: the first and the last stage hold the same (V, d) table (input
  embedding and LM head); after backward their gradients are summed across those two
  ranks (`sync_tied_grads`) so both copies take the same optimizer step.

`check_pipeline(config, pp)` raises a ValueError naming the fix when there are more
stages than blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.utils.checkpoint import checkpoint

from ..losses import lm_loss, moe_aux_loss
from ..modules.attention import AttentionMetadata
from ..training.config import TrainConfig
from . import register_strategy
from .data_parallel import OneReplica, ProcessGroupStrategy

__all__ = ["SCHEDULES", "keep_param_groups", "PipelineModel", "PipelineParallelStrategy", "PipelineRunner", "PipelineStageModule",
           "check_pipeline", "prune_to_stage", "split_layers"]

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def check_pipeline(config, pp: int, n_microbatches: int | None = None) -> None:
    """Raise ValueError (naming the fix) when `config` cannot be cut into `pp` stages."""
    if pp < 1:
        raise ValueError(f"pipeline stages must be >= 1, got {pp}")
    L = config.num_hidden_layers
    if pp > L:
        raise ValueError(f"pipeline parallelism over {pp} stages needs at least {pp} blocks, but the model has "
                         f"{L} (num_hidden_layers); run with --nproc {L} or fewer, or use a model with at least "
                         f"{pp} layers")
    if n_microbatches is not None and n_microbatches < 1:
        raise ValueError(f"the pipeline needs at least one micro-batch, got {n_microbatches}; set grad_accum >= 1")


def split_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous block ranges of the `pp` stages, sizes differing by at most one."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


def prune_to_stage(model: nn.Module, stage: int, pp: int) -> nn.Module:
    """Keep only stage `stage`'s parts of an OpenAutoGLMForCausalLM (in place); returns it."""
    check_pipeline(model.config, pp)
    backbone = model.model
    keep = split_layers(len(backbone.layers), pp)[stage]
    backbone.layers = nn.ModuleDict({str(i): backbone.layers[i] for i in keep})
    if stage > 0:
        backbone.embed_tokens = None
        backbone.embed_positions = None
    if stage < pp - 1:
        backbone.norm = None
        model.lm_head = None
    return model


class _AttachAux(torch.autograd.Function):
    """Identity on `hidden`; backward also gives `aux` the gradient 1 (so it joins the loss)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return hidden.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


class PipelineStageModule(nn.Module):
    """One stage's forward over a pruned model (see `prune_to_stage`): stage 0 takes token
    ids (B, T), the others hidden states (B, T, d); the last returns logits (B, T, V),
    the others hidden states. Positions are contiguous (training batches, no padding)."""

    def __init__(self, model: nn.Module, stage: int, num_stages: int) -> None:
        super().__init__()
        self.model = model
        self.stage, self.num_stages = stage, num_stages
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        cfg = model.config
        self.moe_layers_total = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        self.aux_values: list[torch.Tensor] = []  # this stage's aux loss per micro-batch (detached)
        self.aux_scale = 1.0  # d(step loss) / d(aux) per micro-batch, when the schedule's loss is not the LM loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.model.model
        cfg = self.model.config
        if self.is_first:
            ids = x
            x = backbone.embed_tokens(ids)  # (B, T, d)
            if backbone.embed_positions is not None:
                x = x + backbone.embed_positions(torch.arange(ids.shape[1], device=ids.device)[None])
            x = backbone.dropout(x)
        meta = AttentionMetadata(q_offset=0)
        routing = []
        for layer in backbone.layers.values():
            if backbone.gradient_checkpointing and self.training:
                x, r = checkpoint(layer, x, meta, None, use_reentrant=False)
            else:
                x, r = layer(x, meta, None)
            if r is not None:
                routing.append(r)
        if routing:
            aux = moe_aux_loss(routing, cfg.num_experts, cfg.router_aux_loss_coef, cfg.router_z_loss_coef)
            aux = aux * (len(routing) / self.moe_layers_total)  # this stage's share of the model's mean
            self.aux_values.append(aux.detach())
            if torch.is_grad_enabled():
                x = _AttachAux.apply(x, aux * self.aux_scale)
        if self.is_last:
            return self.model.lm_head(backbone.norm(x))
        return x


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return lm_loss(logits, labels)


def _dot_loss(logits: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A surrogate whose gradient w.r.t. the logits is `grad` (backward from given logit gradients)."""
    return (logits.float() * grad.float()).sum()


class PipelineRunner:
    """Runs one stage of a pipeline: `step(input_ids, labels)` does forward and backward of
    a whole batch in `n_microbatches` micro-batches and returns the metrics of the batch
    ({"loss", "lm_loss", "aux_loss"}, the same on every rank); `forward(input_ids)` runs the
    pipeline without backward and returns the logits on every rank.

    Every rank of `group` passes the same batch. The schedule is built for the first batch
    shape it sees (and again for a new one)."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None, n_microbatches: int = 1,
                 schedule: str = "1f1b", device: torch.device | str = "cpu") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        self.group = group if group is not None else dist.group.WORLD
        self.pp = dist.get_world_size(self.group)
        self.stage_index = dist.get_rank(self.group)
        self.ranks = dist.get_process_group_ranks(self.group)
        check_pipeline(model.config, self.pp, n_microbatches)
        self.device = torch.device(device)
        self.n_microbatches = n_microbatches
        self.schedule_name = schedule
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False)) and self.pp > 1
        self.model = prune_to_stage(model, self.stage_index, self.pp).to(self.device)
        self.module = PipelineStageModule(self.model, self.stage_index, self.pp)
        self._tied_group = dist.new_group([self.ranks[0], self.ranks[-1]]) if self.tied else None
        self._schedules: dict[tuple, tuple] = {}

    @property
    def is_first(self) -> bool:
        return self.module.is_first

    @property
    def is_last(self) -> bool:
        return self.module.is_last

    def tied_weight(self) -> nn.Parameter | None:
        if not self.tied:
            return None
        return self.model.model.embed_tokens.weight if self.is_first else (
            self.model.lm_head.weight if self.is_last else None)

    def _schedule(self, shape: tuple[int, int], n_mb: int, mode: str):
        """mode: "lm" (train on the LM loss) or "grad" (backward from given logit gradients)."""
        training = True
        key = (shape, n_mb, mode)
        if key not in self._schedules:
            B, T = shape
            if B % n_mb:
                raise ValueError(f"a batch of {B} rows cannot be cut into {n_mb} pipeline micro-batches; make the "
                                 f"batch size a multiple of {n_mb} (grad_accum)")
            mb = B // n_mb
            cfg = self.model.config
            # example tensors: shapes, dtypes and whether a gradient flows (received activations
            # and stage outputs carry one in training)
            hidden = torch.empty(mb, T, cfg.hidden_size, device=self.device, requires_grad=training)
            inp = torch.empty(mb, T, dtype=torch.long, device=self.device) if self.is_first else hidden
            out = torch.empty(mb, T, cfg.vocab_size, device=self.device, requires_grad=training) \
                if self.is_last else hidden
            stage = PipelineStage(self.module, self.stage_index, self.pp, self.device, input_args=(inp,),
                                  output_args=out, group=self.group)
            cls = SCHEDULES[self.schedule_name]
            loss_fn = {"lm": _lm_loss, "grad": _dot_loss}[mode]
            # "grad": the given gradients already sum over micro-batches; no 1/n scaling
            self._schedules[key] = (stage, cls(stage, n_mb, loss_fn=loss_fn, scale_grads=mode != "grad"))
        return self._schedules[key][1]

    def sync_tied_grads(self) -> None:
        """Sum the tied embedding / LM-head gradient of the first and last stages."""
        w = self.tied_weight()
        if w is None:
            return
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        dist.all_reduce(g, group=self._tied_group)
        w.grad = g

    def _run(self, sched, input_ids: torch.Tensor, target: torch.Tensor | None, losses: list | None):
        args = (input_ids,) if self.is_first else ()
        kwargs = {"target": target, "losses": losses} if self.is_last and target is not None else {}
        # a schedule step rescales (scale_grads) whatever .grad holds: run it on empty
        # gradients and add the ones accumulated before (gradient accumulation over steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        before = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            return sched.step(*args, **kwargs)
        finally:
            for p, g in zip(params, before):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, sync_tied: bool = True) -> dict[str, torch.Tensor]:
        """Forward + backward of one batch (gradients accumulate into .grad, averaged over the
        micro-batches); returns {"loss", "lm_loss", "aux_loss"} averaged over micro-batches.
        `sync_tied`: sum the tied embedding gradient of the first and last stage afterwards
        (pass False when accumulating several calls, and call `sync_tied_grads` once)."""
        sched = self._schedule(tuple(input_ids.shape), self.n_microbatches, "lm")
        self.module.aux_values = []
        losses: list[torch.Tensor] = []
        self._run(sched, input_ids, labels, losses)
        if sync_tied:
            self.sync_tied_grads()
        return self._metrics(losses)

    def backward_from_logits(self, input_ids: torch.Tensor, grad_logits: torch.Tensor, aux_grad: float) -> None:
        """Accumulate into .grad the parameter gradients of a loss whose gradient w.r.t. the
        logits of `input_ids` is `grad_logits` (B, T, V) and w.r.t. the mean aux loss
        `aux_grad`: the schedule recomputes the forward of every micro-batch and runs the
        backward from these gradients. The tied embedding is not synchronised here."""
        B = input_ids.shape[0]
        n_mb = self.n_microbatches if B % self.n_microbatches == 0 else 1
        sched = self._schedule(tuple(input_ids.shape), n_mb, "grad")
        self.module.aux_values = []
        self.module.aux_scale = aux_grad / n_mb  # the reported aux is the mean over micro-batches
        try:
            self._run(sched, input_ids, grad_logits if self.is_last else None, [])
        finally:
            self.module.aux_scale = 1.0

    def _metrics(self, losses: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        n = self.n_microbatches
        lm = torch.stack([l.detach().float() for l in losses]).mean() if losses else torch.zeros((), device=self.device)
        aux = torch.stack(self.module.aux_values).float().sum() / n if self.module.aux_values else \
            torch.zeros((), device=self.device)
        # lm lives on the last stage, aux is spread over stages: one sum gives both to every rank
        both = torch.stack([lm if self.is_last else torch.zeros_like(lm), aux])
        dist.all_reduce(both, group=self.group)
        return {"loss": both[0] + both[1], "lm_loss": both[0], "aux_loss": both[1]}

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) of a batch through the whole pipeline (no backward) and the MoE aux
        loss (mean over the micro-batches), both on every rank.

        Forward-only passes send the activations stage to stage with plain point-to-point
        calls, micro-batch after micro-batch, instead of a second schedule: an evaluation
        schedule run between two training steps of the same stage broke the next step's
        gradients (torch 2.13, gloo), and nothing here needs overlap."""
        B, T = input_ids.shape
        n_mb = self.n_microbatches if B % self.n_microbatches == 0 else 1
        cfg = self.model.config
        self.module.aux_values = []
        outs = []
        for chunk in input_ids.chunk(n_mb):
            x = chunk
            if not self.is_first:
                x = torch.empty(chunk.shape[0], T, cfg.hidden_size, device=self.device)
                dist.recv(x, src=self.ranks[self.stage_index - 1], group=self.group)
            y = self.module(x)
            if not self.is_last:
                dist.send(y.contiguous(), dst=self.ranks[self.stage_index + 1], group=self.group)
            outs.append(y)
        logits = torch.cat(outs) if self.is_last else torch.empty(B, T, cfg.vocab_size, device=self.device)
        dist.broadcast(logits, src=self.ranks[-1], group=self.group)
        aux = torch.stack(self.module.aux_values).float().sum() / n_mb if self.module.aux_values else \
            torch.zeros((), device=self.device)
        dist.all_reduce(aux, group=self.group)
        return logits, aux


@contextlib.contextmanager
def keep_param_groups(optimizer: torch.optim.Optimizer | None, scheduler=None) -> Iterator[None]:
    """Load a checkpoint into `optimizer` keeping its own parameter groups.

    A DCP checkpoint keys the optimizer's parameter groups by their index; when the ranks
    hold different parameters (pipeline stages, expert shards), one rank's group can come
    back with another rank's member list, so its own parameters lose their hyperparameters
    (AdamW then fails on a missing 'lr'). The groups are configuration (membership, betas,
    weight decay), not training state: this puts back the ones the optimizer was built
    with, keeps the loaded per-parameter state (moments, step), and takes the learning
    rate from the restored schedule."""
    if optimizer is None:
        yield
        return
    groups = [dict(g) for g in optimizer.param_groups]
    yield
    optimizer.param_groups[:] = groups
    if scheduler is not None and hasattr(scheduler, "get_last_lr"):
        for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            g["lr"] = lr


class _Logits:
    """What an objective reads from a model call: `.logits` and `.aux_loss`."""

    def __init__(self, logits: torch.Tensor, aux_loss: torch.Tensor | None) -> None:
        self.logits = logits
        self.aux_loss = aux_loss


class PipelineModel(nn.Module):
    """The module the training loop holds under `pp`: this rank's pruned model (`module`,
    what the optimizer steps and checkpoints save) and a call that gives every rank the
    logits of the whole pipeline.

    In training (gradients on), the call returns logits and aux loss as leaf tensors that
    require grad: the loop's objective computes its loss from them on every rank, and
    `PipelineParallelStrategy.backward` then sends the loss's gradients w.r.t. them back
    through the schedule (`PipelineRunner.backward_from_logits`). So any objective that
    reads `.logits` / `.aux_loss` trains under `pp`, at the price of a second forward per
    micro-batch (the schedule recomputes it, as activation checkpointing does)."""

    def __init__(self, runner: PipelineRunner) -> None:
        super().__init__()
        self.module = runner.model
        self.runner = runner
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids: torch.Tensor, **kwargs) -> _Logits:
        unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if unsupported:
            raise ValueError(f"under pipeline parallelism the model takes input_ids only (got {unsupported}); "
                             f"hidden states stay on their stages: train with the plain causal-LM objective")
        logits, aux = self.runner.forward(input_ids)
        if not (torch.is_grad_enabled() and self.training):
            return _Logits(logits, aux)
        logits, aux = logits.requires_grad_(True), aux.requires_grad_(True)
        self.pending.append((input_ids, logits, aux))
        return _Logits(logits, aux)


class PipelineParallelStrategy(OneReplica, ProcessGroupStrategy):
    """`--strategy pp`: one pipeline stage per rank (blocks cut evenly at block boundaries),
    a GPipe or 1F1B schedule over the step's `grad_accum` micro-batches; every rank reads
    the same batch (no data parallelism).

    The loop hands the strategy a whole optimizer step (`forward_backward(batches)`, the
    step's micro-batches), because a pipeline schedule interleaves the micro-batches'
    forward and backward passes across stages."""

    name = "pp"

    def __init__(self, device=None, backend: str = "auto", timeout_s: float = 600.0, schedule: str = "1f1b",
                 microbatches: int | None = None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if microbatches is not None and microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {microbatches}")
        super().__init__(device, backend, timeout_s)
        self.schedule = schedule
        self.microbatches = microbatches
        self.n_microbatches = 1
        self.runner: PipelineRunner | None = None
        self._model: PipelineModel | None = None
        self._tied_pending = False

    def check(self, model_config, train_cfg: TrainConfig) -> None:
        super().check(model_config, train_cfg)
        check_pipeline(model_config, self.world_size, train_cfg.grad_accum)
        # whole-step hook: the step's grad_accum micro-batches; in-loop: each micro-batch cut
        # into `microbatches` (default: as many as stages, so every stage has work)
        self.n_microbatches = self.microbatches or self.world_size
        if train_cfg.batch_size % self.n_microbatches:
            raise ValueError(f"batch_size ({train_cfg.batch_size}) must be a multiple of the {self.n_microbatches} "
                             f"pipeline micro-batches; use --batch-size {self.n_microbatches * max(1, train_cfg.batch_size // self.n_microbatches)} "
                             f"or set dist.options.microbatches")

    def setup(self, model: nn.Module) -> nn.Module:
        self.barrier()  # the first timed collective follows: wait for ranks still preparing data
        self.runner = PipelineRunner(model, n_microbatches=self.microbatches or self.n_microbatches,
                                     schedule=self.schedule, device=self.device)
        self._model = PipelineModel(self.runner)
        return self._model

    def unwrap(self, model: nn.Module) -> nn.Module:
        model = getattr(model, "_orig_mod", model)
        return model.module if isinstance(model, PipelineModel) else model

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the objective's loss to the pipeline's logits, then through the stages."""
        loss.backward()
        model = self._model
        pending, model.pending = model.pending, []
        for input_ids, logits, aux in pending:
            g = logits.grad if logits.grad is not None else torch.zeros_like(logits)
            a = float(aux.grad) if aux.grad is not None else 0.0
            self.runner.backward_from_logits(input_ids, g, a)
        self._tied_pending = True

    def forward_backward(self, batches: list) -> dict[str, torch.Tensor]:
        """Forward + backward of one optimizer step: `batches` are its micro-batches
        ((input_ids, labels) each), run as the schedule's micro-batches; returns the step's
        metrics averaged over them (the same on every rank)."""
        if len(batches) != self.runner.n_microbatches:
            self.runner.n_microbatches = len(batches)
        ids = torch.cat([b[0] for b in batches]).to(self.device)
        labels = torch.cat([b[1] for b in batches]).to(self.device)
        self._tied_pending = True
        return self.runner.step(ids, labels, sync_tied=False)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global norm over the stages (the tied embedding / LM head counted once). Sums the
        tied table's gradient over its two stages first (once per optimizer step)."""
        if self._tied_pending:
            self.runner.sync_tied_grads()
            self._tied_pending = False
        tied = self.runner.tied_weight() if self.runner is not None else None
        sq = torch.zeros((), device=self.device)
        grads = []
        for p in self.unwrap(model).parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if not (tied is not None and p is tied and not self.runner.is_first):
                sq = sq + p.grad.detach().float().pow(2).sum()
        dist.all_reduce(sq)
        norm = sq.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.detach().mul_(coef.to(g.dtype))
        return norm

    def save_checkpoint(self, root, step, model, optimizer, scheduler, state, keep=None):
        return super().save_checkpoint(root, step, self.unwrap(model), optimizer, scheduler, state, keep=keep)

    def load_checkpoint(self, path, model, optimizer, scheduler):
        with keep_param_groups(optimizer, scheduler):
            return super().load_checkpoint(path, self.unwrap(model), optimizer, scheduler)

    def export_model(self, model: nn.Module) -> nn.Module | None:
        """The unsplit model on the main process, from every stage's weights."""
        stage = self.unwrap(model)
        mine = {k: v.detach().cpu() for k, v in stage.state_dict().items()}
        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, parts, dst=0)
        if not self.is_main:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in parts:
            full.update(part)
        plain = type(stage)(stage.config)
        plain.load_state_dict(full, strict=False)
        missing = set(plain.state_dict()) - set(full)
        if plain.config.tie_word_embeddings:
            missing -= {"lm_head.weight", "model.embed_tokens.weight"}
        if missing:
            raise RuntimeError(f"the stages' weights do not cover the model: missing {sorted(missing)[:5]}")
        return plain


register_strategy(PipelineParallelStrategy)
