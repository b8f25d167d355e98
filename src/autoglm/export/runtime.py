"""ONNX Runtime causal LM: the prefill + decode sessions of an export directory and a
generation loop with the engine's sampling options.

Example (after `autoglm export onnx runs/a --out runs/a-onnx`):
    >>> lm = OrtCausalLM("runs/a-onnx")                                  # doctest: +SKIP
    >>> out = lm.generate([[17, 42, 9]], SamplingParams(temperature=0))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..inference.request import SamplingParams
from ..inference.sampling import sample_token
from .wrapper import past_names

__all__ = ["OrtCausalLM", "read_export_info", "evaluate_ort"]

log = logging.getLogger(__name__)


def read_export_info(directory: str | Path) -> dict:
    """export.json of an export directory, with a clear error when it is not one."""
    path = Path(directory) / "export.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not an ONNX export directory (no export.json); create one with "
                                f"`autoglm export onnx MODEL_DIR --out {directory}`")
    return json.loads(path.read_text())


class OrtCausalLM:
    """Runs `prefill.onnx` (no cache) and `decode.onnx` (with past K/V) on the CPU provider.

    threads: intra-op threads (0 = ONNX Runtime's default, all cores).
    """

    def __init__(self, directory: str | Path, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.directory = Path(directory)
        self.info = read_export_info(directory)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # idle worker threads sleep instead of spinning: on a shared CPU a spinning pool starves
        # every other process (and other sessions in this one)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {name: ort.InferenceSession(str(self.directory / f), sess_options=opts,
                                                    providers=list(providers))
                         for name, f in self.info["graphs"].items()}
        self.num_layers = int(self.info["num_layers"])
        self._past_names = past_names(self.num_layers)
        self.eos_token_id = self.info.get("eos_token_id")
        self.pad_token_id = self.info.get("pad_token_id") or 0
        self.max_length = int(self.info["max_position_embeddings"])
        self.windowed_prefill = self.info.get("prefill_attention", {}).get("kind") == "windowed"

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids (B, T) int64, attention_mask (B, P + T) int64 (0 = padding), past 2L arrays
        (B, Hkv, P, D) or None -> logits (B, T, V) float32, present 2L arrays (B, Hkv, P + T, D)."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        attention_mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        P = 0 if past is None else past[0].shape[2]
        if input_ids.ndim != 2 or attention_mask.shape != (input_ids.shape[0], P + input_ids.shape[1]):
            raise ValueError(f"attention_mask must have shape (batch, past + new) = "
                             f"({input_ids.shape[0]}, {P + input_ids.shape[-1]}), got {attention_mask.shape}")
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if past is None:
            if self.windowed_prefill and not _contiguous_rows(attention_mask):
                raise ValueError("the prefill graph runs windowed attention, which needs each row's real tokens "
                                 "to be contiguous (left or right padding only); got a mask with padding inside "
                                 "a row. Left-pad the prompts (as generate() does) or export with "
                                 "prefill_attention='dense'")
            outs = self.sessions["prefill"].run(None, feed)
        else:
            if len(past) != 2 * self.num_layers:
                raise ValueError(f"past must hold {2 * self.num_layers} arrays (key and value per layer), "
                                 f"got {len(past)}")
            feed.update(zip(self._past_names, past))
            outs = self.sessions["decode"].run(None, feed)
        return outs[0], outs[1:]

    def generate(self, prompts: Sequence[Sequence[int]] | np.ndarray, params: SamplingParams | None = None,
                 tokenizer=None) -> list[list[int]]:
        """Continue each prompt (token ids; lengths may differ: they are left-padded and run as one batch).

        params: the inference engine's `SamplingParams` (greedy when temperature is 0,
        top-k, top-p, repetition penalty, per-request seed, stop token ids, stop strings,
        max_tokens, ignore_eos), applied by the engine's own `sample_token`, row by row.
        Stop strings need `tokenizer` (to decode the output). Returns each row's new tokens,
        the stop token included (as the engine does), nothing after it.
        """
        params = params or SamplingParams()
        rows = [list(map(int, p)) for p in prompts]
        if not rows or any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        if params.stop and tokenizer is None:
            raise ValueError("stop strings need the tokenizer to decode the output; pass tokenizer=...")
        T = max(len(r) for r in rows)
        if T + params.max_tokens > self.max_length:
            raise ValueError(f"prompt ({T} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                             f"context of {self.max_length} tokens; shorten the prompt or lower max_tokens")
        B = len(rows)
        ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = r
            mask[i, T - len(r):] = 1
        stops = set(params.stop_token_ids)
        if not params.ignore_eos and self.eos_token_id is not None:
            stops.add(int(self.eos_token_id))
        gens = [torch.Generator().manual_seed(params.seed) if params.seed is not None else None for _ in rows]
        outputs: list[list[int]] = [[] for _ in rows]
        done = [False] * B
        logits, past = self.forward(ids, mask)
        for _ in range(params.max_tokens):
            step = np.full(B, self.pad_token_id, dtype=np.int64)  # finished rows feed padding
            for i in range(B):
                if done[i]:
                    continue
                tok = sample_token(torch.from_numpy(logits[i, -1].copy()), params, rows[i] + outputs[i], gens[i])
                outputs[i].append(tok)
                step[i] = tok
                done[i] = tok in stops or (bool(params.stop) and
                                           any(s in tokenizer.decode(outputs[i]) for s in params.stop))
            if all(done) or len(max(outputs, key=len)) >= params.max_tokens:
                break
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(step[:, None], mask, past)
        return outputs


def _contiguous_rows(mask: np.ndarray) -> bool:
    """True when the ones of every row of a (B, T) 0/1 mask form one run (or the row is empty)."""
    m = mask.astype(bool)
    n = m.sum(1)
    first = m.argmax(1)
    last = m.shape[1] - 1 - m[:, ::-1].argmax(1)
    return bool(np.all((n == 0) | (last - first + 1 == n)))


def evaluate_ort(lm: OrtCausalLM, batches) -> dict[str, float]:
    """Held-out next-token loss / perplexity / accuracy of an ONNX export, computed like
    `autoglm.training.evaluate` (token-summed cross-entropy, labels -100 ignored).

    batches: iterable of (input_ids, labels) (B, T) int64 tensors or arrays, labels aligned
    with inputs (`labels[:, t]` is the target after `input_ids[:, t]`)."""
    total, correct, count = 0.0, 0, 0
    for input_ids, labels in batches:
        input_ids, labels = np.asarray(input_ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        logits, _ = lm.forward(input_ids, np.ones_like(input_ids))
        logits = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
        flat = labels.reshape(-1)
        keep = flat != -100
        logits, flat = logits[keep], flat[keep]
        m = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - m).sum(-1)) + m[:, 0]
        total += float((logz - logits[np.arange(len(flat)), flat]).sum())
        correct += int((logits.argmax(-1) == flat).sum())
        count += len(flat)
    if count == 0:
        raise ValueError("evaluation saw no labelled tokens; pass a non-empty validation split")
    loss = total / count
    return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "accuracy": correct / count,
            "tokens": count}
