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
micro-batches of one batch (the micro-batches of gradient accumulation), with the
next-token loss computed on the last stage; `scale_grads` averages the gradients over
micro-batches, as the single-process loop's `loss / grad_accum` does.

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

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.utils.checkpoint import checkpoint

from ..losses import lm_loss, moe_aux_loss
from ..modules.attention import AttentionMetadata
from ..training.config import TrainConfig
from . import register_strategy
from .data_parallel import ProcessGroupStrategy

__all__ = ["SCHEDULES", "PipelineModel", "PipelineParallelStrategy", "PipelineRunner", "PipelineStageModule",
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
                x = _AttachAux.apply(x, aux)
        if self.is_last:
            return self.model.lm_head(backbone.norm(x))
        return x


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return lm_loss(logits, labels)


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

    def _schedule(self, shape: tuple[int, int], n_mb: int, training: bool):
        key = (shape, n_mb, training)
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
            self._schedules[key] = (stage, cls(stage, n_mb, loss_fn=_lm_loss if training else None))
        return self._schedules[key][1]

    def sync_tied_grads(self) -> None:
        """Sum the tied embedding / LM-head gradient of the first and last stages."""
        w = self.tied_weight()
        if w is None:
            return
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        dist.all_reduce(g, group=self._tied_group)
        w.grad = g

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward + backward of one batch (gradients accumulate into .grad, averaged over the
        micro-batches); returns {"loss", "lm_loss", "aux_loss"} averaged over micro-batches."""
        sched = self._schedule(tuple(input_ids.shape), self.n_microbatches, training=True)
        self.module.aux_values = []
        losses: list[torch.Tensor] = []
        if self.is_first and self.is_last:
            sched.step(input_ids, target=labels, losses=losses)
        elif self.is_first:
            sched.step(input_ids)
        elif self.is_last:
            sched.step(target=labels, losses=losses)
        else:
            sched.step()
        self.sync_tied_grads()
        return self._metrics(losses)

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
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of a batch through the whole pipeline (no backward), on every rank."""
        B, T = input_ids.shape
        n_mb = self.n_microbatches if B % self.n_microbatches == 0 else 1
        sched = self._schedule((B, T), n_mb, training=False)
        self.module.aux_values = []
        out = sched.eval(input_ids) if self.is_first else sched.eval()
        logits = out if self.is_last else torch.empty(B, T, self.model.config.vocab_size, device=self.device)
        dist.broadcast(logits, src=self.ranks[-1], group=self.group)
        return logits


class _Logits:
    """What `evaluate()` reads from a model call: `.logits`."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.aux_loss = None


class PipelineModel(nn.Module):
    """The module the training loop holds under `pp`: this rank's pruned model (`module`,
    what the optimizer steps and checkpoints save) and a forward-only call that runs the
    whole pipeline and gives every rank the logits (evaluation). Training steps go through
    `PipelineParallelStrategy.forward_backward`, which runs the schedule."""

    def __init__(self, runner: PipelineRunner) -> None:
        super().__init__()
        self.module = runner.model
        self.runner = runner

    def forward(self, input_ids: torch.Tensor, **kwargs) -> _Logits:
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError("under pipeline parallelism a training step runs the whole schedule (forward and "
                               "backward of all micro-batches) through PipelineParallelStrategy.forward_backward; "
                               "a model call only evaluates (call it under torch.no_grad() or in eval mode)")
        return _Logits(self.runner.forward(input_ids))


class PipelineParallelStrategy(ProcessGroupStrategy):
    """`--strategy pp`: one pipeline stage per rank (blocks cut evenly at block boundaries),
    a GPipe or 1F1B schedule over the step's `grad_accum` micro-batches; every rank reads
    the same batch (no data parallelism).

    The loop hands the strategy a whole optimizer step (`forward_backward(batches)`, the
    step's micro-batches), because a pipeline schedule interleaves the micro-batches'
    forward and backward passes across stages."""

    name = "pp"

    def __init__(self, device=None, backend: str = "auto", timeout_s: float = 600.0, schedule: str = "1f1b") -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        super().__init__(device, backend, timeout_s)
        self.schedule = schedule
        self.n_microbatches = 1
        self.runner: PipelineRunner | None = None

    @property
    def data_parallel_rank(self) -> int:
        return 0

    @property
    def data_parallel_size(self) -> int:
        return 1

    def check(self, model_config, train_cfg: TrainConfig) -> None:
        super().check(model_config, train_cfg)
        check_pipeline(model_config, self.world_size, train_cfg.grad_accum)
        self.n_microbatches = train_cfg.grad_accum

    def setup(self, model: nn.Module) -> nn.Module:
        self.runner = PipelineRunner(model, n_microbatches=self.n_microbatches, schedule=self.schedule,
                                     device=self.device)
        return PipelineModel(self.runner)

    def unwrap(self, model: nn.Module) -> nn.Module:
        model = getattr(model, "_orig_mod", model)
        return model.module if isinstance(model, PipelineModel) else model

    def forward_backward(self, batches: list) -> dict[str, torch.Tensor]:
        """Forward + backward of one optimizer step: `batches` are its micro-batches
        ((input_ids, labels) each), run as the schedule's micro-batches; returns the step's
        metrics averaged over them (the same on every rank)."""
        if len(batches) != self.runner.n_microbatches:
            self.runner.n_microbatches = len(batches)
        ids = torch.cat([b[0] for b in batches]).to(self.device)
        labels = torch.cat([b[1] for b in batches]).to(self.device)
        return self.runner.step(ids, labels)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global norm over the stages (the tied embedding / LM head counted once)."""
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
