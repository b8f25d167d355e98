"""`autoglm ops forecast | canary | scrape` (registered in cli/__init__.py).

`forecast` is the load-forecasting recipe (`autoglm.recipes.ops`): its options come from
`ForecastConfig`; `canary` is the promotion step (`CanaryConfig`). `scrape` polls a server's
`/metrics` into the JSON lines `forecast` and `canary` read (a plain command: a URL, an output
file, an interval and a count; after the first scrape a failed one is a warning and a gap).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from ..recipes.ops import CanaryConfig, ForecastConfig
from .common import console, err, fail
from .options import add_recipe_command

__all__ = ["app"]

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Operations: load forecasting and replica advice from the server's metrics.")


def _forecast(cfg: ForecastConfig) -> None:
    from rich.table import Table

    from ..recipes.ops import forecast_load

    out = forecast_load(cfg)
    for w in out["warnings"]:
        err.print(f"[yellow]warning:[/] {w}", soft_wrap=True, highlight=False)
    unit = out["load_unit"]
    t = Table("", "value", title=f"forecast of {out['series']} ({out['points']} points, step {out['step_s']:g} s)")
    t.add_row("model", out["model"])
    t.add_row("last load", f"{out['last_load']:.4g} {unit} at {out['to']}")
    if out["forecast"]:
        last = out["forecast"][-1]
        t.add_row(f"forecast +{cfg.horizon_minutes:g} min", f"{last['load']:.4g} {unit} at {last['time']}")
    q = out["quality"]
    if q is not None:
        names = {"model": "forecast", "naive_last": "last value", "naive_seasonal": "one season before"}
        t.add_row(f"MAPE at +{q['horizon_steps']} step(s), last {q['origins']} points",
                  ", ".join(f"{names[k]} {v:.3g}%" for k, v in q["mape_pct"].items()))
    t.add_row("capacity per replica", f"{out['capacity_per_replica']:.4g} {unit} ({out['capacity_source']})")
    predicted = "-" if out["replicas_predicted"] is None else out["replicas_predicted"]
    t.add_row("replicas: reactive / predicted", f"{out['replicas_reactive']} / {predicted}")
    rec = out["replicas_recommended"]
    now = out["current_replicas"]
    advice = "" if now is None else (" (scale up)" if rec > now else " (scale down)" if rec < now else " (hold)")
    t.add_row("recommended replicas", f"[bold]{rec}[/]{advice}; {out['mode']}")
    console.print(t)
    if cfg.out is not None:
        console.print(f"written to {cfg.out}")


add_recipe_command(app, "forecast", ForecastConfig, _forecast,
                   help="Forecast the load (Holt-Winters, season detected or given) and recommend replicas with "
                        "hysteresis from the per-replica capacity. Advice only: nothing is scaled.",
                   quiet_loggers=("autoglm.ops.forecast",))


def _canary(cfg: CanaryConfig) -> None:
    from ..recipes.ops import canary_step

    out = canary_step(cfg)
    for name in ("stable", "canary"):
        s = out[name]
        rate = "n/a" if s["error_rate"] != s["error_rate"] else f"{s['error_rate']:.2%}"  # NaN: no request
        p99 = "n/a" if s["p99_s"] != s["p99_s"] else f"{s['p99_s']:.3g} s"
        console.print(f"{name}: {s['requests']:.0f} requests, error rate {rate}, p99 {p99}", highlight=False)
    colour = {"promote": "green", "hold": "yellow", "rollback": "red"}[out["action"]]
    console.print(f"[bold {colour}]{out['action']}[/]: canary weight {out['canary_weight']}% (stable "
                  f"{out['stable_weight']}%): {out['reason']}", highlight=False)
    if cfg.weights_file is not None:
        console.print(f"weights written to {cfg.weights_file}; apply with kubectl apply -k deploy/k8s/overlays/canary")


add_recipe_command(app, "canary", CanaryConfig, _canary,
                   help="One canary step from both versions' /metrics scrapes: promote to the next weight, hold, or "
                        "roll back (error rate and latency p99 against the stable version).")


@app.command()
def scrape(url: str = typer.Argument(..., help="The server's metrics URL, e.g. http://127.0.0.1:8000/metrics."),
           out: Path = typer.Option(..., help="JSON lines file to append to ({\"time\", \"text\"} per scrape)."),
           interval: float = typer.Option(15.0, min=0.1, help="Seconds between scrapes."),
           count: int = typer.Option(1, min=1, help="Number of scrapes.")) -> None:
    """Append COUNT scrapes of URL to OUT (one JSON object per line), for `autoglm ops forecast`."""
    import urllib.parse
    import urllib.request

    from ..ops.series import MetricsError, _samples

    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        fail(ValueError(f"{url!r} is not an http(s) URL; give the server's metrics URL, e.g. "
                        "http://127.0.0.1:8000/metrics"))
    if not out.parent.is_dir():
        fail(FileNotFoundError(f"the folder of --out {out} does not exist; create it first"))
    written, missed = 0, 0
    for i in range(count):
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                text = r.read().decode("utf-8")
            _samples(text)  # refuse what is not Prometheus text (an HTML page, a JSON answer)
        except (OSError, UnicodeDecodeError, MetricsError) as e:
            if written == 0:  # nothing scraped yet: the URL is wrong, not the network
                fail(ValueError(f"could not scrape {url}: {e}"))
            # later: a transient failure is a gap in the series (interpolated when short, refused
            # when long by `ops forecast`), never a reason to lose the collection
            missed += 1
            err.print(f"[yellow]warning:[/] scrape {i + 1} of {count} failed ({e}); a gap, continuing",
                      soft_wrap=True, highlight=False)
        else:
            with out.open("a", encoding="utf-8") as f:  # one whole line per scrape
                f.write(json.dumps({"time": time.time(), "text": text}) + "\n")
            written += 1
        if i + 1 < count:
            time.sleep(interval)
    console.print(f"{written} scrape(s) appended to {out}" + (f" ({missed} failed: gaps)" if missed else ""))
