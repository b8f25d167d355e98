"""`autoglm ops forecast | canary | scrape` (registered in cli/__init__.py).

`forecast` is the load-forecasting recipe (`autoglm.recipes.ops`): its options come from
`ForecastConfig`; `canary` is the promotion step (`CanaryConfig`). `scrape` polls a server's `/metrics` into the JSON lines `forecast` reads
(a plain command: a URL, an output file, an interval and a count).
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
    last = out["forecast"][-1]
    t.add_row(f"forecast +{cfg.horizon_minutes:g} min", f"{last['load']:.4g} {unit} at {last['time']}")
    t.add_row("capacity per replica", f"{out['capacity_per_replica']:.4g} {unit} ({out['capacity_source']})")
    t.add_row("replicas: reactive / predicted", f"{out['replicas_reactive']} / {out['replicas_predicted']}")
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
        console.print(f"{name}: {s['requests']:.0f} requests, error rate {s['error_rate']:.2%}, p99 {s['p99_s']:.3g} s")
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
    import urllib.request

    with out.open("a", encoding="utf-8") as f:
        for i in range(count):
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    text = r.read().decode("utf-8")
            except OSError as e:
                fail(ValueError(f"could not scrape {url}: {e}"))
            f.write(json.dumps({"time": time.time(), "text": text}) + "\n")
            f.flush()
            if i + 1 < count:
                time.sleep(interval)
    console.print(f"{count} scrape(s) appended to {out}")
