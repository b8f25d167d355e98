"""The `autoglm` command. The only module that reads argv; everything else gets explicit arguments."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .common import err, fail

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Open-AutoGLM: train, evaluate and sample a sparse-attention MoE language model.")
console = Console()

DEFAULT_CACHE = Path.home() / ".cache" / "autoglm"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars on every load/save


def _load_model_dir(model_dir: Path):
    from ..rundir import RunDir

    return RunDir.open(model_dir).load()


@app.command()
def info(preset: str = typer.Argument(..., help="Preset name, e.g. tiny, small, base, standard-small.")) -> None:
    """Print a preset's architecture and its total and active (per-token) parameter counts."""
    import torch

    from ..config import OpenAutoGLMConfig
    from ..hf import OpenAutoGLMForCausalLM

    try:
        cfg = OpenAutoGLMConfig.from_name(preset)
    except ValueError as e:
        fail(e)
    with torch.device("meta"):  # no memory, no init: counts only
        counts = OpenAutoGLMForCausalLM(cfg).num_parameters_summary()
    t = Table(title=f"preset {preset}", show_header=False)
    t.add_row("total params", f"{counts['total']:,} ({counts['total'] / 1e6:.1f}M)")
    t.add_row("active params / token", f"{counts['active']:,} ({counts['active'] / 1e6:.1f}M)")
    t.add_row("layers x width x heads", f"{cfg.num_hidden_layers} x {cfg.hidden_size} x {cfg.num_attention_heads}"
              f" (kv heads {cfg.num_key_value_heads})")
    attn = (f"sparse: window {cfg.window_size} + {cfg.num_global_tokens} global tokens"
            if cfg.attention == "sparse" else "dense causal")
    t.add_row("attention", attn)
    t.add_row("position", f"{cfg.position} (max {cfg.max_position_embeddings} before extend_context)")
    ffn = (f"MoE: {cfg.num_experts} SwiGLU experts x {cfg.expert_intermediate_size}, top-{cfg.num_experts_per_tok},"
           f" every {cfg.moe_every} layer(s)" if cfg.num_experts else f"dense SwiGLU x {cfg.intermediate_size}")
    t.add_row("ffn", ffn)
    t.add_row("vocab", str(cfg.vocab_size))
    console.print(t)


@app.command()
def train(
    preset: str = typer.Option("small", help="Model preset (see `autoglm info`)."),
    data: Optional[Path] = typer.Option(None, help="Text file or folder of .txt/.md files; default: the built-in "
                                                   "corpus of Python standard-library docstrings."),
    out: Path = typer.Option(Path("runs/default"), help="Run directory (model, tokenizer, metrics, checkpoints)."),
    steps: int = typer.Option(1000, help="Optimizer steps (the cosine schedule ends here)."),
    minutes: Optional[float] = typer.Option(None, help="Wall-clock budget; stops early, still evaluates and saves."),
    batch_size: int = typer.Option(16, help="Sequences per micro-batch."),
    seq_len: int = typer.Option(256, help="Tokens per sequence."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-3, help="Peak learning rate."),
    warmup: Optional[int] = typer.Option(None, help="Linear warmup steps (default: min(100, steps/10))."),
    eval_every: int = typer.Option(200, help="Validate every N steps."),
    save_every: int = typer.Option(500, help="Checkpoint every N steps."),
    precision: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute activations in backward to save memory."),
    vocab_size: Optional[int] = typer.Option(None, help="Tokenizer vocabulary (default: the preset's)."),
    seed: int = typer.Option(1337, help="Seed for init and batch sampling."),
    resume: bool = typer.Option(False, help="Continue from OUT/checkpoints/latest."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE, help="Where tokenized corpora are cached."),
    sample: bool = typer.Option(True, help="Print a generated sample at the end."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Pre-train a model on a text corpus: AdamW, warmup + cosine, clipping, checkpoints, validation."""
    from ..training import CheckpointError, TrainConfig
    from ..training.pretrain import pretrain

    _setup_logging(verbose)
    try:
        cfg = TrainConfig(batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr,
                          warmup_steps=warmup if warmup is not None else min(100, max(1, steps // 10)),
                          max_steps=steps, max_seconds=minutes * 60 if minutes else None, eval_every=eval_every,
                          save_every=save_every, seed=seed, precision=precision,
                          grad_checkpointing=grad_checkpointing)
        model, prepared, result = pretrain(preset, out, cfg, data=data, cache_dir=cache_dir,
                                           vocab_size=vocab_size, resume=resume, console=err)
    except (ValueError, FileNotFoundError, UnicodeDecodeError, CheckpointError) as e:
        fail(e)
    ev = result.final_eval
    console.print(f"[bold green]done[/]: {result.steps} steps in {result.elapsed:.0f}s "
                  f"({result.tokens_per_s:,.0f} tokens/s); validation loss {ev['loss']:.3f}, "
                  f"perplexity {ev['perplexity']:.1f}, next-token accuracy {ev['accuracy'] * 100:.1f}%")
    console.print(f"model saved to {out} (load with AutoModelForCausalLM.from_pretrained after `import autoglm`)")
    if sample:
        text = _generate(model.eval(), prepared.tokenizer, "The ", 60, 0.8, 40, 0.95, False, seed)
        console.print("[bold]sample:[/] " + text)


@app.command("eval")
def eval_cmd(
    model_dir: Path = typer.Argument(..., help="A run directory written by `autoglm train`."),
    data: Optional[Path] = typer.Option(None, help="Corpus to evaluate on (its validation split); default: the "
                                                   "corpus the model was trained on."),
    batch_size: int = typer.Option(8), seq_len: int = typer.Option(256),
    max_batches: Optional[int] = typer.Option(None, help="Limit the number of validation batches."),
    cache_dir: Path = typer.Option(DEFAULT_CACHE),
) -> None:
    """Validation loss, perplexity and next-token accuracy of a saved model."""
    from ..training.pretrain import evaluate_run

    _setup_logging(False)
    try:
        _load_model_dir(model_dir)  # clear error for a wrong directory before any corpus work
        if data is None:
            run = json.loads((model_dir / "run.json").read_text()) if (model_dir / "run.json").is_file() else {}
            src = run.get("data", "builtin:stdlib-docstrings")
            data = None if src.startswith("builtin:") else Path(src)
        res = evaluate_run(model_dir, data, cache_dir, batch_size, seq_len, max_batches)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    console.print_json(json.dumps(res))


def _generate(model, tok, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              greedy: bool, seed: int) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    limit = model.config.max_position_embeddings
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {limit} tokens; shorten the prompt or lower --max-new-tokens")
    from ..inference import EngineConfig, LLMEngine, SamplingParams

    block = 16
    engine = LLMEngine(model, tok, EngineConfig(block_size=block, num_blocks=-(-limit // block) + 1))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature, top_k=top_k,
                            top_p=top_p, seed=seed)
    (req,) = engine.generate([ids[0].tolist()], params)
    return tok.decode(req.all_token_ids, skip_special_tokens=True)


@app.command()
def generate(
    model_dir: Path = typer.Argument(..., help="A run directory written by `autoglm train`."),
    prompt: str = typer.Option("The ", help="Text to continue."),
    max_new_tokens: int = typer.Option(100, min=1),
    temperature: float = typer.Option(0.8, min=1e-4), top_k: int = typer.Option(50, min=0),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0),
    greedy: bool = typer.Option(False, help="Greedy decoding instead of sampling."),
    seed: int = typer.Option(0),
) -> None:
    """Continue a prompt with the KV cache (greedy, or temperature / top-k / top-p sampling)."""
    _setup_logging(False)
    try:
        model, tok = _load_model_dir(model_dir)
        t = time.perf_counter()
        text = _generate(model, tok, prompt, max_new_tokens, temperature, top_k, top_p, greedy, seed)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    console.print(text)
    err.print(f"[dim]{max_new_tokens} tokens in {time.perf_counter() - t:.2f}s[/]")


from . import export as _export  # noqa: E402  (export onnx [--quantize])
from . import finetune as _finetune  # noqa: E402  (distill, finetune, merge, adapters)
from . import graph as _graph  # noqa: E402  (graph clean | pretrain | probe)
from . import serve as _serve  # noqa: E402  (serve: the OpenAI-compatible API)

app.add_typer(_finetune.app)
app.add_typer(_serve.app)
app.add_typer(_export.app, name="export")
app.add_typer(_graph.app, name="graph")


def main() -> None:
    app(prog_name="autoglm")


if __name__ == "__main__":
    sys.exit(main())
