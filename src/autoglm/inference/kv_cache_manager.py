"""Per-request block tables on top of the block pool.

Logical block j of a request holds the K/V of positions [j * block_size, (j + 1) * block_size).
The table maps logical to physical block ids; with sparse (window + global) attention a
block whose positions all fall out of every future query's window and hold no global
token is returned to the pool and its entry becomes None. A sequence therefore never
holds more than about (window + global + one step's tokens) / block_size blocks, however
long it generates. Dense models keep every block.

Prefix caching (`prefix_caching=True`): every full block of a request's tokens (prompt and
generated) is named by a content key, (digest of the key before, adapter, the block's token
ids), so a key stands for the whole sequence up to the block's end. Once a block's K/V is
computed (`cache_computed`) the pool records its key; a new request first takes the longest
prefix of its blocks that is cached (`match_prefix`; with a sparse window only the blocks
its next queries can read must be), shared by reference count, and computes only the rest.
So a chat's next turn, whose prompt repeats the conversation so far, and a preempted
request, recomputed later, start where the cache ends. K/V at a position depends only on the
tokens up to it (causal attention, absolute positions), so the shared blocks hold exactly
what the request would have computed. Requests never write into a
shared block: writes go to positions >= `num_computed_tokens`, past every matched block. The
last token is always computed (its logits give the next token).

Blocks that an admitted request has yet to compute are *pending*. A request whose next
block is pending in another request waits (`match_prefix` returns None) and takes the
block from the cache once it is computed, rather than computing the same K/V again in the
same steps (requests that share a system prompt often arrive together).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass

from .block_pool import BlockPool

__all__ = ["KVCacheManager", "KVCacheBlocks"]


@dataclass
class KVCacheBlocks:
    """One request's block table as the runner sees it: physical id or None (freed) per logical block."""

    block_ids: list[int | None]


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, window: int | None = None, num_global: int = 0,
                 prefix_caching: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.window = window
        self.num_global = num_global
        self.prefix_caching = prefix_caching
        self.tables: dict[str, list[int | None]] = {}
        self._keys: dict[str, list[Hashable]] = {}  # request -> content keys of its full blocks so far
        self._extra: dict[str, Hashable] = {}  # request -> what besides the tokens its keys hold (its adapter)
        self._registered: dict[str, int] = {}  # request -> how many of its keys the pool has recorded
        self._num_pending: dict[str, int] = {}  # request -> its keys [registered, n) are in _pending
        self._pending: dict[Hashable, int] = {}  # key -> admitted requests that have yet to compute its block
        self.prefix_queried = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_hits = 0  # of those, served from cached blocks

    # ----------------------------------------------------------- prefix cache
    def block_keys(self, token_ids: list[int], extra: Hashable = None,
                   before: list[Hashable] = ()) -> list[Hashable]:
        """Content keys of the full blocks of `token_ids`; `extra` (e.g. the LoRA adapter) is part
        of every key, since it changes the K/V. Key j = (SHA-256 of key j - 1, extra, tokens of
        block j): a cryptographic link, so no prompt can be crafted to collide with another
        client's prefix and read its cached K/V (which a 64-bit hash would allow). `before`: the
        keys of the leading blocks, already made (only the blocks after them are keyed)."""
        bs, keys = self.block_size, list(before)
        for j in range(len(keys), len(token_ids) // bs):
            parent = hashlib.sha256(repr(keys[-1]).encode()).digest() if keys else b""
            keys.append((parent, extra, tuple(token_ids[j * bs:(j + 1) * bs])))
        return keys

    def match_prefix(self, request_id: str, token_ids: list[int], limit: int, extra: Hashable = None,
                     wait: bool = True) -> int | None:
        """Give a request with no blocks yet the cached blocks of the longest prefix of its full
        blocks (of `token_ids`: its prompt, and its output if it was preempted) that is cached
        (`_longest_match`) and ends at or before token `limit` (the caller keeps at least one
        token to compute), and mark its other full blocks pending. Returns the tokens covered (a
        multiple of block_size; 0 when prefix caching is off), or, with `wait`, None when the next
        block is pending in another request (nothing is held then: ask again next step). Undo
        with `free`."""
        if request_id in self.tables:
            raise ValueError(f"request {request_id!r} already holds KV blocks; match its prefix before allocating")
        if not self.prefix_caching:
            return 0
        keys = self.block_keys(token_ids, extra)
        usable = keys[:max(limit, 0) // self.block_size]
        table = self._longest_match([self.pool.lookup(key) for key in usable])
        m = len(table)
        if wait and m < len(usable) and usable[m] in self._pending:
            return None
        for block in table:
            if block is not None:
                self.pool.touch(block)
        self.tables[request_id], self._keys[request_id], self._extra[request_id] = table, keys, extra
        self._registered[request_id], self._num_pending[request_id] = m, len(keys)
        for key in keys[m:]:
            self._pending[key] = self._pending.get(key, 0) + 1
        self.prefix_queried += len(token_ids)
        self.prefix_hits += m * self.block_size
        return m * self.block_size

    def _needed(self, j: int, next_query_pos: int) -> bool:
        """Whether block j can be read by a query at `next_query_pos` or later (the rule of
        `free_out_of_window`: every block without a window; else global or inside the window)."""
        bs = self.block_size
        return self.window is None or j * bs < self.num_global or (j + 1) * bs - 1 >= next_query_pos - self.window + 1

    def _longest_match(self, found: list[int | None]) -> list[int | None]:
        """The table of the longest cached prefix, given the cached block (or None) of each leading
        key. A prefix of m blocks is usable when block m - 1 is cached (its key names all m blocks'
        tokens) and so is every block a query from position m * block_size on can read; with a
        sparse window the blocks before it need not be (None in the table), so a long shared prompt
        whose middle blocks were evicted still matches, and a match takes no dead blocks."""
        if self.window is None:  # every block is read: the leading run of cached blocks
            return found[:next((j for j, b in enumerate(found) if b is None), len(found))]
        bs = self.block_size
        for m in range(len(found), 0, -1):
            if found[m - 1] is None:
                continue
            need = [self._needed(j, m * bs) for j in range(m)]
            if all(b is not None for b, n in zip(found, need) if n):
                return [b if n else None for b, n in zip(found, need)]
        return []

    def _unpend(self, keys: list[Hashable]) -> None:
        for key in keys:
            left = self._pending[key] - 1
            if left:
                self._pending[key] = left
            else:
                del self._pending[key]

    def forget_prefixes(self, extra: Hashable = None, everything: bool = False) -> int:
        """Stop sharing the cached blocks made under `extra` (e.g. a LoRA adapter being unloaded,
        whose name may come back with other weights), or every cached block. Returns how many."""
        return self.pool.reset_cache(None if everything else (lambda key: key[1] == extra))

    def has_uncached(self, request_id: str, num_computed: int) -> bool:
        """Whether the request has computed a full block (positions < `num_computed`) that is not
        recorded yet (a cheap check before `cache_computed`)."""
        return request_id in self._keys and num_computed // self.block_size > self._registered[request_id]

    def cache_computed(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Record the content keys of the request's blocks that are now fully computed (positions
        < `num_computed` of `token_ids`, its prompt + output so far), so later requests can share
        them. A request that `match_prefix` never saw (prefix caching off, or one that must not
        share) records nothing."""
        if not self.has_uncached(request_id, num_computed):
            return
        upto = min(num_computed, len(token_ids)) // self.block_size  # (a stop may have cut computed tokens off)
        keys = self._keys[request_id]
        if upto > len(keys):
            keys = self._keys[request_id] = self.block_keys(token_ids[:upto * self.block_size],
                                                            self._extra[request_id], keys)
        table, done = self.tables[request_id], self._registered[request_id]
        for j in range(done, upto):
            if table[j] is not None:  # (a block freed out of the window before it was recorded stays out)
                self.pool.cache(table[j], keys[j])
        self._unpend(keys[done:min(upto, self._num_pending[request_id])])
        self._registered[request_id] = max(done, upto)

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks a request needs so that positions [0, num_tokens) have slots."""
        have = len(self.tables.get(request_id, []))
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate_slots(self, request_id: str, num_tokens: int) -> KVCacheBlocks | None:
        """Grow the table to cover `num_tokens` positions; None (nothing changed) if the pool is short."""
        n = self.blocks_needed(request_id, num_tokens)
        if n > self.pool.num_free:
            return None
        table = self.tables.setdefault(request_id, [])
        table.extend(self.pool.allocate(n))
        return KVCacheBlocks(table)

    def free_out_of_window(self, request_id: str, next_query_pos: int) -> int:
        """Return blocks no query at position >= next_query_pos can see. Returns how many were freed.

        Query p sees keys in [p - W + 1, p] plus the first G positions, so a block is dead when
        its last position is < next_query_pos - W + 1 and it starts at or after G.
        """
        if self.window is None or request_id not in self.tables:
            return 0
        table = self.tables[request_id]
        lo = next_query_pos - self.window + 1
        freed = []
        for j, b in enumerate(table):
            if b is None:
                continue
            start, end = j * self.block_size, (j + 1) * self.block_size - 1
            if end >= lo:
                break
            if start >= self.num_global:
                freed.append(b)
                table[j] = None
        self.pool.free(freed)
        return len(freed)

    def get(self, request_id: str) -> KVCacheBlocks:
        return KVCacheBlocks(self.tables[request_id])

    def free(self, request_id: str) -> None:
        """Give every block of a request back (finish, abort or preemption)."""
        table = self.tables.pop(request_id, [])
        keys = self._keys.pop(request_id, [])
        self._extra.pop(request_id, None)
        self._unpend(keys[self._registered.pop(request_id, 0):self._num_pending.pop(request_id, 0)])
        self.pool.free([b for b in table if b is not None])

    def num_live_blocks(self, request_id: str) -> int:
        return sum(b is not None for b in self.tables.get(request_id, []))
