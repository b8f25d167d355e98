"""Sampling and evaluating a saved run: `autoglm generate` and `autoglm eval`.

Generation goes through the inference engine (paged KV cache), the same path the server
uses. Evaluation is either the Trainer's `evaluate` on the validation split of a corpus
(loss, perplexity, next-token accuracy), or, with `tasks`, lm-evaluation-harness run in
process on the loaded model (`autoglm.evaluation.harness`: lm-eval's HF backend on our
PreTrainedModel, the run's tokenizer, the built-in local tasks plus `include_path`); its
results are written next to the run as JSON (`lm_eval.json`, atomically).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import setting
from .common import DEFAULT_CACHE

__all__ = ["GenerateConfig", "EvalConfig", "generate_text", "generate", "evaluate_run", "evaluate_tasks"]


@dataclass
class GenerateConfig:
    run: Path | None = setting(None, "a run directory written by `autoglm train`", argument=True,
                               required=True)
    prompt: str = setting("The ", "text to continue")
    max_new_tokens: int = setting(100, "tokens to generate")
    temperature: float = setting(0.8, "sampling temperature; 0 = greedy")
    top_k: int = setting(50, "sample from the k most likely tokens; 0 = all")
    top_p: float = setting(0.95, "nucleus sampling: the smallest set of tokens with this much probability")
    greedy: bool = setting(False, "greedy decoding instead of sampling")
    seed: int = setting(0, "sampling seed (the same seed gives the same text)")
    image: Path | None = setting(None, "an image file: its embedding enters as prefix tokens through the run's "
                                       "image projector (RUN/adapters/image, `autoglm align projector`)")

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got {self.temperature}, "
                             f"{self.top_k}, {self.top_p}")


@dataclass
class EvalConfig:
    run: Path | None = setting(None, "a run directory written by `autoglm train`", argument=True,
                               required=True)
    data: Path | None = setting(None, "corpus whose validation split to score; none = the corpus the run "
                                      "trained on")
    batch_size: int = setting(8, "sequences per batch")
    seq_len: int = setting(256, "tokens per sequence")
    max_batches: int | None = setting(None, "score at most this many batches; none = the whole split")
    val_fraction: float = setting(0.1, "held-out share of the corpus (as in training)")
    cache_dir: Path = setting(DEFAULT_CACHE, "where tokenized corpora are cached")
    tasks: tuple[str, ...] | None = setting(None, "lm-evaluation-harness tasks to run in process (`builtin` = the "
                                                  "built-in local tasks autoglm_docstring_mc and autoglm_docstring_gen; "
                                                  "needs the eval extra); none = loss, perplexity and accuracy on "
                                                  "the validation split")
    include_path: Path | None = setting(None, "a folder of your own lm-eval task YAML files (with --tasks)")
    limit: int | None = setting(None, "with --tasks: at most this many examples per task; none = all")
    num_fewshot: int | None = setting(None, "with --tasks: few-shot examples per prompt; none = each task's default")
    log_samples: bool = setting(False, "with --tasks: keep every example's inputs and scores in the JSON")
    output: Path | None = setting(None, "with --tasks: where the results JSON goes; none = RUN/lm_eval.json")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (examples per task), got {self.limit}")
        if self.tasks is not None and not self.tasks:
            raise ValueError("tasks is empty; name lm-eval tasks (e.g. builtin) or leave it out")


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 50,
                  top_p: float = 0.95, seed: int = 0) -> str:
    """The prompt and its continuation, decoded. temperature 0 is greedy."""
    from ..inference import EngineConfig, LLMEngine, SamplingParams

    ids = tokenizer(prompt).input_ids
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {limit} tokens; shorten the prompt or lower --max-new-tokens")
    block = 16
    engine = LLMEngine(model, tokenizer, EngineConfig(block_size=block, num_blocks=-(-limit // block) + 1))
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    (req,) = engine.generate([ids], params)
    return tokenizer.decode(req.all_token_ids, skip_special_tokens=True)


def generate(cfg: GenerateConfig) -> str:
    from ..rundir import RunDir

    model, tok = RunDir.open(cfg.run).load()
    if cfg.image is not None:  # image-conditioned: the projector's prefix, then the prompt
        from ..multimodal.projector import generate_with_image

        return generate_with_image(model, tok, cfg.run, cfg.image, cfg.prompt, cfg.max_new_tokens,
                                   0.0 if cfg.greedy else cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    return generate_text(model, tok, cfg.prompt, cfg.max_new_tokens, 0.0 if cfg.greedy else cfg.temperature,
                         cfg.top_k, cfg.top_p, cfg.seed)


def evaluate_run(cfg: EvalConfig) -> dict[str, Any]:
    """Validation loss, perplexity and next-token accuracy of the run on `cfg.data`'s held-out split."""
    from ..data import iter_eval_batches, prepare_corpus
    from ..rundir import RunDir
    from ..training import evaluate

    run = RunDir.open(cfg.run)
    model, tok = run.load()
    data_path = cfg.data if cfg.data is not None else run.data_source
    data = prepare_corpus(data_path, cfg.cache_dir, tokenizer=tok, val_fraction=cfg.val_fraction)
    res = evaluate(model, iter_eval_batches(data.tokens.val, cfg.batch_size, cfg.seq_len, max_batches=cfg.max_batches))
    return {**res, "data": data.source}


def evaluate_tasks(cfg: EvalConfig) -> dict[str, Any]:
    """lm-evaluation-harness tasks on the run, in process; writes the results JSON (atomic) and
    returns what it wrote plus {"output": path}."""
    import json

    from ..atomic import atomic_write_text
    from ..evaluation.harness import run_harness, summarize
    from ..rundir import RunDir

    if not cfg.tasks:
        raise ValueError("evaluate_tasks needs tasks (e.g. builtin)")
    run = RunDir.open(cfg.run)
    model, tok = run.load()
    res = run_harness(model, tok, cfg.tasks, cfg.include_path, batch_size=cfg.batch_size, limit=cfg.limit,
                      num_fewshot=cfg.num_fewshot, log_samples=cfg.log_samples)
    out = summarize(res, samples=cfg.log_samples)
    out["run"] = str(Path(cfg.run).resolve())
    path = Path(cfg.output) if cfg.output is not None else Path(cfg.run) / "lm_eval.json"
    atomic_write_text(path, json.dumps(out, indent=2))
    out["output"] = str(path)
    return out
