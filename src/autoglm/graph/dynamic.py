"""Dynamic graphs end to end: timed edges -> snapshots -> an encoder that carries node states
from snapshot to snapshot -> temporal link prediction, against a static encoder.

    snapshots   `time_snapshots` cuts `edge_time` (UTC epoch seconds, as `graph clean` parses
                it) into windows (a window length in seconds, or a number of equal windows);
                windows without an edge are dropped and reported, never silently merged
    encoder     `GraphEncoder.forward_sequence`: snapshot t starts from the final node states
                of snapshot t-1 (the autoregressive update h_t = h_{t-1} + act(A_t h W));
                the static baseline encodes every snapshot alone with the same encoder
    objective   temporal link prediction, self-supervised: from the states after snapshot t,
                score the edges that appear in snapshot t+1 for the first time (label 1)
                against as many sampled pairs that are not edges up to t+1 (label 0), BCE
                (`masked_edge_loss`); the last `test_snapshots` transitions are held out
    metrics     ROC AUC and average precision (scikit-learn) on the held-out transitions; with
                fewer than MIN_TEST_POSITIVES (20) new edges in them the run is refused, since
                an AUC over a handful of edges is noise (one edge scores 0 or 1)

`evolving_graph` generates the default data: communities whose members drift over time, each
snapshot a sparse sample of the current communities, so one snapshot says little and the
history says more.

Example:
    >>> from autoglm.graph.config import EncoderConfig
    >>> g = evolving_graph(num_nodes=100, num_snapshots=5, seed=0)
    >>> snaps, skipped = snapshot_edges(g, num_snapshots=5)
    >>> len(snaps), skipped
    (5, [])
    >>> res = train_temporal(g.x, snaps, EncoderConfig(hidden_dim=8, num_layers=1), carry=True, epochs=2,
    ...                      test_snapshots=1)
    >>> sorted(res["test"])
    ['ap', 'auc', 'negatives', 'positives']
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .augment import sample_non_edges
from .config import EncoderConfig
from .encoder import GraphEncoder
from .losses import masked_edge_loss

__all__ = ["evolving_graph", "snapshot_edges", "new_edges", "TemporalLinkModel", "train_temporal",
           "compare_temporal", "MIN_TEST_POSITIVES"]

log = logging.getLogger(__name__)

DAY = 86400.0
# Held-out new edges an AUC / AP needs to mean anything: with 1-2 positives it is 0, 0.5 or 1 by
# chance (a window too short for the data gave "AUC 1.0" on two edges); 20 keeps one positive's
# weight in the AUC at 5%.
MIN_TEST_POSITIVES = 20


def evolving_graph(num_nodes: int = 500, num_snapshots: int = 12, num_blocks: int = 5, num_features: int = 32,
                   p_in: float = 0.03, p_out: float = 0.001, drift: float = 0.03, feature_signal: float = 0.05,
                   seed: int = 0) -> Any:
    """A generated evolving graph: `num_blocks` communities; before each snapshot a share
    `drift` of the nodes moves to another community; snapshot t holds each pair with
    probability p_in (same community now) or p_out, timestamped uniformly inside day t.
    Features are sparse binary with a weak community signal (`feature_signal`, from the
    initial communities). Returns a PyG `Data` (x (N, F), edge_index (2, E) both directions,
    edge_time (E,) float64 epoch seconds, y (N,) the final communities)."""
    from torch_geometric.data import Data

    if num_nodes < 2 or num_blocks < 1 or num_snapshots < 2:
        raise ValueError(f"need num_nodes ({num_nodes}) >= 2, num_blocks ({num_blocks}) >= 1, num_snapshots "
                         f"({num_snapshots}) >= 2")
    for name, p in (("p_in", p_in), ("p_out", p_out), ("drift", drift), ("feature_signal", feature_signal)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} ({p}) must be a probability in [0, 1]")
    gen = torch.Generator().manual_seed(seed)
    block = torch.randint(0, num_blocks, (num_nodes,), generator=gen)
    topic = (torch.rand(num_blocks, num_features, generator=gen) < 0.2).float()
    x = (torch.rand(num_nodes, num_features, generator=gen) < 0.02 + feature_signal * topic[block]).float()
    upper = torch.triu(torch.ones(num_nodes, num_nodes, dtype=torch.bool), 1)
    edges, times = [], []
    for t in range(num_snapshots):
        if t:
            move = torch.rand(num_nodes, generator=gen) < drift
            block = torch.where(move, torch.randint(0, num_blocks, (num_nodes,), generator=gen), block)
        same = block.unsqueeze(0) == block.unsqueeze(1)
        prob = torch.where(same, p_in, p_out)
        pairs = ((torch.rand(num_nodes, num_nodes, generator=gen) < prob) & upper).nonzero().t()  # (2, E_t)
        edges.append(pairs)
        times.append(t * DAY + DAY * torch.rand(pairs.shape[1], generator=gen, dtype=torch.float64))
    ei = torch.cat(edges, 1)
    t = torch.cat(times)
    return Data(x=x, edge_index=torch.cat([ei, ei.flip(0)], 1), edge_time=torch.cat([t, t]), y=block,
                num_nodes=num_nodes)


def snapshot_edges(data: Any, num_snapshots: int | None = None, window: float | None = None,
                   untimed: str = "error") -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """data.edge_time -> ([edge_index_t (2, E_t)] for every non-empty window, [{"window",
    "start", "reason"} for each dropped empty window]). Windows: `window` seconds each from
    the earliest time, or `num_snapshots` equal ones. Edges without a time (NaN: the column
    was empty for that row): `untimed="error"` raises naming how many, `"static"` puts them
    in every snapshot."""
    if (num_snapshots is None) == (window is None):
        raise ValueError("give exactly one of num_snapshots (equal windows) and window (seconds per snapshot)")
    if getattr(data, "edge_time", None) is None:
        raise ValueError("the graph has no edge_time: clean a file with a timestamp column (`autoglm graph clean "
                         "--edges FILE --time-col COLUMN`) or use the generated evolving graph")
    if untimed not in ("error", "static"):
        raise ValueError(f"untimed {untimed!r} must be 'error' or 'static'")
    t = data.edge_time.double()
    timed = ~t.isnan()
    if not bool(timed.any()):
        raise ValueError("no edge has a time (edge_time is all missing); pass --time-col when the column has "
                         "another name")
    if untimed == "error" and not bool(timed.all()):
        raise ValueError(f"{int((~timed).sum())} of {t.numel()} edges have no time (an empty timestamp cell); "
                         f"fill them in, or keep them in every snapshot with untimed='static' (--untimed static)")
    lo, hi = float(t[timed].min()), float(t[timed].max())
    if window is not None:
        if window <= 0:
            raise ValueError(f"window ({window}) must be > 0 seconds")
        count = int((hi - lo) // window) + 1
        width = window
    else:
        if num_snapshots < 1:
            raise ValueError(f"num_snapshots ({num_snapshots}) must be >= 1")
        count, width = num_snapshots, (hi - lo) / num_snapshots if hi > lo else 1.0
    idx = ((t - lo) / width).floor().clamp(0, count - 1).nan_to_num(-1).long()
    occupied = set(torch.unique(idx[timed]).tolist())  # only these are cut (a tiny window makes many empty ones)
    out = [data.edge_index[:, (idx == k) | ~timed] for k in sorted(occupied)]
    skipped = [{"window": k, "start": lo + k * width, "reason": "no edge has a time in this window"}
               for k in range(count) if k not in occupied]
    return out, skipped


def _keys(ei: torch.Tensor, n: int) -> torch.Tensor:
    return torch.unique(ei.min(0).values * n + ei.max(0).values)


def new_edges(snapshots: Sequence[torch.Tensor], num_nodes: int) -> list[torch.Tensor]:
    """For each snapshot t >= 1, the undirected pairs (2, M_t) (min, max) that are edges in
    snapshot t and in no snapshot before it; entry 0 is every pair of snapshot 0."""
    seen = torch.empty(0, dtype=torch.long)
    out = []
    for ei in snapshots:
        ei = ei[:, ei[0] != ei[1]]
        k = _keys(ei, num_nodes) if ei.numel() else seen[:0]
        fresh = k[~torch.isin(k, seen)]
        out.append(torch.stack([fresh // num_nodes, fresh % num_nodes]))
        seen = torch.unique(torch.cat([seen, k]))
    return out


class TemporalLinkModel(nn.Module):
    """A `GraphEncoder` + MaskGAE's edge decoder (MLP on h_u * h_v). `carry=True` runs the
    snapshots autoregressively (`forward_sequence`), `carry=False` encodes each alone."""

    def __init__(self, in_dim: int, enc: EncoderConfig, carry: bool, normalize_state: bool = True) -> None:
        super().__init__()
        self.carry, self.normalize_state = carry, normalize_state
        self.encoder = GraphEncoder(in_dim, **dataclasses.asdict(enc))
        hidden = enc.hidden_dim
        self.decoder = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def states(self, x: torch.Tensor, snapshots: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Node states after each snapshot: [(N, hidden)]."""
        if self.carry:
            return self.encoder.forward_sequence([(x, ei) for ei in snapshots], normalize_state=self.normalize_state)
        return [self.encoder(x, ei) for ei in snapshots]

    def score(self, h: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        return self.decoder(h[pairs[0]] * h[pairs[1]]).squeeze(-1)


def _negatives(snapshots: Sequence[torch.Tensor], t: int, num: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """`num` pairs that are not edges in snapshots 0..t."""
    return sample_non_edges(torch.cat(list(snapshots[:t + 1]), 1), n, num, generator=gen)


def _metrics(pos: torch.Tensor, neg: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).numpy()
    s = torch.cat([pos, neg]).numpy()
    return {"auc": float(roc_auc_score(y, s)), "ap": float(average_precision_score(y, s)),
            "positives": int(pos.numel()), "negatives": int(neg.numel())}


def train_temporal(x: torch.Tensor, snapshots: Sequence[torch.Tensor], enc: EncoderConfig, carry: bool,
                   epochs: int = 100, lr: float = 3e-3, test_snapshots: int = 2, seed: int = 0,
                   device: str | None = None, normalize_state: bool = True,
                   min_test_positives: int = MIN_TEST_POSITIVES) -> dict[str, Any]:
    """Train a `TemporalLinkModel` on the transitions t -> t+1 before the last
    `test_snapshots` snapshots (full-batch AdamW, fresh negatives every epoch), then score the
    held-out transitions (the states still run through every snapshot, so the held-out
    snapshots' own edges are seen, never the ones being predicted; fixed seeded negatives).
    ValueError before training when the held-out transitions hold fewer than
    `min_test_positives` new edges (their AUC / AP would be noise).
    Returns {"test": {auc, ap, positives, negatives}, "train_loss" (first, last), "seconds",
    "model", "states" (the states after the last snapshot)}."""
    n = x.shape[0]
    steps = len(snapshots)
    if steps < test_snapshots + 2:
        raise ValueError(f"{steps} non-empty snapshots: temporal link prediction needs at least test_snapshots + 2 "
                         f"({test_snapshots + 2}); use more or shorter windows (--num-snapshots / --window)")
    if test_snapshots < 1 or epochs < 1:
        raise ValueError(f"test_snapshots ({test_snapshots}) and epochs ({epochs}) must be >= 1")
    fresh = new_edges(snapshots, n)
    train_t = list(range(steps - test_snapshots - 1))  # predict snapshot t+1 from the states after t
    test_t = list(range(steps - test_snapshots - 1, steps - 1))
    if not sum(fresh[t + 1].shape[1] for t in train_t):
        raise ValueError("no edge appears for the first time in a training snapshot after the first (every pair "
                         "is in snapshot 0 already, or repeats one seen before): temporal link prediction, which "
                         "predicts new pairs, has nothing to learn from")
    held_out = sum(fresh[t + 1].shape[1] for t in test_t)
    if held_out < min_test_positives:
        raise ValueError(f"the {test_snapshots} held-out snapshot(s) hold {held_out} edge(s) seen for the first "
                         f"time; an AUC / AP needs at least {min_test_positives} to mean anything (over a few edges "
                         f"it is 0, 0.5 or 1 by chance); use longer snapshots (a larger --window, or fewer "
                         f"--num-snapshots) or hold out more of them (--test-snapshots)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = TemporalLinkModel(x.shape[1], enc, carry, normalize_state).to(dev)
    xs, snaps = x.to(dev), [ei.to(dev) for ei in snapshots]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    losses = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        states = model.states(xs, snaps[:train_t[-1] + 1])
        loss = 0.0
        for t in train_t:
            pos = fresh[t + 1]
            neg = _negatives(snapshots, t + 1, pos.shape[1], n, gen)
            loss = loss + masked_edge_loss(model.score(states[t], pos.to(dev)), model.score(states[t], neg.to(dev)))
        loss = loss / len(train_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    model.eval()
    eval_gen = torch.Generator().manual_seed(12345)  # the same negatives for every model compared
    with torch.no_grad():
        states = model.states(xs, snaps)
        pos_s, neg_s = [], []
        for t in test_t:
            pos = fresh[t + 1]
            neg = _negatives(snapshots, t + 1, pos.shape[1], n, eval_gen)
            pos_s.append(model.score(states[t], pos.to(dev)).cpu())
            neg_s.append(model.score(states[t], neg.to(dev)).cpu())
    return {"test": _metrics(torch.cat(pos_s).float(), torch.cat(neg_s).float()),
            "train_loss": (losses[0], losses[-1]), "seconds": round(seconds, 2), "model": model.cpu(),
            "states": states[-1].cpu()}


def compare_temporal(x: torch.Tensor, snapshots: Sequence[torch.Tensor], enc: EncoderConfig, epochs: int = 100,
                     lr: float = 3e-3, test_snapshots: int = 2, seeds: Sequence[int] = (0,),
                     device: str | None = None, normalize_state: bool = True,
                     min_test_positives: int = MIN_TEST_POSITIVES) -> dict[str, Any]:
    """The dynamic (state-carrying) and the static encoder trained the same way on the same
    snapshots, interleaved per seed. Returns {"dynamic", "static": {"auc", "ap" (means over
    seeds), "runs"}, "auc_gain", "ap_gain", "models" (the last seed's dynamic model)}."""
    out: dict[str, Any] = {"dynamic": {"runs": []}, "static": {"runs": []}}
    last = None
    for seed in seeds:
        for name, carry in (("dynamic", True), ("static", False)):
            r = train_temporal(x, snapshots, enc, carry, epochs, lr, test_snapshots, seed, device, normalize_state,
                               min_test_positives)
            out[name]["runs"].append({"seed": seed, **r["test"], "train_loss": r["train_loss"],
                                      "seconds": r["seconds"]})
            log.info("%s seed %d: AUC %.4f AP %.4f (%.1f s)", name, seed, r["test"]["auc"], r["test"]["ap"],
                     r["seconds"])
            if carry:
                last = r
    for name in ("dynamic", "static"):
        runs = out[name]["runs"]
        for k in ("auc", "ap"):
            out[name][k] = sum(r[k] for r in runs) / len(runs)
    out["auc_gain"] = out["dynamic"]["auc"] - out["static"]["auc"]
    out["ap_gain"] = out["dynamic"]["ap"] - out["static"]["ap"]
    out["last_dynamic"] = last
    return out
