"""Load series from metrics: Prometheus range-query exports and the server's own `/metrics`
scraped over time, put on a regular time grid without inventing load.

Two inputs:

- the JSON Prometheus answers to `/api/v1/query_range` (`{"status": "success", "data":
  {"resultType": "matrix", "result": [{"metric": {...}, "values": [[t, "v"], ...]}]}}`),
  e.g. `sum(rate(autoglm_generation_tokens_total[1m]))` at `step=60`;
- scrapes of `autoglm serve`'s `/metrics`, one JSON object per line:
  `{"time": <unix seconds>, "text": "<Prometheus text exposition>"}` (`autoglm ops scrape`
  writes them); counters become per-second rates between consecutive scrapes (a counter
  that went down is a restart: the rate of that interval is taken from zero).

`regular_grid` puts a series on its step grid. A gap is never read as zero load: a missing
point or a `NaN` is interpolated from its neighbours when the gap is at most `max_gap`
steps (with a warning that names the gap), and a longer gap is an error naming where it is.

Example (a two-point gap of a 60 s series, filled and reported):
    >>> s = Series("rate", [0, 60, 120, 300, 360], [1.0, 2.0, 3.0, 6.0, 7.0])
    >>> g, warnings = regular_grid(s, max_gap=3)
    >>> g.values.tolist(), warnings[0].split(";")[0]
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 'rate: 2 missing point(s) in 1 gap(s), the longest 2 step(s) from 1970-01-01T00:03:00Z')
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Series", "MetricsError", "read_prometheus_range", "parse_prometheus_range", "read_scrapes",
           "scrape_rates", "regular_grid", "select", "select_warnings", "iso"]


class MetricsError(ValueError):
    """A metrics file or series that cannot be used as given; the message says what and how to fix it."""


@dataclass
class Series:
    """One time series: `times` in unix seconds (ascending), `values` (NaN = missing)."""

    name: str
    times: Any
    values: Any
    labels: dict[str, str] = field(default_factory=dict)
    partial: list[str] = field(default_factory=list)  # a sum's series that did not span its range (select)

    def __post_init__(self) -> None:
        self.times = np.asarray(self.times, dtype=np.float64)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.times.shape != self.values.shape or self.times.ndim != 1:
            raise MetricsError(f"{self.name}: times and values must be 1-d of one length, got "
                               f"{self.times.shape} and {self.values.shape}")

    @property
    def step(self) -> float:
        """The sampling interval: the median spacing of the timestamps (seconds)."""
        if len(self.times) < 2:
            raise MetricsError(f"{self.name}: {len(self.times)} point(s); a series needs at least 2 to have a step")
        return float(np.median(np.diff(self.times)))


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(metric: dict[str, str]) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(metric.items()) if k != "__name__")
    return metric.get("__name__", "") + (f"{{{labels}}}" if labels else "") or "{}"


def parse_prometheus_range(doc: Any, where: str = "export") -> list[Series]:
    """The series of a `/api/v1/query_range` answer (already parsed JSON)."""
    if not isinstance(doc, dict):
        raise MetricsError(f"{where}: expected the JSON object Prometheus returns for /api/v1/query_range, got "
                           f"{type(doc).__name__}")
    if doc.get("status") != "success":
        raise MetricsError(f"{where}: status is {doc.get('status')!r} ({doc.get('error', 'no error message')}); "
                           "export a successful query")
    data = doc.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "matrix":
        got = data.get("resultType") if isinstance(data, dict) else data
        raise MetricsError(f"{where}: data.resultType is {got!r}, expected 'matrix' (a range query: "
                           "/api/v1/query_range, not /api/v1/query)")
    result = data.get("result")
    if not isinstance(result, list) or not result:
        raise MetricsError(f"{where}: data.result holds no series; check the query and the time range")
    out = []
    for i, item in enumerate(result):
        if not isinstance(item, dict) or not isinstance(item.get("values"), list):
            raise MetricsError(f"{where}: data.result[{i}] has no 'values' list of [time, \"value\"] pairs")
        metric = item.get("metric") or {}
        times, values = [], []
        for j, pair in enumerate(item["values"]):
            try:
                t, v = pair
                times.append(float(t))
                values.append(float(v))  # Prometheus writes "NaN", "+Inf" as strings; float() reads them
            except (TypeError, ValueError):
                raise MetricsError(f"{where}: data.result[{i}].values[{j}] = {pair!r} is not a [unix time, "
                                   "\"number\"] pair") from None
        if any(b <= a for a, b in zip(times, times[1:])):
            raise MetricsError(f"{where}: data.result[{i}] timestamps are not strictly increasing")
        values = [v if math.isfinite(v) else math.nan for v in values]
        out.append(Series(_name(metric), times, values, dict(metric)))
    return out


def read_prometheus_range(path: str | Path) -> list[Series]:
    """`parse_prometheus_range` of a file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MetricsError(f"{path}: not valid JSON ({e}); export the body of /api/v1/query_range") from None
    return parse_prometheus_range(doc, str(path))


def read_scrapes(path: str | Path) -> list[tuple[float, str]]:
    """[(unix time, exposition text)] from a JSON-lines file of `{"time", "text"}` objects."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            out.append((float(obj["time"]), str(obj["text"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise MetricsError(f"{path}:{n}: expected a JSON object with 'time' (unix seconds) and 'text' (the "
                               "/metrics body), as `autoglm ops scrape` writes") from None
    if any(b[0] <= a[0] for a, b in zip(out, out[1:])):
        raise MetricsError(f"{path}: scrape times are not strictly increasing")
    return out


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except ValueError as e:
        raise MetricsError(f"a scrape is not Prometheus text exposition ({e})") from None
    return out


def scrape_rates(scrapes: list[tuple[float, str]], counter: str, **labels: str) -> Series:
    """The per-second rate of a counter (summed over the samples named `counter` whose labels
    include `labels`) between consecutive scrapes; the time of each rate is the later scrape's.

    A counter that decreased was reset (a restart): that interval's increase is the new value."""
    if len(scrapes) < 2:
        raise MetricsError(f"{len(scrapes)} scrape(s); a rate needs at least 2")
    totals = []
    for t, text in scrapes:
        samples = _samples(text)
        hits = [v for (name, lab), v in samples.items()
                if name == counter and all(dict(lab).get(k) == v2 for k, v2 in labels.items())]
        totals.append(sum(hits) if hits else math.nan)
    times = np.array([t for t, _ in scrapes])
    totals = np.array(totals)
    if np.isnan(totals).all():
        raise MetricsError(f"no sample named {counter!r}" + (f" with labels {labels}" if labels else "") +
                           " in any scrape; check the metric name (see the server's /metrics)")
    inc = np.diff(totals)
    inc = np.where(inc < 0, totals[1:], inc)  # reset: counted from zero
    return Series(counter, times[1:], inc / np.diff(times), dict(labels))


def select(series: list[Series], match: dict[str, str]) -> Series:
    """The series whose labels include `match`, summed point by point when several remain,
    as PromQL's `sum` adds the series that exist at each time: a series counts only within
    its own span (its first to its last timestamp; a pod created or removed during the range
    is absent, not missing, outside it), and a point missing (or NaN) inside a series' span
    is missing in the sum (a gap, never zero). `select_warnings` says which series were partial."""
    hits = [s for s in series if all(s.labels.get(k) == v for k, v in match.items())]
    if not hits:
        have = "; ".join(s.name for s in series[:5])
        raise MetricsError(f"no series has the labels {match}; the export has: {have}")
    if len(hits) == 1:
        return hits[0]
    times = np.unique(np.concatenate([s.times for s in hits]))
    total = np.zeros(len(times))
    partial = []
    for s in hits:
        v = np.zeros(len(times))
        inside = (times >= s.times[0]) & (times <= s.times[-1])
        v[inside] = np.nan  # inside its span: a point it lacks is missing
        v[np.searchsorted(times, s.times)] = s.values
        total += v  # NaN propagates: a missing point stays missing
        if not inside.all():
            partial.append(s.name)
    return Series(f"sum of {len(hits)} series", times, total, dict(match), partial)


def select_warnings(s: Series) -> list[str]:
    """The warning for a sum whose series did not all span the range (see `select`)."""
    partial = s.partial
    if not partial:
        return []
    names = "; ".join(partial[:3]) + (f" and {len(partial) - 3} more" if len(partial) > 3 else "")
    return [f"{s.name}: {len(partial)} series start after or end before the range ({names}); outside its own span a "
            "series is counted as absent (0), as PromQL's sum does: pods created or removed. Export "
            "sum(rate(...)) instead if a target was down rather than gone"]


def regular_grid(s: Series, step: float | None = None, max_gap: int = 5) -> tuple[Series, list[str]]:
    """`s` on the grid t0 + k * step (step: the series' own by default), and the warnings. A
    step of 1.5x the series' own or more averages the points within each step (downsampling).

    Points missing from the grid and NaN values are gaps. A gap of at most `max_gap` steps is
    linearly interpolated (and reported); a longer one is a MetricsError naming its span.
    Missing points at the start are dropped (less history), and so are those at the end, with
    a warning: the series keeps its last known state rather than reading the silence as zero."""
    step = s.step if step is None else float(step)
    if not step > 0:
        raise MetricsError(f"{s.name}: step must be > 0 seconds, got {step}")
    own = s.step
    if step >= 1.5 * own:  # a coarser grid: each cell is the mean of the known points in it
        k = np.floor((s.times - s.times[0]) / step + 1e-9).astype(np.int64)
        known = ~np.isnan(s.values)
        sums = np.bincount(k[known], weights=s.values[known], minlength=int(k[-1]) + 1)
        counts = np.bincount(k[known], minlength=int(k[-1]) + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    else:
        k = np.rint((s.times - s.times[0]) / step).astype(np.int64)
        if len(np.unique(k)) != len(k):
            raise MetricsError(f"{s.name}: several points fall on one {step:g} s grid step (the series' own step "
                               f"is {own:g} s); use its own step, or at least 1.5x it to average within each step")
        v = np.full(int(k[-1]) + 1, np.nan)
        v[k] = s.values
    times = s.times[0] + step * np.arange(len(v))
    warnings: list[str] = []
    known = np.flatnonzero(~np.isnan(v))
    if not len(known):
        raise MetricsError(f"{s.name}: every value is missing (NaN); export a series with data")
    first, last = int(known[0]), int(known[-1])
    if first > 0:  # less history, nothing invented
        warnings.append(f"{s.name}: the first {first} point(s) are missing (until {iso(times[first])}); the "
                        "history starts at the first known point")
    if last < len(v) - 1:  # the metric stopped: keep the last known state, do not read the silence as 0
        warnings.append(f"{s.name}: the last {len(v) - 1 - last} point(s) are missing (from "
                        f"{iso(times[last + 1])}); the forecast starts from the last known point at "
                        f"{iso(times[last])} (its last known state), not from zero load: check the scrape")
    v, times = v[first:last + 1], times[first:last + 1]
    missing = np.isnan(v)
    if missing.any():
        runs = _runs(missing)
        longest = max(runs, key=lambda r: r[1] - r[0])
        n_long = longest[1] - longest[0]
        where = iso(times[longest[0]])
        if n_long > max_gap:
            raise MetricsError(f"{s.name}: a gap of {n_long} steps ({n_long * step / 60:g} min) from {where}; "
                               f"gaps are not zero load and at most {max_gap} step(s) are interpolated: raise "
                               "max_gap or export a range without the gap")
        idx = np.arange(len(v))
        v[missing] = np.interp(idx[missing], idx[~missing], v[~missing])
        warnings.append(f"{s.name}: {int(missing.sum())} missing point(s) in {len(runs)} gap(s), the longest "
                        f"{n_long} step(s) from {where}; interpolated from the neighbouring points (not zero)")
    return Series(s.name, times, v, s.labels), warnings


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges where mask is True."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))
