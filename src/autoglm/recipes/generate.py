"""Sampling and evaluating a saved run: `autoglm generate` and `autoglm eval`.

Generation goes through the inference engine (paged KV cache), the same path the server
uses; evaluation is the Trainer's `evaluate` on the validation split of a corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import setting
from .common import DEFAULT_CACHE

__all__ = ["GenerateConfig", "EvalConfig", "generate_text", "generate", "evaluate_run"]


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
