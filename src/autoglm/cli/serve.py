"""`autoglm serve RUN`: the OpenAI-compatible HTTP server on the inference engine.

Registered in `autoglm.cli` with `app.add_typer(...)` (no group name: `serve` sits at the
top level). The options are `recipes.serve.ServeConfig`'s (`--config FILE`,
`--print-config`, every field an option); this module only starts uvicorn.
"""

from __future__ import annotations

import typer

from ..recipes.serve import ServeConfig
from .common import err
from .options import add_recipe_command

__all__ = ["app"]

app = typer.Typer(add_completion=False)


def run_serve(cfg: ServeConfig) -> None:
    from ..inference.server import serve_app
    from ..recipes.serve import build_server

    server, served = build_server(cfg)
    err.print(f"serving [bold]{', '.join(served)}[/] on http://{cfg.host}:{cfg.port}/v1")
    # SIGTERM drains: in-flight requests get drain_timeout seconds to finish, new ones get 503
    serve_app(server, cfg.host, cfg.port, drain_timeout=cfg.drain_timeout)


add_recipe_command(app, "serve", ServeConfig, run_serve,
                   help="Serve a model over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /metrics).")
