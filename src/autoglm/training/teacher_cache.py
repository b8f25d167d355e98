"""On-disk cache of the teachers' top-k logits, one safetensors file per micro-batch.

Distillation re-reads the same batches every epoch; running two teachers each time costs
more than the student's own step. The cache keeps, per micro-batch index and teacher,
the k largest logits (float16 by default) and their token ids (int32):

    cache_dir/
      meta.json                  {"top_k", "n_teachers", "key"}: a cache made for other
                                 teachers, k or data is refused, not silently reused
      batch-000042.safetensors   "t0.values" (B, T, k), "t0.indices" (B, T, k), "t1.values", ...

From top-k logits the distribution is rebuilt as a softmax over the k kept tokens (the
other tokens get probability 0), see `topk_to_probs`.

Example:
    >>> import torch
    >>> p = topk_to_probs(torch.tensor([[[2.0, 1.0]]]), torch.tensor([[[3, 0]]]), vocab=4)
    >>> p.shape, round(float(p.sum()), 6), float(p[0, 0, 1])
    (torch.Size([1, 1, 4]), 1.0, 0.0)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["TeacherLogitCache", "topk_to_probs"]


def topk_to_probs(values: torch.Tensor, indices: torch.Tensor, vocab: int, temperature: float = 1.0) -> torch.Tensor:
    """values, indices (B, T, k) -> probabilities (B, T, vocab), float32: softmax over the k
    kept logits at `temperature`, scattered to their token ids, 0 elsewhere."""
    p = torch.softmax(values.float() / temperature, dim=-1)
    return torch.zeros(*values.shape[:-1], vocab, device=values.device).scatter_(-1, indices.long(), p)


class TeacherLogitCache:
    """Top-k teacher logits per micro-batch index, in `directory`.

    `key` identifies what was cached (teacher paths, data, seq_len, batch size...); opening
    a directory made with another key, k or teacher count raises ValueError naming the
    mismatch. Files are written atomically (temp file + rename).
    """

    def __init__(self, directory: str | Path, top_k: int, n_teachers: int, key: str = "",
                 dtype: torch.dtype = torch.float16) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.dir = Path(directory)
        self.top_k, self.n_teachers, self.key, self.dtype = top_k, n_teachers, key, dtype
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"top_k": top_k, "n_teachers": n_teachers, "key": key}
        meta_path = self.dir / "meta.json"
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old != meta:
                raise ValueError(f"teacher-logit cache {self.dir} was made for {old}, not {meta}; delete it or "
                                 f"choose another cache directory")
        else:
            meta_path.write_text(json.dumps(meta))
        self.hits = self.misses = 0

    def _path(self, index: int) -> Path:
        return self.dir / f"batch-{index:06d}.safetensors"

    def get(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """[(values, indices)] per teacher, or None when batch `index` is not cached yet."""
        path = self._path(index)
        if not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        d = load_file(str(path))
        return [(d[f"t{i}.values"], d[f"t{i}.indices"]) for i in range(self.n_teachers)]

    def put(self, index: int, entry: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if len(entry) != self.n_teachers:
            raise ValueError(f"expected {self.n_teachers} teachers' top-k logits, got {len(entry)}")
        tensors = {}
        for i, (v, idx) in enumerate(entry):
            tensors[f"t{i}.values"] = v.detach().to("cpu", self.dtype).contiguous()
            tensors[f"t{i}.indices"] = idx.detach().to("cpu", torch.int32).contiguous()
        fd, tmp = tempfile.mkstemp(prefix=".batch-", dir=self.dir)
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, self._path(index))
