"""Expert parallelism for the MoE layers: experts sharded over ranks, tokens exchanged with
`all_to_all_single`.

`apply_expert_parallel(model, group)` replaces every `MoEFeedForward` of the model by an
`ExpertParallelMoE` that keeps the router (replicated, as every dense parameter) and only
this rank's `E / ep` experts: rank r holds experts [r * E / ep, (r + 1) * E / ep). Each rank
trains on its own tokens (expert parallelism rides on data parallelism); one MoE forward:

1. route the local tokens (`route()`, the same float32 top-k as the local layer) and group
   the token copies by expert (`sorted_groups`), which also groups them by owner rank;
2. exchange the per-expert counts (`all_to_all_single` of an (E,) count vector), then the
   token copies themselves (`all_to_all_single` with those split sizes);
3. run each local expert once on every copy it received, from every rank;
4. send the outputs back along the reverse exchange and combine them with the routing
   weights, exactly as the local `sorted` dispatch does.

Both exchanges are `all_to_all_single` with autograd
(`torch.distributed._functional_collectives.all_to_all_single_autograd`, as torchtitan's
expert parallelism uses it), whose backward is the reverse exchange, so gradients reach the experts on other ranks. An
expert's gradient is the sum over every rank's tokens (the gradient of the summed
per-rank losses); the dense parameters' gradients are per-rank and are averaged by the
data-parallel wrapper (`ddp`/`fsdp`) that the `ep` strategy puts around the dense part,
which also scales the expert gradients by 1 / ep so the whole model sees the mean loss.

The local experts live in a `ModuleDict` keyed by their *global* index, so a rank's state
dict holds the unsplit model's names for its experts (`...mlp.experts.2.gate_proj.weight`);
the union of the ranks' state dicts is the full model's.

`check_expert_parallel(config, ep)` raises a ValueError naming the fix when the experts
cannot be split `ep` ways.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch import nn

from ..modules.moe import MoEFeedForward, RouterOutput, route, sorted_groups
from ..training.config import TrainConfig
from . import register_strategy
from .data_parallel import ProcessGroupStrategy, model_blocks

__all__ = ["ExpertParallelMoE", "ExpertParallelStrategy", "apply_expert_parallel", "check_expert_parallel",
           "expert_parameters"]


def check_expert_parallel(config, ep: int) -> None:
    """Raise ValueError (naming the fix) when the MoE layers of `config` cannot be split over `ep` ranks."""
    if ep < 1:
        raise ValueError(f"expert-parallel degree must be >= 1, got {ep}")
    if config.num_experts == 0:
        raise ValueError("expert parallelism needs a Mixture-of-Experts model, but num_experts is 0 (a dense "
                         "model); use --strategy ddp or fsdp, or a preset with experts (tiny, small, base)")
    if config.num_experts % ep:
        ok = [d for d in range(1, ep + 1) if config.num_experts % d == 0]
        raise ValueError(f"expert parallelism over {ep} ranks needs {ep} to divide num_experts "
                         f"({config.num_experts}); run with --nproc {max(ok)} or set num_experts to a "
                         f"multiple of {ep}")


def _wait(t: torch.Tensor) -> torch.Tensor:
    """The result of a functional collective, waited for (a plain tensor)."""
    return t.wait() if hasattr(t, "wait") else t


class ExpertParallelMoE(nn.Module):
    """The MoE layer with this rank's share of the experts (see the module docstring)."""

    def __init__(self, moe: MoEFeedForward, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group if group is not None else dist.group.WORLD
        self.ep = dist.get_world_size(self.group)
        self.ep_rank = dist.get_rank(self.group)
        if moe.num_experts % self.ep:
            raise ValueError(f"expert parallelism over {self.ep} ranks needs {self.ep} to divide num_experts "
                             f"({moe.num_experts}); change the number of ranks or of experts")
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.dispatch = "sorted"
        self.num_local = moe.num_experts // self.ep
        self.first_expert = self.ep_rank * self.num_local
        self.router = moe.router
        self.experts = nn.ModuleDict({str(i): moe.experts[i]
                                      for i in range(self.first_expert, self.first_expert + self.num_local)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, d)
        r = route(xf, self.router.weight, self.top_k)
        order, token_of, counts = sorted_groups(r.topk_idx, self.num_experts)
        xs = xf[token_of]  # (N*k, d): copies grouped by expert, hence by owner rank
        ep, El = self.ep, self.num_local
        send_counts = torch.tensor(counts, dtype=torch.long, device=xf.device)  # (E,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # (ep * El,): [source][local expert]
        recv_matrix = recv_counts.view(ep, El)
        send_split = send_counts.view(ep, El).sum(1).tolist()
        recv_split = recv_matrix.sum(1).tolist()
        received = _wait(all_to_all_single_autograd(xs, recv_split, send_split, self.group))
        # received rows are grouped by source rank, then by local expert: regroup by expert
        expert_of = torch.repeat_interleave(torch.arange(El, device=xf.device).repeat(ep), recv_counts)
        perm = torch.argsort(expert_of, stable=True)
        per_expert = recv_matrix.sum(0).tolist()
        outs = [self.experts[str(self.first_expert + e)](chunk)
                for e, chunk in enumerate(received[perm].split(per_expert)) if per_expert[e]]
        done = torch.cat(outs) if outs else received[:0]
        back_in = torch.empty_like(done).index_copy(0, perm, done)  # source-rank order again
        back = _wait(all_to_all_single_autograd(back_in, send_split, recv_split, self.group))
        ys = back * r.topk_weight.reshape(-1)[order, None].to(xf.dtype)
        return torch.zeros_like(xf).index_add_(0, token_of, ys).view(shape), r


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every MoE layer of `model` (in place) by its expert-parallel form; returns it.
    Every rank must hold identical weights before the call."""
    group = group if group is not None else dist.group.WORLD
    config = getattr(model, "config", None)
    if config is not None:
        check_expert_parallel(config, dist.get_world_size(group))
    found = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoEFeedForward):
                setattr(module, name, ExpertParallelMoE(child, group))
                found += 1
    if not found:
        raise ValueError(f"{type(model).__name__} has no MoE layer to split; use a Mixture-of-Experts model "
                         f"or a data-parallel strategy (ddp, fsdp)")
    return model


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert weight held by this rank (not replicated across ranks)."""
    out = []
    for mname, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            out.extend((f"{mname}.experts.{n}", p) for n, p in module.experts.named_parameters())
    return out


class ExpertParallelStrategy(ProcessGroupStrategy):
    """`--strategy ep`: the MoE experts sharded over the ranks (tokens exchanged with
    all-to-all), the dense part data-parallel with `dense="ddp"` (DistributedDataParallel
    that leaves the expert weights alone) or `dense="fsdp"` (FSDP2 per block, the experts
    ignored). Each rank reads its own slice of the global batch; every gradient is the mean
    over ranks, as in `ddp`."""

    name = "ep"

    def __init__(self, device=None, backend: str = "auto", timeout_s: float = 600.0, dense: str = "ddp") -> None:
        if dense not in ("ddp", "fsdp"):
            raise ValueError(f"ep's dense part runs under 'ddp' or 'fsdp', got {dense!r}")
        super().__init__(device, backend, timeout_s)
        self.dense = dense
        self._experts: list[tuple[str, nn.Parameter]] = []

    def check(self, model_config, train_cfg: TrainConfig) -> None:
        super().check(model_config, train_cfg)
        check_expert_parallel(model_config, self.world_size)

    def setup(self, model: nn.Module) -> nn.Module:
        self.barrier()  # the first timed collective follows: wait for ranks still preparing data
        model = apply_expert_parallel(model.to(self.device))
        self._experts = expert_parameters(model)
        scale = 1.0 / self.world_size  # an expert's gradient sums every rank's loss: make it their mean
        for _, p in self._experts:
            p.register_hook(lambda g: g * scale)
        if self.dense == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [n for n, _ in self._experts])
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import fully_shard

        ignored = {p for _, p in self._experts}
        for block in model_blocks(model):
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if self.dense == "fsdp":
            root = getattr(model, "_orig_mod", model)
            root.set_requires_gradient_sync(sync)
            try:
                yield
            finally:
                root.set_requires_gradient_sync(True)
        elif sync:
            yield
        else:
            with getattr(model, "_orig_mod", model).no_sync():
                yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global norm: experts (different on every rank) and FSDP shards are summed over
        ranks, DDP's replicated dense gradients counted once."""
        expert_ids = {id(p) for _, p in self._experts}
        mine = torch.zeros((), device=self.device)  # summed over ranks
        same = torch.zeros((), device=self.device)  # identical on every rank
        grads = []
        for p in model.parameters():
            if p.grad is None:
                continue
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            grads.append(g)
            sq = g.detach().float().pow(2).sum()
            if id(p) in expert_ids or self.dense == "fsdp":
                mine = mine + sq
            else:
                same = same + sq
        dist.all_reduce(mine)
        norm = (mine + same).sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                g.detach().mul_(coef.to(g.dtype))
        return norm

    def load_checkpoint(self, path, model, optimizer, scheduler):
        from .pipeline import keep_param_groups  # ranks hold different experts: keep our own groups

        with keep_param_groups(optimizer, scheduler):
            return super().load_checkpoint(path, model, optimizer, scheduler)

    def export_model(self, model: nn.Module) -> nn.Module | None:
        """The unsplit model on the main process: dense weights from this rank (FSDP: gathered),
        experts gathered from the ranks that hold them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        inner = self.unwrap(getattr(model, "_orig_mod", model))
        dense = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        expert_names = {n for n, _ in self._experts}
        mine = {n: p.detach().cpu() for n, p in self._experts}
        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, parts, dst=0)
        if not self.is_main:
            return None
        full = {k: v for k, v in dense.items() if k not in expert_names}
        for part in parts:
            full.update(part)
        cls = next(c for c in type(inner).__mro__ if "FSDP" not in c.__name__)
        plain = cls(inner.config)
        plain.load_state_dict(full)
        return plain


register_strategy(ExpertParallelStrategy)
