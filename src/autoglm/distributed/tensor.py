"""Tensor parallelism (Megatron-style) with DTensor for the Open-AutoGLM model.

`apply_tensor_parallel(model, mesh)` rewrites a `OpenAutoGLMForCausalLM` (or its backbone)
in place with PyTorch's `parallelize_module`, on a 1-D `DeviceMesh` of `tp` ranks that all
see the same batch:

* attention: `q_proj`, `k_proj`, `v_proj` column-wise (each rank keeps a contiguous chunk
  of the query and key/value heads), `o_proj` row-wise (one all-reduce, or a
  reduce-scatter under sequence parallelism). As in torchtitan, the attention module is
  told its *local* head counts (`n_heads // tp`, `n_kv // tp`); grouped-query attention
  stays consistent because rank r holds query heads and key/value heads of the same
  groups. A relative-position bias table (H, W + G) is sharded by heads too.
* dense FFN (SwiGLU): `gate_proj`/`up_proj` column-wise, `down_proj` row-wise.
* MoE: every expert's projections are split the same way (the hidden width of each expert
  is sharded: gate/up Shard(0), down Shard(1)); the router stays replicated, so every rank
  makes the same routing decision and runs the same experts on its slice. The MoE layer is
  wrapped from outside (`TensorParallelMoE`: the same `router`/`experts` attributes and
  parameter names, `route()` from `autoglm.modules.moe`), which combines the experts'
  partial outputs locally and sums them over the ranks with one collective per layer.
* embedding (vocabulary-sharded, row-wise) and LM head (column-wise), which keep their
  weight tying: both shard the (V, d) table along the vocabulary.
* sequence parallelism (optional, `sequence_parallel=True`): the residual stream between
  blocks is sharded along the sequence, the RMSNorms run on their sequence shard
  (`SequenceParallel`), and each attention / FFN all-gathers its input and
  reduce-scatters its output. Learned absolute positions are added to the embedding
  output at full length, so a model with `position="absolute"` keeps a replicated
  residual stream (`sequence_parallel` is ignored there, with a log line).

Parameters that stay plain tensors and only see each rank's heads (the learnable rotary
frequencies) get a gradient hook that sums their gradient over the tensor-parallel group.
Replicated DTensor parameters (the norms under sequence parallelism) end a backward pass
with `Partial` gradients; `finalize_grads` turns them into replicated ones before clipping
and the optimizer step, and `clip_grad_norm` computes the global norm over sharded and
replicated gradients alike.

`check_tensor_parallel(config, tp)` raises a ValueError naming the fix when the model
cannot be split `tp` ways (heads, key/value heads, FFN and expert widths, vocabulary).

`TensorParallelStrategy` (`autoglm train --nproc N --strategy tp`, or
`make_strategy("tp", sequence_parallel=...)` under torchrun, as benchmarks/memory.py uses
it) makes all ranks one tensor-parallel group reading the same batch; its checkpoints are
DCP shards of the DTensors, and `export_model` gathers the unsplit model.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from ..modules.moe import MoEFeedForward, RouterOutput, route, sorted_groups
from ..modules.position import RelativePositionBias
from ..training.config import TrainConfig
from ..training.optim import param_groups
from . import register_strategy
from .data_parallel import OneReplica, ProcessGroupStrategy

__all__ = ["apply_tensor_parallel", "check_tensor_parallel", "TensorParallelMoE", "finalize_grads",
           "clip_grad_norm", "full_state_dict", "TensorParallelStrategy"]

log = logging.getLogger(__name__)


def check_tensor_parallel(config, tp: int) -> None:
    """Raise ValueError (naming the fix) when `config` cannot be split over `tp` ranks."""
    if tp < 1:
        raise ValueError(f"tensor-parallel degree must be >= 1, got {tp}")
    problems = []
    divisible = [("num_attention_heads", config.num_attention_heads),
                 ("num_key_value_heads", config.num_key_value_heads),
                 ("vocab_size", config.vocab_size)]
    if any(not config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        divisible.append(("intermediate_size", config.intermediate_size))
    if config.num_experts > 0:
        divisible.append(("expert_intermediate_size", config.expert_intermediate_size))
    for name, value in divisible:
        if value % tp:
            problems.append(f"{name} ({value})")
    if problems:
        ok = [d for d in range(1, tp + 1) if all(v % d == 0 for _, v in divisible)]
        raise ValueError(
            f"tensor parallelism over {tp} ranks needs {tp} to divide {', '.join(problems)}; run with "
            f"--nproc {max(ok)} (a degree that divides them all), or change the model so that {tp} divides "
            f"{' and '.join(p.split(' ')[0] for p in problems)}")


class _HeadShardedBias(nn.Module):
    """A `RelativePositionBias` whose (H, W + G) table is sharded by heads (Shard(0));
    `table()` gives this rank's (H / tp, W + G) rows."""

    def __init__(self, bias: RelativePositionBias, mesh: DeviceMesh) -> None:
        super().__init__()
        self.scale = bias.scale
        self.weight = nn.Parameter(distribute_tensor(bias.weight.detach(), mesh, [Shard(0)]))

    def table(self) -> torch.Tensor:
        return self.weight.to_local() * self.scale


def _sum_grad_hook(group: dist.ProcessGroup):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


class TensorParallelMoE(nn.Module):
    """An MoE layer whose experts are split column-/row-wise over a tensor-parallel mesh.

    Keeps the wrapped layer's `router` and `experts` (so parameter names do not change).
    Every expert's `gate_proj`/`up_proj` weights are sharded along their rows (Shard(0),
    column-wise) and `down_proj` along its columns (Shard(1), row-wise), so each rank holds
    a slice of every expert's hidden width. The router is replicated: every rank routes
    every token the same way and runs every chosen expert on its slice; the experts'
    partial outputs are combined with the routing weights locally and summed over the ranks
    with one all-reduce per layer (one reduce-scatter under sequence parallelism), instead
    of one per expert. In backward, the gradients that reach the input and the routing
    weights through the experts are partial on each rank and are summed over the ranks (the
    DTensor `Partial` gradient placement), while the router's own path stays replicated.
    """

    def __init__(self, moe: MoEFeedForward, mesh: DeviceMesh, sequence_parallel: bool) -> None:
        super().__init__()
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.dispatch = "sorted"
        self.router = moe.router
        self.experts = moe.experts
        self.mesh = mesh
        self.sequence_parallel = sequence_parallel
        for expert in self.experts:
            for name, placement in (("gate_proj", Shard(0)), ("up_proj", Shard(0)), ("down_proj", Shard(1))):
                lin = getattr(expert, name)
                lin.weight = nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [placement]))

    def _sum_grads(self, t: torch.Tensor) -> torch.Tensor:
        """Identity forward; backward sums the gradient over the ranks (it is partial on each)."""
        return DTensor.from_local(t, self.mesh, [Replicate()]).to_local(grad_placements=[Partial()])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        if self.sequence_parallel:  # (B, T / tp, d) shard -> (B, T, d)
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, self.mesh, [Shard(1)])
            x = x.redistribute(self.mesh, [Replicate()]).to_local()
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, d), the same on every rank
        r = route(xf, self.router.weight, self.top_k)  # replicated computation, replicated gradients
        order, token_of, counts = sorted_groups(r.topk_idx, self.num_experts)
        xs = self._sum_grads(xf)[token_of]  # (N*k, d), copies grouped by expert
        outs = []
        for e, chunk in enumerate(xs.split(counts)):
            if counts[e]:
                ex = self.experts[e]
                h = F.silu(F.linear(chunk, ex.gate_proj.weight.to_local())) * F.linear(chunk, ex.up_proj.weight.to_local())
                outs.append(F.linear(h, ex.down_proj.weight.to_local()))  # this rank's partial sum
        w = self._sum_grads(r.topk_weight).reshape(-1)[order, None].to(xf.dtype)
        y = torch.zeros_like(xf).index_add_(0, token_of, torch.cat(outs) * w).view(shape)
        out = [Shard(1)] if self.sequence_parallel else [Replicate()]  # reduce-scatter / all-reduce
        y = DTensor.from_local(y, self.mesh, [Partial()]).redistribute(self.mesh, out).to_local()
        return y, r


def _backbone(model: nn.Module) -> nn.Module:
    return model.model if hasattr(model, "lm_head") else model


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = True) -> nn.Module:
    """Split `model` (OpenAutoGLMForCausalLM or AutoGLMBackbone) over `mesh` in place; returns it.

    Every rank must call this on a model with identical weights (same seed or the same
    checkpoint) and then feed it the same batch."""
    tp = mesh.size()
    backbone = _backbone(model)
    config = backbone.config
    check_tensor_parallel(config, tp)
    if sequence_parallel and backbone.embed_positions is not None:
        log.info("sequence parallelism is off: learned absolute positions are added at full sequence length")
        sequence_parallel = False
    sp = sequence_parallel
    out_layout = Shard(1) if sp else Replicate()
    group = mesh.get_group()
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is backbone.embed_tokens.weight

    parallelize_module(backbone.embed_tokens, mesh, RowwiseParallel(input_layouts=Replicate(),
                                                                     output_layouts=out_layout))
    for block in backbone.layers:
        attn = block.self_attn
        parallelize_module(attn, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                        "v_proj": ColwiseParallel(),
                                        "o_proj": RowwiseParallel(output_layouts=out_layout)})
        attn.n_heads //= tp  # the module reshapes with its local head counts
        attn.n_kv //= tp
        if attn.rel_bias is not None:
            attn.rel_bias = _HeadShardedBias(attn.rel_bias, mesh)
        if attn.rotary is not None:  # shared by this rank's heads only: sum the gradient over ranks
            for p in attn.rotary.parameters():
                p.register_hook(_sum_grad_hook(group))
        if block.is_moe:
            block.mlp = TensorParallelMoE(block.mlp, mesh, sp)
        else:
            parallelize_module(block.mlp, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                                 "down_proj": RowwiseParallel(output_layouts=out_layout)})
        if sp:
            parallelize_module(block, mesh, {
                "input_layernorm": SequenceParallel(),
                "post_attention_layernorm": SequenceParallel(),
                "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                desired_input_layouts=(Replicate(), None, None),
                                                use_local_output=True),
            })
            if not block.is_moe:
                parallelize_module(block.mlp, mesh, PrepareModuleInput(input_layouts=(Shard(1),),
                                                                       desired_input_layouts=(Replicate(),),
                                                                       use_local_output=True))
    if sp:
        parallelize_module(backbone.norm, mesh, SequenceParallel())
    if head is not None:
        parallelize_module(head, mesh, ColwiseParallel(input_layouts=out_layout, output_layouts=Replicate()))
        if tied:  # both shard the (V, d) table along V: share the one DTensor parameter again
            head.weight = backbone.embed_tokens.weight
    if sp:
        backbone.register_forward_pre_hook(_check_sequence_length(tp))
    model._tensor_parallel = {"mesh": mesh, "sequence_parallel": sp}
    return model


def _check_sequence_length(tp: int):
    def hook(module: nn.Module, args: tuple) -> None:
        T = args[0].shape[1]
        if T % tp:
            raise ValueError(f"sequence parallelism over {tp} ranks needs the sequence length ({T}) to be a "
                             f"multiple of {tp}; pad or cut the batch to a multiple of {tp}, or turn "
                             f"sequence parallelism off")

    return hook


def finalize_grads(model: nn.Module) -> None:
    """Turn `Partial` DTensor gradients (replicated parameters used on sequence shards) into
    replicated ones, so the optimizer sees full gradients."""
    for p in model.parameters():
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            p.grad = g.redistribute(g.device_mesh, [Replicate()] * g.device_mesh.ndim)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (sharded DTensor, replicated DTensor and plain
    replicated tensors alike), clipped to `max_norm` when > 0; returns the norm before
    clipping as a plain scalar tensor."""
    finalize_grads(model)
    squares = []
    for p in {id(p): p for p in model.parameters()}.values():  # tied weights once
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            squares.append(torch.linalg.vector_norm(g.float()).full_tensor() ** 2)
        else:
            squares.append(torch.linalg.vector_norm(g.float()) ** 2)
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0 and math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in {id(p): p for p in model.parameters()}.values():
            if p.grad is not None:
                p.grad.mul_(float(coef))
    return total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every DTensor gathered to a full tensor (collective:
    call on every rank); the names are those of the unsplit model."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------- strategy
class TensorParallelStrategy(OneReplica, ProcessGroupStrategy):
    """`--strategy tp`: every rank holds 1/tp of each attention and FFN/expert layer and
    reads the same batch (tp = the world size; no data parallelism)."""

    name = "tp"

    def __init__(self, device=None, backend: str = "auto", timeout_s: float = 600.0,
                 sequence_parallel: bool = True) -> None:
        super().__init__(device, backend, timeout_s)
        self.sequence_parallel = sequence_parallel
        self.mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("tp",))

    def check(self, model_config, train_cfg: TrainConfig) -> None:
        super().check(model_config, train_cfg)
        check_tensor_parallel(model_config, self.world_size)
        if (self.sequence_parallel and getattr(model_config, "position", None) != "absolute"
                and train_cfg.seq_len % self.world_size):
            raise ValueError(f"sequence parallelism over {self.world_size} ranks needs seq_len "
                             f"({train_cfg.seq_len}) to be a multiple of {self.world_size}; use --seq-len "
                             f"{train_cfg.seq_len // self.world_size * self.world_size or self.world_size} or "
                             f"turn it off (dist.options: {{sequence_parallel: false}})")

    def setup(self, model: nn.Module) -> nn.Module:
        self.barrier()  # the first timed collective follows: wait for ranks still preparing data
        return apply_tensor_parallel(model.to(self.device), self.mesh, self.sequence_parallel)

    def build_optimizer(self, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        # DTensor and plain (replicated) parameters side by side: the single-tensor AdamW
        groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                                           weight_decay=cfg.weight_decay, foreach=False)
        return self.optimizer

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm(model, max_norm)

    def export_model(self, model: nn.Module) -> nn.Module | None:
        model = self.unwrap(model)
        full = full_state_dict(model)  # every rank gathers
        if not self.is_main:
            return None
        plain = type(model)(model.config)
        plain.load_state_dict(full)
        return plain


register_strategy(TensorParallelStrategy)
