"""Supervised fine-tuning data: JSONL of {"prompt", "completion"} with the loss on completions only.

Each record becomes `prompt + completion + <|endoftext|>`; the model reads every token
but only completion tokens (and the closing EOS) are labelled. Labels are aligned with
the inputs (label t is the token after input t, the convention of `autoglm.losses.lm_loss`
and `CausalLMObjective`); positions whose next token is part of the prompt, and right
padding, are labelled -100.

Example:
    >>> ids, labels = encode_pair([5, 6], [7, 8], eos_id=0)
    >>> ids, labels
    ([5, 6, 7, 8], [-100, 7, 8, 0])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..losses import IGNORE_INDEX

__all__ = ["read_sft_jsonl", "encode_pair", "encode_sft", "SFTDataset"]


def read_sft_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Read and validate every line before anything trains; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a JSONL file of {{\"prompt\", \"completion\"}} records")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); each line must be one "
                                 f"{{\"prompt\": ..., \"completion\": ...}} object") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno} is a JSON {type(rec).__name__}, not an object with "
                                 f"\"prompt\" and \"completion\"")
            missing = [k for k in ("prompt", "completion") if k not in rec]
            if missing:
                raise ValueError(f"{path}:{lineno} has no {' or '.join(repr(k) for k in missing)} field "
                                 f"(keys: {sorted(rec)}); every line needs both \"prompt\" and \"completion\"")
            if not isinstance(rec["prompt"], str) or not isinstance(rec["completion"], str):
                raise ValueError(f"{path}:{lineno}: \"prompt\" and \"completion\" must be strings")
            if not rec["completion"]:
                raise ValueError(f"{path}:{lineno} has an empty \"completion\"; there would be nothing to learn")
            records.append({"prompt": rec["prompt"], "completion": rec["completion"]})
    if not records:
        raise ValueError(f"{path} holds no records; add JSONL lines {{\"prompt\": ..., \"completion\": ...}}")
    return records


def encode_pair(prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_id: int) -> tuple[list[int], list[int]]:
    """-> (input_ids, aligned labels) of one record: tokens p + c + [eos], inputs drop the
    last token, label t = token t + 1 when that token is in c + [eos], else -100."""
    full = list(prompt_ids) + list(completion_ids) + [eos_id]
    ids, nxt = full[:-1], full[1:]
    n_prompt = len(prompt_ids)
    labels = [tok if t + 1 >= n_prompt else IGNORE_INDEX for t, tok in enumerate(nxt)]
    return ids, labels


def encode_sft(records: Sequence[dict[str, str]], tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Tokenize records (prompt and completion separately, so the boundary is exact);
    sequences longer than `max_len` keep their first `max_len` tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; SFT appends one after each completion")
    out = []
    for rec in records:
        p = tokenizer(rec["prompt"], add_special_tokens=False).input_ids
        c = tokenizer(rec["completion"], add_special_tokens=False).input_ids
        ids, labels = encode_pair(p, c, eos)
        ids, labels = ids[:max_len], labels[:max_len]
        if all(lab == IGNORE_INDEX for lab in labels):
            raise ValueError(f"a prompt of {len(p)} tokens leaves no completion token within max_len={max_len}; "
                             f"raise --seq-len or shorten the prompt")
        out.append((ids, labels))
    return out


class SFTDataset:
    """Encoded records with deterministic batching: batch i is a pure function of (seed, i)."""

    def __init__(self, examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> None:
        if not examples:
            raise ValueError("SFTDataset needs at least one example")
        self.examples, self.pad_id = list(examples), pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest -> input_ids (B, L) padded with pad_id, labels (B, L) with -100.
        Right padding needs no attention mask: causal attention never lets a real token see it."""
        L = max(len(self.examples[i][0]) for i in idx)
        x = torch.full((len(idx), L), self.pad_id, dtype=torch.long)
        y = torch.full((len(idx), L), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(idx):
            ids, labels = self.examples[i]
            x[row, :len(ids)] = torch.tensor(ids)
            y[row, :len(labels)] = torch.tensor(labels)
        return x, y

    def batch_fn(self, batch_size: int, seed: int) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
        """Epoch-wise shuffling: micro-batch i takes the next `batch_size` records of a
        permutation seeded by (seed, epoch)."""
        n = len(self.examples)

        def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            perms: dict[int, np.ndarray] = {}
            idx = []
            for pos in range(i * batch_size, (i + 1) * batch_size):
                epoch, off = divmod(pos, n)
                if epoch not in perms:
                    perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
                idx.append(int(perms[epoch][off]))
            return self.collate(idx)

        return batch

    def eval_batches(self, batch_size: int) -> Callable[[], list[tuple[torch.Tensor, torch.Tensor]]]:
        n = len(self.examples)
        return lambda: [self.collate(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]
