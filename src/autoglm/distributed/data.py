"""Each rank's slice of the global batch.

The global batch of optimizer step `s` (micro-batch `i = s * grad_accum + m`) is what one
process would read: `sample_batch(tokens, batch_size, seq_len, i, seed)`, `batch_size`
windows at offsets drawn from `np.random.default_rng([seed, i])`. Rank `r` of `W`
data-parallel ranks reads rows `[r * B/W, (r + 1) * B/W)` of it and builds only those
windows, so the ranks read disjoint parts of every global batch, the union is exactly the
one-process batch, and the split is a pure function of (seed, step, world size): a run
resumed on another world size continues with the same global batches.

Example:
    >>> import numpy as np
    >>> from autoglm.data import sample_batch
    >>> tokens = np.arange(1000, dtype=np.int64)
    >>> whole, _ = sample_batch(tokens, 4, 8, step=3, seed=0)
    >>> parts = [rank_batch(tokens, 4, 8, 3, 0, rank=r, world_size=2)[0] for r in range(2)]
    >>> bool((np.concatenate(parts) == whole.numpy()).all())
    True
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["rank_rows", "rank_batch"]


def rank_rows(global_batch: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that `rank` reads; a clear error if it does not split evenly."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
    if global_batch % world_size:
        raise ValueError(f"the global batch ({global_batch} sequences) must be divisible by the world size "
                         f"({world_size}); use --batch-size {max(world_size, global_batch // world_size * world_size)}"
                         f" or another --nproc")
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


def rank_batch(tokens: np.ndarray, global_batch: int, seq_len: int, step: int, seed: int, rank: int,
               world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, labels)` of this rank's rows of the global batch at `step`, shape (B/W, T)."""
    from ..data.text import _check_length, _windows

    rows = rank_rows(global_batch, rank, world_size)
    _check_length(tokens, seq_len, global_batch)
    if seed < 0 or step < 0:
        raise ValueError(f"seed ({seed}) and step ({step}) must be >= 0")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=global_batch)  # the one-process draw
    return _windows(tokens, starts[rows], seq_len)
