"""Per-request block tables on top of the block pool.

Logical block j of a request holds the K/V of positions [j * block_size, (j + 1) * block_size).
The table maps logical to physical block ids; with sparse (window + global) attention a
block whose positions all fall out of every future query's window and hold no global
token is returned to the pool and its entry becomes None. A sequence therefore never
holds more than about (window + global + one step's tokens) / block_size blocks, however
long it generates. Dense models keep every block.
"""

from __future__ import annotations

from dataclasses import dataclass

from .block_pool import BlockPool

__all__ = ["KVCacheManager", "KVCacheBlocks"]


@dataclass
class KVCacheBlocks:
    """One request's block table as the runner sees it: physical id or None (freed) per logical block."""

    block_ids: list[int | None]


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, window: int | None = None, num_global: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = pool
        self.block_size = block_size
        self.window = window
        self.num_global = num_global
        self.tables: dict[str, list[int | None]] = {}

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
        self.pool.free([b for b in table if b is not None])

    def num_live_blocks(self, request_id: str) -> int:
        return sum(b is not None for b in self.tables.get(request_id, []))
