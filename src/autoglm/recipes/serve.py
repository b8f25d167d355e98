"""The serving recipe: a saved model behind the OpenAI-compatible HTTP server.

`autoglm serve RUN [--config configs/serve.yaml]` is this recipe: open the run directory
(`RunDir.open(run).load()`), build the engine from the `engine` section, load the
`--lora NAME=DIR` adapters, and serve `autoglm.inference.server.create_app` with uvicorn.

Early exit: `engine.exit_layers` (`--exit-layers`) are the layers after which an exit may be
tried; left at none, they are the run's trained exit layers when its run.json records them
(`"early_exit": {"layers": [...]}`), else every layer. Exits only happen with
`--early-exit-threshold` below 1.0.

Self-speculative decoding: `engine.speculative_layer` left at none is the run's first trained
exit layer when run.json records exits (and early exit is off), so a request may ask for
`speculative_tokens` (an extra body field) or `--speculative-tokens` sets a default for all;
a run without trained exits refuses `--speculative-tokens` at start.

Example:
    >>> from autoglm.settings import load_config
    >>> cfg = load_config(ServeConfig, overrides={"run": "runs/a", "lora": "sql=runs/a-sql",
    ...                                           "engine.exit_layers": "2,4"})
    >>> cfg.engine.num_blocks, cfg.engine.exit_layers, cfg.lora, cfg.port
    (2048, (2, 4), ['sql=runs/a-sql'], 8000)
    >>> parse_lora_specs(["sql=runs/a-sql"], "base")
    [('sql', PosixPath('runs/a-sql'))]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..inference.engine_core import EngineConfig
from ..settings import section, setting

__all__ = ["ServeConfig", "build_server", "parse_lora_specs", "trained_exit_layers"]

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    run: Path | None = setting(None, "a saved model directory (config.json, model.safetensors, tokenizer)",
                               argument=True, required=True)
    host: str = setting("127.0.0.1", "interface to bind; 0.0.0.0 exposes the server to the network")
    port: int = setting(8000, "TCP port to listen on")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on /v1 routes; none = open")
    served_model_name: str | None = setting(None, "name clients pass as `model`; none = the run directory's name")
    max_concurrent: int = setting(256, "requests in flight before the server answers 429")
    max_prompts: int = setting(64, "prompts one completions request may batch (a list of texts or token-id lists, "
                                   "as lm-evaluation-harness sends); a larger batch is a 400")
    lora: list[str] = setting([], "NAME=ADAPTER_DIR: serve a PEFT LoRA adapter (from `autoglm finetune --lora`) "
                                  "unmerged as model NAME; repeatable")
    allow_lora_updates: bool = setting(False, "enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                                              "(adapters loaded from a path on this machine, without a restart)")
    drain_timeout: float = setting(30.0, "on SIGTERM, seconds the requests in flight get to finish (new ones get "
                                         "503) before the server exits; the pod's terminationGracePeriodSeconds "
                                         "must cover the preStop pause plus this")
    engine: EngineConfig = section(EngineConfig, "the inference engine", num_blocks=2048)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts}")
        if not 0 <= self.drain_timeout < float("inf"):
            raise ValueError(f"drain_timeout must be a number of seconds >= 0, got {self.drain_timeout}")


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


def trained_exit_layers(info: dict[str, Any]) -> tuple[int, ...] | None:
    """The exit layers a run was trained with (run.json `early_exit.layers`), or None."""
    layers = (info.get("early_exit") or {}).get("layers")
    return tuple(int(x) for x in layers) if layers else None


def build_server(cfg: ServeConfig):
    """(FastAPI app, served model names): the model, its engine and adapters, ready for uvicorn."""
    from ..inference import LLMEngine
    from ..inference.async_engine import AsyncEngine
    from ..inference.server import create_app
    from ..rundir import RunDir

    run = RunDir.open(cfg.run)
    name = cfg.served_model_name or Path(cfg.run).resolve().name
    adapters = parse_lora_specs(cfg.lora, name)
    engine_cfg = cfg.engine
    if engine_cfg.exit_layers is None and (trained := trained_exit_layers(run.info)):
        engine_cfg = replace(engine_cfg, exit_layers=trained)
        log.info("early exit may be tried after layers %s (trained exits, from run.json)", list(trained))
    if engine_cfg.speculative_layer is None and engine_cfg.early_exit_threshold >= 1.0 \
            and (trained := trained_exit_layers(run.info)):
        engine_cfg = replace(engine_cfg, speculative_layer=min(trained))
        log.info("requests may speculate with drafts from the exit after layer %d (the run's first trained exit)",
                 min(trained))
    elif engine_cfg.speculative_tokens and engine_cfg.speculative_layer is None:
        raise ValueError(f"--speculative-tokens {engine_cfg.speculative_tokens}: the run {cfg.run} has no trained "
                         f"early exit to draft from (run.json records none); train one with `autoglm train "
                         f"--early-exit` or set --speculative-layer")
    model, tok = run.load()
    engine = LLMEngine(model, tok, engine_cfg)
    for lora_name, path in adapters:
        engine.add_lora(lora_name, path)
    projector = None  # RUN/adapters/image (autoglm align projector): chat requests may carry an image
    if (Path(cfg.run) / "adapters" / "image" / "adapter_config.json").is_file():
        from ..multimodal.projector import load_image_projector

        projector = load_image_projector(cfg.run).to(next(model.parameters()).device)
    app = create_app(AsyncEngine(engine), model_name=name, api_key=cfg.api_key, max_concurrent=cfg.max_concurrent,
                     allow_lora_updates=cfg.allow_lora_updates, max_prompts=cfg.max_prompts,
                     image_projector=projector)
    return app, [name, *(n for n, _ in adapters)]
