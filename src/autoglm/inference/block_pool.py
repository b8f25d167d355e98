"""The block pool: owns the physical KV blocks' ids, a free list and reference counts.

It knows nothing about requests or tensors; the KV-cache manager asks it for blocks and
gives them back. Reference counts let a block be shared: requests whose tokens start with
the same full blocks hold the same physical blocks (prefix caching, `KVCacheManager`).

A block can carry a *content key* (`cache`): the identity of the tokens whose K/V it holds.
When its last holder frees it, a keyed block goes to the free list like any other but keeps
its key and contents, so a later request with the same prefix can take it back (`touch`)
instead of recomputing it. The free list is in LRU order: `allocate` hands out the block
freed longest ago first, and only then does a keyed block lose its key (it is evicted).

Example:
    >>> pool = BlockPool(4)
    >>> a = pool.allocate(3); pool.num_free
    1
    >>> pool.cache(a[0], "k0"); pool.free(a); pool.num_free
    4
    >>> pool.lookup("k0") == a[0]     # freed, still cached
    True
    >>> pool.touch(a[0]); pool.num_free
    3
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

__all__ = ["BlockPool", "NoFreeBlocksError"]


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self._ref = [0] * num_blocks
        self._key: dict[int, Hashable] = {}  # block -> content key
        self._by_key: dict[Hashable, int] = {}  # content key -> block
        self.num_evictions = 0  # keyed blocks handed out for new contents

    @property
    def num_free(self) -> int:
        """Blocks no request holds (cached ones included: they can be evicted)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks that carry a content key (held or free)."""
        return len(self._key)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks off the free list (ref count 1), least recently freed first; a cached
        block taken loses its key. All or nothing."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in out:
            self._ref[b] = 1
            key = self._key.pop(b, None)
            if key is not None:
                del self._by_key[key]
                self.num_evictions += 1
        return out

    def share(self, block: int) -> None:
        """One more holder of an allocated block."""
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is free; allocate it before sharing")
        self._ref[block] += 1

    def cache(self, block: int, key: Hashable) -> None:
        """Record that held `block` holds the contents named `key`. If another block already
        carries the key, nothing changes (the first copy stays the cached one)."""
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is free; only a held block's contents can be cached")
        if key in self._by_key or block in self._key:
            return
        self._key[block] = key
        self._by_key[key] = block

    def lookup(self, key: Hashable) -> int | None:
        """The block that holds the contents `key` (held or free), or None."""
        return self._by_key.get(key)

    def touch(self, block: int) -> None:
        """One more holder of a cached block, taking it off the free list if nobody held it."""
        if block not in self._key:
            raise ValueError(f"block {block} carries no cached contents")
        if self._ref[block] == 0:
            del self._free[block]
        self._ref[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; blocks at 0 go to the end of the free list (cached
        ones keep their contents until `allocate` reaches them)."""
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"double free of KV block {b}")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def reset_cache(self, which: Callable[[Hashable], bool] | None = None) -> int:
        """Forget the content keys `which` selects (all by default: e.g. after the weights
        changed); the blocks stay as they are. Returns how many keys were dropped."""
        drop = [b for b, k in self._key.items() if which is None or which(k)]
        for b in drop:
            del self._by_key[self._key.pop(b)]
        return len(drop)

    def check_invariants(self) -> None:
        """Free list and ref counts agree: every block is free (ref 0) xor held (ref > 0); the
        key maps are each other's inverse."""
        for b in range(self.num_blocks):
            if (b in self._free) != (self._ref[b] == 0):
                raise AssertionError(f"block {b}: on free list={b in self._free} but ref count {self._ref[b]}")
        if len(self._free) != sum(r == 0 for r in self._ref):
            raise AssertionError("free list and ref counts disagree")
        if any(self._by_key.get(k) != b for b, k in self._key.items()) or len(self._key) != len(self._by_key):
            raise AssertionError("content keys: block -> key and key -> block maps disagree")
