"""Recipe search on a graph's own validation nodes: a small fixed space, early stopping, a
time budget, then the test accuracy of the validation-best setting.

    1. search   trial 0 is the base config (the default or the user's file), then settings
                from `SPACE` (objective weights, mask rates, width, epochs, view strengths,
                learning rate, weight decay) in a seeded order: `strategy` "random" draws
                every dimension at once, "local" first tries the base's neighbours (one
                dimension changed, all of them, in seeded order), which is where a good base
                is improved, then random draws.
                Each pre-trains once and is probed on the validation nodes every `eval_every`
                epochs; a trial stops after `patience` probes without a better validation
                score, or at the budget's end. The score is the validation accuracy, ties
                broken by the probe's lowest validation cross-entropy (on 500 nodes the best
                accuracy moves in 0.2-point steps and different settings often tie exactly);
                a trial's score is its best one and its epochs are where that was reached.
                With `halving` = eta > 1 the search is successive halving over `rungs` rungs:
                rung r trains every setting still in the race on a schedule of 1 / eta^(R-1-r)
                of its epochs (a whole, shorter cosine schedule, not a cut-off long one), and
                the best 1 / eta of them (by validation accuracy; the base always) go on to the
                next rung; each rung may use its share of the search time. Many settings are
                tried briefly, few at full length, in the same budget.
    2. confirm  the `confirm_top` best settings (at the epochs where they peaked) and the base
                as configured are re-trained from scratch on the same `confirm_seeds` fresh
                seeds; the highest mean validation accuracy wins, ties broken by the mean
                validation cross-entropy, and the base is kept on a full tie (the search score
                alone favours lucky single runs). With two or more seeds the winner must also
                beat the base by more than one standard error of their per-seed differences
                (the one-standard-error rule), or the base is kept: on 500 validation nodes a
                0.2-0.3 point lead over three seeds is within seed noise, and such picks did
                not hold on the test nodes. The search gets four fifths of `minutes`, the
                confirm stage the rest: a setting is confirmed only if its re-training
                (timed by its search trial) ends within the budget, the base first; when
                the base's does not fit, nothing is confirmed and the base is kept.
    3. report   the base and the chosen config are pre-trained and probed on `report_seeds`
                seeds each; only here is the test split read.

The test nodes never take part in 1 and 2: the trials' probes get the validation mask in place
of the test mask. Every trial is appended to the output as it ends, so an interrupted search
keeps what it measured.

Example:
    >>> from autoglm.graph.datasets import sbm_graph
    >>> from autoglm.settings import load_config
    >>> base = load_config(GraphSSLConfig, overrides={"encoder.hidden_dim": 16, "optim.epochs": 4})
    >>> res = tune_graph(sbm_graph(120, 3, 16), base, TuneBudget(minutes=1, max_trials=2, eval_every=2,
    ...                  confirm_top=1, report_seeds=1, space={"loss.edge_weight": (0.0, 1.0)}),
    ...                  probe_kw={"weight_decays": (1e-3,), "standardize": (False,)})
    >>> len(res["trials"]), sorted(res["report"])
    (2, ['base', 'tuned'])
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from ..settings import ConfigError, from_dict, to_dict
from .config import GraphSSLConfig
from .experiment import ProbeCurve, pretrain, probe_model, ssl_probe, with_seed

__all__ = ["SPACE", "TuneBudget", "candidates", "tune_graph", "check_validation_split", "EarlyStopping", "score"]

log = logging.getLogger(__name__)

# The fixed search space: dotted path inside GraphSSLConfig -> the values tried.
SPACE: dict[str, tuple[Any, ...]] = {
    "loss.contrastive_weight": (0.0, 0.1, 0.3),
    "loss.reconstruction_weight": (0.0, 1.0),
    "loss.decorrelation_weight": (0.0, 1.0),
    "loss.edge_weight": (0.0, 1.0, 10.0),  # the CCA term is a sum over D dimensions, the edge BCE ~1.4
    "loss.mask_rate": (0.5, 0.75),
    "loss.edge_mask_rate": (0.15, 0.3, 0.5),
    "encoder.hidden_dim": (256, 512),
    "optim.epochs": (50, 100, 150),
    "views.aug_p": ((0.3, 0.3), (0.4, 0.4), (0.5, 0.5)),
    "views.feature_p": ((0.1, 0.1), (0.2, 0.2), (0.3, 0.3)),
    "optim.lr": (5e-4, 1e-3, 2e-3),
    "optim.weight_decay": (0.0, 1e-4),  # GraphMAE's Cora recipe uses 2e-4, CCA-SSG's 0
}


STRATEGIES = ("random", "local")


@dataclass
class TuneBudget:
    """How long and how widely to search (see the module docstring for the stages)."""
    minutes: float = 20.0
    max_trials: int = 24
    eval_every: int = 10
    patience: int = 3
    search_seed: int = 0
    confirm_top: int = 2
    confirm_seeds: int = 1
    report_seeds: int = 3
    halving: int = 1  # successive halving's eta (1 = off: every trial trains its full schedule)
    rungs: int = 3
    strategy: str = "random"  # "random" draws, or "local": the base's one-dimension neighbours first
    space: Mapping[str, tuple[Any, ...]] = field(default_factory=lambda: dict(SPACE))

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError(f"minutes ({self.minutes}) must be > 0")
        for name in ("max_trials", "eval_every", "patience", "halving", "rungs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 1")
        for name in ("confirm_top", "confirm_seeds", "report_seeds", "search_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be >= 0")
        bad = [k for k, v in self.space.items() if not v]
        if bad:
            raise ValueError(f"space entries {bad} list no values")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")


def check_validation_split(data: Any, what: str = "the graph") -> None:
    """ValueError unless `data` has labels and non-empty train and validation masks."""
    missing = [k for k in ("y", "train_mask", "val_mask") if getattr(data, k, None) is None]
    if missing:
        raise ValueError(f"{what} has no {', '.join(missing)}: the tuner selects settings on validation nodes "
                         f"only, so it needs labelled nodes with train/val masks. The sources that carry them are "
                         f"'sbm' (the generated graph) and Cora / CiteSeer / PubMed (--data Cora --root DIR, the "
                         f"public Planetoid split); a folder written by `autoglm graph clean` has no labels, so "
                         f"pre-train on it (`autoglm graph pretrain --data DIR`) and tune on one of those")
    for k in ("train_mask", "val_mask"):
        if not bool(getattr(data, k).any()):
            raise ValueError(f"{what}'s {k} selects no node; the tuner needs labelled train and validation nodes")


def _apply(base: GraphSSLConfig, overrides: Mapping[str, Any]) -> GraphSSLConfig:
    """base with dotted `overrides`, validated by the config's own checks (ValueError)."""
    d = to_dict(base)
    for path, value in overrides.items():
        sec, name = path.split(".")
        d[sec][name] = list(value) if isinstance(value, tuple) else value
    try:
        return from_dict(GraphSSLConfig, d)
    except ConfigError as e:
        raise ValueError(str(e)) from None


def _setting_key(base: GraphSSLConfig, overrides: Mapping[str, Any]) -> str:
    """What makes two settings the same: the resolved config's `effective_dict` (ValueError if
    invalid), so settings that differ only in a switched-off term are not tried twice."""
    return repr(_apply(base, overrides).effective_dict())


def candidates(base: GraphSSLConfig, space: Mapping[str, tuple[Any, ...]], n: int,
               seed: int = 0, strategy: str = "random") -> list[dict[str, Any]]:
    """Up to `n` distinct override sets: {} (the base) first; with `strategy` "local" then every
    one-dimension change of the base within `space` (seeded order); then seeded random draws
    from the grid (each value uniform per dimension). Invalid combinations, such as every loss
    weight 0, and settings equal to one already listed (`_setting_key`) are skipped."""
    keys = sorted(space)
    grid_size = 1
    for k in keys:
        grid_size *= len(space[k])
    rng = random.Random(seed)
    out: list[dict[str, Any]] = [{}]
    seen = {_setting_key(base, {})}

    def proposals():
        if strategy == "local":
            moves = [{k: v} for k in keys for v in space[k]]
            rng.shuffle(moves)
            yield from moves
        for _ in range(50 * n):
            yield {k: rng.choice(space[k]) for k in keys}

    for over in proposals():
        if len(out) >= n or len(seen) > grid_size:
            break
        try:
            key = _setting_key(base, over)
        except ValueError:
            continue
        if key not in seen:
            seen.add(key)
            out.append(over)
    return out


def score(row: Mapping[str, Any]) -> tuple[float, float]:
    """A trial's validation score, higher is better: (accuracy, minus the probe's lowest
    cross-entropy), compared in that order."""
    return row["val_acc"], -row.get("val_loss", float("inf"))


def _finalists(base: GraphSSLConfig, rows: list[dict[str, Any]], n: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The n best trials by validation score, each with its overrides at the epochs where it
    peaked, skipping one whose resulting setting equals a better one's (two schedules that
    peaked at the same epoch: 150 epochs peaking at 60 and the base at 60 are one setting)."""
    out, seen = [], set()
    for r in sorted(rows, key=score, reverse=True):
        over = {**r["overrides"], "optim.epochs": r["best_epoch"]}
        key = _setting_key(base, over)
        if key not in seen:
            seen.add(key)
            out.append((r, over))
        if len(out) == n:
            break
    return out


def _select(confirm: list[dict[str, Any]]) -> dict[str, Any]:
    """The confirm row with the best score; on a full tie the base (the row marked `base`, else
    trial 0: a tie is no evidence to move away from it), then the earlier trial. When the rows
    hold per-seed accuracies (`val_accs`, the same seeds for every row) of two or more seeds,
    the best replaces the base only if its mean lead over the base exceeds the standard error
    of the per-seed differences."""
    is_base = lambda r: r.get("base", r["trial"] == 0)  # noqa: E731
    best = max(confirm, key=lambda r: (score(r), is_base(r), -r["trial"]))
    base = next((r for r in confirm if is_base(r)), None)
    if base is None or best is base or len(best.get("val_accs", ())) < 2 \
            or len(best["val_accs"]) != len(base.get("val_accs", ())):
        return best
    diffs = [a - b for a, b in zip(best["val_accs"], base["val_accs"])]
    return best if statistics.mean(diffs) > statistics.stdev(diffs) / math.sqrt(len(diffs)) else base


class EarlyStopping(ProbeCurve):
    """Trainer callback: probe the validation nodes every `every` steps (`ProbeCurve`, on data
    whose test mask is the validation mask), keep the best (val_acc, val_loss, epoch) by `score`,
    and stop training after `patience` probes without improvement or when `time.monotonic()`
    passes `deadline`."""

    def __init__(self, data: Any, every: int, seed: int, probe_kw: dict[str, Any], patience: int,
                 deadline: float) -> None:
        super().__init__(data, every, seed, probe_kw)
        self.patience, self.deadline = patience, deadline
        self.best = {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}
        self.since, self.reason = 0, "finished"

    def on_step(self, trainer: Any, row: dict[str, float]) -> None:
        before = len(self.points)
        super().on_step(trainer, row)
        if len(self.points) == before:
            return
        p = self.points[-1]
        if score(p) > score(self.best):
            self.best, self.since = {**p, "epoch": int(p["epoch"])}, 0
        else:
            self.since += 1
        if self.since >= self.patience:
            trainer.should_stop, self.reason = True, "patience"
        elif time.monotonic() > self.deadline:
            trainer.should_stop, self.reason = True, "budget"


def _val_only(data: Any) -> Any:
    """The graph with the validation mask standing in for the test mask: a probe on it cannot
    read a test label."""
    return SimpleNamespace(x=data.x, edge_index=data.edge_index, y=data.y, train_mask=data.train_mask,
                           val_mask=data.val_mask, test_mask=data.val_mask)


def _steps_per_epoch(cfg: GraphSSLConfig, num_nodes: int) -> int:
    return -(-num_nodes // cfg.optim.batch_size) if cfg.optim.sampled else 1


def _epoch_seconds(row: Mapping[str, Any]) -> float:
    """Seconds per epoch of a search trial (its probes included), from its time and last probe."""
    epochs = max((e for e, _ in row["curve"]), default=0) or row["max_epochs"]
    return row["seconds"] / max(1, epochs)


def _trial(data: Any, val_data: Any, cfg: GraphSSLConfig, i: int, over: Mapping[str, Any], rung: int,
           budget: TuneBudget, probe_kw: dict[str, Any], per_epoch: int, deadline: float,
           device: str | None) -> dict[str, Any]:
    """Pre-train `cfg` with validation probes and early stopping; the search row of trial `i`."""
    stop = EarlyStopping(val_data, budget.eval_every * per_epoch, cfg.optim.seed, probe_kw, budget.patience,
                         deadline)
    t = time.perf_counter()
    pretrain(data.x, data.edge_index, cfg, device=device, callbacks=[stop], log_every=budget.eval_every * per_epoch)
    epochs = max(1, round(stop.best["epoch"] / per_epoch))
    row = {"stage": "search", "trial": i, "rung": rung, "overrides": dict(over), "val_acc": 100 * stop.best["val_acc"],
           "val_loss": round(stop.best["val_loss"], 5), "best_epoch": epochs, "max_epochs": cfg.optim.epochs,
           "stopped": stop.reason,
           "seconds": round(time.perf_counter() - t, 1),
           "curve": [(int(p["epoch"]) // per_epoch, round(100 * p["val_acc"], 2)) for p in stop.points]}
    log.info("trial %d (rung %d, %d epochs): val %.2f%% (loss %.4f) at epoch %d (%s, %.0f s) %s", i, rung,
             cfg.optim.epochs, row["val_acc"], row["val_loss"], epochs, stop.reason, row["seconds"], over)
    return row


def tune_graph(data: Any, base: GraphSSLConfig, budget: TuneBudget, probe_kw: Mapping[str, Any] | None = None,
               device: str | None = None, on_trial: Callable[[dict[str, Any]], None] | None = None
               ) -> dict[str, Any]:
    """Search, confirm and report (module docstring). `data`: PyG-like with x, edge_index, y,
    train/val/test masks. `on_trial(row)` sees every search and confirm row as it ends (the
    recipe writes them to disk). Returns {"trials", "confirm", "selected" (overrides incl. the
    chosen epochs), "tuned_config", "base_config", "search_seconds", "stopped_by", "report"
    ({"base", "tuned"}: `ssl_probe` results on report_seeds seeds; {} when report_seeds is 0)}."""
    check_validation_split(data)
    probe_kw = dict(probe_kw or {})
    start = time.monotonic()
    # the search gets the budget less a fifth kept for the confirm stage (when there is one)
    confirming = budget.confirm_top > 0 and budget.confirm_seeds > 0
    search_end = start + 60 * budget.minutes * (0.8 if confirming else 1.0)
    val_data = _val_only(data)
    per_epoch = _steps_per_epoch(base, data.x.shape[0])
    R = budget.rungs if budget.halving > 1 else 1
    trials: list[dict[str, Any]] = []
    stopped_by = "max_trials"
    pool = list(enumerate(candidates(base, budget.space, budget.max_trials, budget.search_seed, budget.strategy)))
    for rung in range(R):
        # each rung may run until its share of the search time is spent
        deadline = start + (search_end - start) * (rung + 1) / R
        share = budget.halving ** -(R - 1 - rung)
        rows: list[dict[str, Any]] = []
        for i, over in pool:
            if (rung or i) and time.monotonic() > deadline:  # the base's first trial always runs
                stopped_by = "budget"
                break
            cfg = _apply(base, over)
            if share < 1:  # a whole schedule of `share` of the setting's epochs, at least one probe's worth
                epochs = max(budget.eval_every, round(cfg.optim.epochs * share))
                cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, epochs=epochs))
            rows.append(_trial(data, val_data, with_seed(cfg, base.optim.seed), i, over, rung, budget, probe_kw,
                               per_epoch, deadline, device))
            if on_trial:
                on_trial(rows[-1])
        trials += rows
        if rung == R - 1 or not rows:
            break
        keep = {r["trial"] for r in sorted(rows, key=score, reverse=True)[:-(-len(rows) // budget.halving)]}
        pool = [(i, over) for i, over in pool if i in keep or i == 0]  # the base always goes on
    search_seconds = time.monotonic() - start
    last = max(r["rung"] for r in trials)  # settings compared at the longest schedule any reached

    # confirm: the best distinct settings, re-trained with their chosen epochs on fresh seeds
    final = [r for r in trials if r["rung"] == last]
    ranked = _finalists(base, final, max(1, budget.confirm_top))
    # the base as configured (its own epochs, not where one search run peaked) is confirmed too:
    # the others must beat it
    base_key = _setting_key(base, {})
    base_pair = next((p for p in ranked if _setting_key(base, p[1]) == base_key), (trials[0], {}))
    order = [base_pair] + [p for p in ranked if p is not base_pair]  # the base first
    confirm: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []  # {"trial", "overrides"} of settings the budget left unconfirmed
    if confirming:
        # a setting whose re-training, timed by its search trial, would end past the budget is
        # skipped (when the base is, all are: a finalist must beat the base to be chosen)
        end = start + 60 * budget.minutes
        for i, (r, over) in enumerate(order):
            cfg = _apply(base, over)
            cost = _epoch_seconds(r) * cfg.optim.epochs * budget.confirm_seeds
            if time.monotonic() + cost > end:
                gone = order if i == 0 else [(r, over)]
                skipped += [{"trial": g["trial"], "overrides": o} for g, o in gone]
                log.info("confirm: %s skipped: %d epochs x %d seeds (about %.0f s) would end past the %.4g-minute "
                         "budget%s", "every setting" if i == 0 else f"trial {r['trial']}", cfg.optim.epochs,
                         budget.confirm_seeds, cost, budget.minutes, "; the base is kept" if i == 0 else "")
                if i == 0:
                    break
                continue
            vals, losses = [], []
            for k in range(budget.confirm_seeds):
                seed = base.optim.seed + 1000 + k
                model, _ = pretrain(data.x, data.edge_index, with_seed(cfg, seed), device=device)
                res = probe_model(model, val_data, seed, **probe_kw)
                vals.append(100 * res["val_acc"])
                losses.append(res["val_loss"])
            row = {"stage": "confirm", "trial": r["trial"], "overrides": over, "val_accs": vals,
                   "val_acc": sum(vals) / len(vals), "val_loss": round(sum(losses) / len(losses), 5),
                   "base": i == 0}
            confirm.append(row)
            log.info("confirm trial %d (%d epochs%s): val %.2f%% (loss %.4f)", r["trial"], cfg.optim.epochs,
                     ", the base as configured" if row["base"] else "", row["val_acc"], row["val_loss"])
            if on_trial:
                on_trial(row)
        best = _select(confirm) if confirm else {"trial": base_pair[0]["trial"], "overrides": {}}
    else:
        best = {"trial": ranked[0][0]["trial"], "overrides": ranked[0][1]}
    tuned = _apply(base, best["overrides"])
    out: dict[str, Any] = {"trials": trials, "confirm": confirm, "selected": {"trial": best["trial"],
                                                                             "overrides": best["overrides"]},
                           "tuned_config": tuned.to_dict(), "base_config": base.to_dict(),
                           "search_seconds": round(search_seconds, 1), "confirm_skipped": skipped,
                           "tune_seconds": round(time.monotonic() - start, 1), "stopped_by": stopped_by,
                           "budget_minutes": budget.minutes, "report": {}}
    if budget.report_seeds:
        seeds = list(range(base.optim.seed, base.optim.seed + budget.report_seeds))
        kw = {"probe_weight_decays": probe_kw.get("weight_decays", (1e-4, 1e-3, 1e-2, 5e-2)),
              "probe_standardize": probe_kw.get("standardize", (False, True))}
        out["report"] = {name: ssl_probe(data, cfg, seeds=seeds, device=device, **kw)
                         for name, cfg in (("base", base), ("tuned", tuned))}
    return out
