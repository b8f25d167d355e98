"""The block pool: owns the physical KV blocks' ids, a free list and reference counts.

It knows nothing about requests or tensors; the KV-cache manager asks it for blocks and
gives them back. Reference counts let a block be shared (e.g. a common prefix); a block
returns to the free list when its count drops to 0.

Example:
    >>> pool = BlockPool(4)
    >>> a = pool.allocate(3); pool.num_free
    1
    >>> pool.free(a); pool.num_free
    4
"""

from __future__ import annotations

from collections import deque

__all__ = ["BlockPool", "NoFreeBlocksError"]


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks off the free list (ref count 1). All or nothing."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def share(self, block: int) -> None:
        """One more holder of an allocated block."""
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is free; allocate it before sharing")
        self._ref[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks at 0 go back on the free list."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"double free of KV block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)

    def check_invariants(self) -> None:
        """Free list and ref counts agree: every block is free (ref 0) xor held (ref > 0), none twice."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        for b in range(self.num_blocks):
            if (b in free) != (self._ref[b] == 0):
                raise AssertionError(f"block {b}: on free list={b in free} but ref count {self._ref[b]}")
