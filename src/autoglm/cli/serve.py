"""`autoglm serve MODEL_DIR`: the OpenAI-compatible HTTP server on the inference engine.

Registered in `autoglm.cli` with `app.add_typer(...)` (no group name: `serve` sits at the
top level). The only place the server's options are read from argv.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.logging import RichHandler

from .common import err, fail

__all__ = ["app", "parse_lora_specs"]

app = typer.Typer(add_completion=False)


def parse_lora_specs(specs: list[str], base_name: str) -> list[tuple[str, Path]]:
    """`--lora NAME=DIR` values -> [(NAME, DIR)]; a malformed, duplicate or base-shadowing name is an error."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--lora {spec!r}: expected NAME=ADAPTER_DIR, e.g. --lora sql=runs/a-lora")
        if name == base_name:
            raise ValueError(f"--lora {spec!r}: {name!r} is the base model's served name; pick another adapter name")
        if any(name == n for n, _ in out):
            raise ValueError(f"--lora {spec!r}: the name {name!r} is given twice; each adapter needs its own name")
        out.append((name, Path(path)))
    return out


@app.command()
def serve(
    model_dir: Path = typer.Argument(..., help="A saved model directory (config.json, model.safetensors, tokenizer)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, help="Require 'Authorization: Bearer KEY' on /v1 routes."),
    served_model_name: Optional[str] = typer.Option(None, help="Name clients pass as `model` (default: dir name)."),
    block_size: int = typer.Option(16, min=1, help="Tokens per KV block."),
    num_blocks: int = typer.Option(2048, min=1, help="KV blocks in the pool."),
    max_num_seqs: int = typer.Option(64, min=1, help="Requests running at once."),
    max_num_batched_tokens: int = typer.Option(512, min=1, help="Tokens per engine step."),
    max_concurrent: int = typer.Option(256, min=1, help="Requests in flight before 429."),
    early_exit_threshold: float = typer.Option(1.0, help="Exit decoding at a layer when the top probability "
                                                         "reaches this; 1.0 = never."),
    lora: list[str] = typer.Option([], "--lora", help="NAME=ADAPTER_DIR: serve a PEFT LoRA adapter (from "
                                                      "`autoglm finetune --lora`) unmerged as model NAME; repeatable."),
    allow_lora_updates: bool = typer.Option(False, "--allow-lora-updates",
                                            help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                                                 "(adapters loaded from a path on this machine, without a restart)."),
) -> None:
    """Serve a model over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /metrics)."""
    import uvicorn

    from ..rundir import RunDir
    from ..inference import EngineConfig, LLMEngine
    from ..inference.async_engine import AsyncEngine
    from ..inference.server import create_app

    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    name = served_model_name or model_dir.resolve().name
    try:
        adapters = parse_lora_specs(lora, name)
        model, tok = RunDir.open(model_dir).load()
        cfg = EngineConfig(block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, early_exit_threshold=early_exit_threshold)
        engine = LLMEngine(model, tok, cfg)
        for lora_name, path in adapters:
            engine.add_lora(lora_name, path)
        app_ = create_app(AsyncEngine(engine), model_name=name, api_key=api_key, max_concurrent=max_concurrent,
                          allow_lora_updates=allow_lora_updates)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    served = ", ".join([name, *(n for n, _ in adapters)])
    err.print(f"serving [bold]{served}[/] on http://{host}:{port}/v1")
    uvicorn.run(app_, host=host, port=port, log_level="info")
