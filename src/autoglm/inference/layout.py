"""Step layouts: the index tensors one packed forward reads, made by one builder.

A step packs the new tokens of every scheduled request into one (1, N) row. Each
request's part is a `Segment` (block table, first position, token ids, samples?): one
token is a decode row, more a prefill chunk. `LayoutBuilder.build(segments)` gives the
eager layout (shapes follow the step); `build(segments, rows=B, keys=K)` the fixed-shape
layout of a CUDA-graph bucket: decode rows only, padded to B rows of K key slots, where
padding rows and padding keys write to / read from the scratch slot that no block table
points to.

A decode row's keys are exactly the positions it may attend to: with a sparse window
(`window`, `num_global`) the global tokens and the last `window` positions, without one
every position so far; `decode_valid` is false on the padding up to the step's longest
row. The host work per row is O(blocks it reads), not O(keys): the slots come from a
(rows, blocks) table on the device. (Gathering whole live blocks instead read about a
third more keys than the rule allows on a mixed serving workload: the window's first
block, the last partial block and the rows padded to the longest.) A prefill chunk's keys
are the positions of its live blocks (a block freed out of the sparse window is None in
the table and skipped), block aligned.

Example:
    >>> b = LayoutBuilder(block_size=4, scratch_slot=32, device="cpu")
    >>> lay = b.build([Segment([3, 5], 5, [7], True)])      # decode: position 5 of blocks 3, 5
    >>> lay.write_slots.tolist(), lay.decode_slots.tolist(), lay.decode_valid.sum().item()
    ([21], [[12, 13, 14, 15, 20, 21]], 6)
    >>> b = LayoutBuilder(block_size=4, scratch_slot=32, device="cpu", window=3, num_global=1)
    >>> b.build([Segment([3, 5], 5, [7], True)]).decode_kpos.tolist()  # global 0, window 3..5
    [[0, 3, 4, 5]]
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

__all__ = ["Segment", "StepLayout", "LayoutBuilder"]


@dataclass
class Segment:
    """One request's tokens in a step."""

    table: list[int | None]  # physical block of each logical block (None: freed)
    start: int  # position of the first token
    tokens: list[int]
    samples: bool  # the step reaches the end of the request's tokens: its last row is sampled


@dataclass
class StepLayout:
    """Per-step index tensors shared by every layer."""

    input_ids: torch.Tensor  # (N,) packed tokens
    positions: torch.Tensor  # (N,) absolute positions
    write_slots: torch.Tensor  # (N,) KV slot of each new token
    decode_q: torch.Tensor | None = None  # (Bd,) packed index of each decode row
    decode_slots: torch.Tensor | None = None  # (Bd, Tk) slots of its keys (padded)
    decode_kpos: torch.Tensor | None = None  # (Bd, Tk)
    decode_valid: torch.Tensor | None = None  # (Bd, Tk)
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (a, b, slots, kpos)
    sample_rows: list[int] = field(default_factory=list)  # packed index whose logits are sampled

    def select(self, rows: list[int], input_ids: list[int] | None = None) -> "StepLayout":
        """The decode-only layout of `rows` of this decode-only layout, in that order, fed
        `input_ids` (default: the rows' own). Cheaper than building it again: the speculative
        step builds its verify rows once and takes each draft pass's rows from them."""
        if self.prefills or self.decode_q is None or self.decode_q.numel() != self.input_ids.numel():
            raise ValueError("select() takes rows of a layout of decode rows only")
        dev = self.input_ids.device
        idx = torch.tensor(rows, dtype=torch.long, device=dev)
        ids = self.input_ids[idx] if input_ids is None else torch.tensor(input_ids, dtype=torch.long, device=dev)
        return StepLayout(ids, self.positions[idx], self.write_slots[idx],
                          decode_q=torch.arange(len(rows), device=dev), decode_slots=self.decode_slots[idx],
                          decode_kpos=self.decode_kpos[idx], decode_valid=self.decode_valid[idx],
                          sample_rows=list(range(len(rows))))

    def copy_(self, other: "StepLayout") -> None:
        """Copy a layout of the same fixed shape into this one's tensors, in place (the static
        inputs of a captured CUDA graph)."""
        for f in fields(self):
            dst, src = getattr(self, f.name), getattr(other, f.name)
            if isinstance(dst, torch.Tensor):
                dst.copy_(src, non_blocking=True)


class LayoutBuilder:
    def __init__(self, block_size: int, scratch_slot: int, device, window: int | None = None,
                 num_global: int = 0) -> None:
        self.block_size, self.scratch, self.device = block_size, scratch_slot, torch.device(device)
        self.window, self.num_global = window, num_global

    def fits(self, segments: list[Segment], rows: int, keys: int) -> bool:
        """Whether `segments` fit a fixed-shape decode layout of `rows` rows and `keys` keys."""
        return len(segments) <= rows and all(
            len(s.tokens) == 1 and s.samples and self._num_keys(s.start + 1) <= keys for s in segments)

    def build(self, segments: list[Segment], rows: int | None = None, keys: int | None = None,
              device=None) -> StepLayout:
        """The packed layout of `segments` in order. With `rows`/`keys`: the fixed-shape decode
        layout (check `fits` first). `device`: where the tensors go (default: the builder's)."""
        dev = torch.device(device) if device is not None else self.device
        bs = self.block_size
        ids, pos, write, sample_rows = [], [], [], []
        dec_q, dec_tables, dec_ends, prefills = [], [], [], []
        for s in segments:
            n, a = len(s.tokens), len(ids)
            ids += s.tokens
            pos += range(s.start, s.start + n)
            write += [s.table[p // bs] * bs + p % bs for p in range(s.start, s.start + n)]
            if n == 1:
                dec_q.append(a)
                dec_tables.append(s.table)
                dec_ends.append(s.start + 1)
            else:
                live = [(j, b) for j, b in enumerate(s.table[:-(-(s.start + n) // bs)]) if b is not None]
                kpos, slots = self._keys([live], [s.start + n], len(live), dev)
                keep = kpos[0] < s.start + n
                prefills.append((a, a + n, slots[0][keep], kpos[0][keep]))
            if s.samples:
                sample_rows.append(a + n - 1)
        if rows is not None:  # fixed shape: pad the decode rows up to `rows`
            pad = rows - len(segments)
            ids += [0] * pad
            pos += [0] * pad
            write += [self.scratch] * pad
            dec_q += range(len(segments), rows)
            dec_tables += [[]] * pad
            dec_ends += [0] * pad
            sample_rows = list(range(rows))
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        lay = StepLayout(t(ids), t(pos), t(write), prefills=prefills, sample_rows=sample_rows)
        if dec_q:
            lay.decode_q = t(dec_q)
            lay.decode_kpos, lay.decode_slots, lay.decode_valid = self._decode_keys(dec_tables, dec_ends, keys, dev)
        return lay

    # --------------------------------------------------------------- internals
    def _spans(self, end: int) -> tuple[int, int, int]:
        """(g, lo, n): a query at `end` - 1 attends to positions [0, g), the global tokens, and
        [lo, lo + n), the window (without a window: every position, as [0, end))."""
        if self.window is None:
            return end, end, 0
        g = min(self.num_global, end)
        lo = max(self.num_global, end - self.window)
        return g, lo, max(end - lo, 0)

    def _num_keys(self, end: int) -> int:
        g, _, n = self._spans(end)
        return g + n

    def _decode_keys(self, tables: list[list[int | None]], ends: list[int], keys: int | None, dev):
        """(positions, slots, valid), each (R, Tk), of decode rows with these block tables and
        ends (a row's query is at end - 1); Tk = `keys`, or the most any row attends to. Padding
        keys get position 0 and the scratch slot."""
        bs = self.block_size
        spans = [self._spans(e) for e in ends]
        # the blocks a row reads, in reading order: the global run's [0, gb), then the window run's [w0, w1)
        bounds = [(-(-g // bs), lo // bs, -(-(lo + n) // bs) if n else lo // bs) for g, lo, n in spans]
        phys = []
        for table, (gb, w0, w1) in zip(tables, bounds):
            blocks = table[:gb] + table[w0:w1]
            if None in blocks:
                raise RuntimeError("a decode row reads a block that was freed out of its window (a KV-cache bug)")
            phys.append(blocks)
        width = max(1, max(len(b) for b in phys))
        ph = torch.tensor([b + [0] * (width - len(b)) for b in phys], dtype=torch.long, device=dev)  # (R, nb)
        sp = torch.tensor([s + b[:2] for s, b in zip(spans, bounds)], dtype=torch.long, device=dev)  # (R, 5)
        g, lo, nw, gb, w0 = sp.split(1, dim=1)
        count = g + nw
        tk = keys if keys is not None else max(1, int(count.max()))
        c = torch.arange(tk, device=dev)[None]
        kpos = torch.where(c < g, c, lo + c - g)
        valid = c < count
        # index of each key's block among the row's blocks: the global blocks first, the window's after
        blk = torch.where(c < g, kpos // bs, gb + kpos // bs - w0).clamp(0, width - 1)
        slots = ph.gather(1, blk) * bs + kpos % bs
        return kpos.masked_fill(~valid, 0), slots.masked_fill(~valid, self.scratch), valid

    def _keys(self, blocks: list[list[tuple[int, int]]], ends: list[int], nb: int, dev):
        """Key positions and slots (R, nb * block_size) of rows whose live blocks are `blocks`
        ((logical, physical) pairs); padding blocks get position `end` (invalid) and the scratch slot."""
        bs = self.block_size
        logical = [[j for j, _ in b] + [e // bs + 1] * (nb - len(b)) for b, e in zip(blocks, ends)]
        physical = [[p for _, p in b] + [-1] * (nb - len(b)) for b in blocks]
        off = torch.arange(bs, device=dev)
        lg = torch.tensor(logical, dtype=torch.long, device=dev)  # (R, nb)
        ph = torch.tensor(physical, dtype=torch.long, device=dev)
        kpos = (lg[:, :, None] * bs + off).flatten(1)  # (R, nb * bs)
        slots = torch.where(ph[:, :, None] >= 0, ph[:, :, None] * bs + off, self.scratch).flatten(1)
        return kpos, slots
