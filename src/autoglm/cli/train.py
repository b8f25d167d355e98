"""`autoglm info | train | eval | generate`: the language model's own commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from ..recipes.compare import CompareConfig
from ..recipes.generate import EvalConfig, GenerateConfig
from ..recipes.pretrain import PretrainConfig
from .common import console, err, fail, run_under_torchrun, setup_logging
from .options import add_recipe_command

__all__ = ["register"]


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
    millions = lambda n: f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e6:.2f}M"  # noqa: E731
    t.add_row("total params", f"{counts['total']:,} ({millions(counts['total'])})")
    t.add_row("active params / token", f"{counts['active']:,} ({millions(counts['active'])})")
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


def run_train(cfg: PretrainConfig) -> None:
    from ..recipes.generate import generate_text
    from ..recipes.pretrain import pretrain

    if run_under_torchrun(cfg, "train"):  # --nproc N: torchrun ran this command on every process
        return
    out = pretrain(cfg, console=err)
    if out.run is None:  # not the main rank: it printed nothing and saved nothing
        return
    r, ev = out.result, out.result.final_eval
    console.print(f"[bold green]done[/]: {r.steps} steps in {r.elapsed:.0f}s ({r.tokens_per_s:,.0f} tokens/s); "
                  f"validation loss {ev['loss']:.3f}, perplexity {ev['perplexity']:.1f}, next-token accuracy "
                  f"{ev['accuracy'] * 100:.1f}%")
    console.print(f"model saved to {cfg.out} (load with AutoModelForCausalLM.from_pretrained after `import autoglm`)")
    if cfg.sample_prompt:
        text = generate_text(out.model.eval(), out.tokenizer, cfg.sample_prompt, 60, seed=cfg.train.seed)
        console.print("[bold]sample:[/] " + escape(text), highlight=False)


def run_eval(cfg: EvalConfig) -> None:
    from ..recipes.generate import evaluate_run, evaluate_tasks

    if not cfg.tasks:
        console.print_json(json.dumps(evaluate_run(cfg)))
        return
    out = evaluate_tasks(cfg)
    t = Table(title=f"lm-evaluation-harness {out['lm_eval_version']} on {cfg.run}")
    for col in ("task", "metric", "value", "examples"):
        t.add_column(col)
    for task, metrics in out["results"].items():
        n = (out.get("n-samples") or {}).get(task, {}).get("effective", "")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not key.startswith("sample_len") and "_stderr" not in key:
                t.add_row(task, key.split(",")[0], f"{value:.4f}", str(n))
    console.print(t)
    console.print(f"results written to {out['output']}")


def run_generate(cfg: GenerateConfig) -> None:
    from ..recipes.generate import generate

    t = time.perf_counter()
    text = generate(cfg)
    console.print(text, markup=False, highlight=False)
    err.print(f"[dim]{cfg.max_new_tokens} tokens in {time.perf_counter() - t:.2f}s[/]")


def run_compare(cfg: CompareConfig) -> None:
    from ..recipes.compare import compare

    res = compare(cfg, console=err)
    lengths = list(res["rows"][0]["latency_ms"])
    t = Table(title=f"same training time: {cfg.minutes:g} min per model")
    for col in ("model", "params total / active", "steps", "val loss", "next-token acc",
                *(f"fwd {n} tok" for n in lengths)):
        t.add_column(col)
    for r in res["rows"]:
        name = f"[bold]{r['preset']}[/]" if r["preset"] == res["best"] else r["preset"]
        t.add_row(name, f"{r['params_total'] / 1e6:.1f}M / {r['params_active'] / 1e6:.1f}M", str(r["steps"]),
                  f"{r['val_loss']:.3f}", f"{r['val_acc'] * 100:.1f}%",
                  *(f"{r['latency_ms'][n]:,.0f} ms" for n in lengths))
    console.print(t)
    console.print(f"runs, compare.md and the loss-vs-time plot ({res['plot'] or 'not drawn'}) are in {cfg.out}")
    if res["sample"]:
        console.print(f"[bold]sample from {res['best']}:[/] " + escape(res["sample"]), highlight=False)


def consolidate(checkpoint: Path = typer.Argument(..., help="A run directory (its checkpoints/latest), its "
                                                                "checkpoints/ folder or one step-NNNNNN folder."),
                out: Path = typer.Option(..., "--out", help="Model directory to write (config.json, "
                                                            "model.safetensors, tokenizer)."),
                overwrite: bool = typer.Option(False, "--overwrite", help="Replace the model files of an existing "
                                                                          "--out.")) -> None:
    from ..distributed.consolidate import consolidate as run_consolidate
    from .common import user_errors

    setup_logging()
    try:
        written = run_consolidate(checkpoint, out, overwrite=overwrite)
    except user_errors() as e:
        fail(e)
    console.print(f"model written to {written} (autoglm generate/eval/export read it; "
                  "AutoModelForCausalLM.from_pretrained after `import autoglm`)", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command()(info)
    app.command(help="Turn a distributed checkpoint (any strategy, any number of ranks) into one safetensors "
                     "model directory, in one process without a GPU.")(consolidate)
    add_recipe_command(app, "train", PretrainConfig, run_train,
                       help="Pre-train a model on a text corpus (AdamW, warmup + cosine, clipping, checkpoints, "
                            "validation); default: `small` on the built-in corpus.")
    add_recipe_command(app, "compare", CompareConfig, run_compare,
                       help="Train several presets side by side for the same training time (default: the sparse MoE "
                            "`small` against the dense `standard-small`); table, loss-vs-time plot, sample.")
    add_recipe_command(app, "eval", EvalConfig, run_eval,
                       help="Validation loss, perplexity and next-token accuracy of a saved run; with --tasks, "
                            "lm-evaluation-harness tasks in process (--tasks builtin: the built-in local tasks).")
    add_recipe_command(app, "generate", GenerateConfig, run_generate,
                       help="Continue a prompt with the KV cache (greedy, or temperature / top-k / top-p sampling).")
