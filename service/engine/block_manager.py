"""KV blocks: which sequence holds which block of the pool, and which full blocks hold a known prefix.

The pool is `num_blocks` blocks of `block_size` positions. A sequence's block table lists its blocks in
order: position p lives in block `table[p // block_size]` at offset `p % block_size`. A block whose positions
are all computed is sealed: it gets a hash chained over its parent's hash and its own token ids (as vLLM's
automatic prefix caching and nano-vllm's block manager do), and a later prompt that starts with the same
tokens shares it, with no copy, its reference count telling how many tables hold it. A block nobody holds
goes back to the free blocks; a sealed one keeps its contents and hash there, on an LRU, and is evicted only
when a fresh block is needed and no never-cached block is left. Block 0 is scratch, never handed out: rows
that pad a step write there.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass

SCRATCH_BLOCK = 0


@dataclass(eq=False)
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set once sealed: every position computed
    token_ids: tuple[int, ...] = ()  # a sealed block's ids, checked on a hash hit (hashes can collide)


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    """The hash of a full block: its parent's hash (None for a first block) and its own ids."""
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._clean = list(range(1, num_blocks))  # a heap of free blocks holding nothing reusable, lowest first
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # free and sealed, LRU first
        self._by_hash: dict[int, int] = {}  # hash -> sealed block id (held or free)
        self.touched: set[int] = set()  # blocks handed out at least once (their memory is in use)
        self._fresh: list[int] = []  # handed out for the first time since `take_fresh`

    # ---- counts ----------------------------------------------------------------------------------

    @property
    def usable(self) -> int:
        """Blocks sequences may hold: all but the scratch block."""
        return len(self.blocks) - 1

    @property
    def free(self) -> int:
        """Blocks a sequence can take now: never cached, or cached and evictable."""
        return len(self._clean) + len(self._cached)

    @property
    def cached_free(self) -> int:
        """Free blocks that still hold a sealed prefix."""
        return len(self._cached)

    @property
    def held(self) -> int:
        return self.usable - self.free

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    # ---- prefix lookup ---------------------------------------------------------------------------

    def match(self, token_ids: list[int], limit: int) -> list[int]:
        """Ids of the sealed blocks that hold the first full blocks of `token_ids`, at most `limit` blocks."""
        found, parent = [], None
        for index in range(min(limit, len(token_ids) // self.block_size)):
            ids = tuple(token_ids[index * self.block_size:(index + 1) * self.block_size])
            parent = chain_hash(parent, ids)
            block_id = self._by_hash.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != ids:
                break
            found.append(block_id)
        return found

    def fresh_needed(self, shared: list[int], positions: int) -> int:
        """Free blocks a table of `positions` positions takes when it starts with the blocks `shared`: its new
        blocks, plus the shared ones that are free now (taking them off the free list)."""
        return self.blocks_for(positions) - len(shared) + sum(1 for b in shared if self.blocks[b].ref_count == 0)

    # ---- holding and freeing ---------------------------------------------------------------------

    def allocate(self, shared: list[int], positions: int) -> list[int]:
        """A block table for `positions` positions, its first blocks `shared` (from `match`). The caller checked
        `fresh_needed` against `free`."""
        table = []
        for block_id in shared:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._cached[block_id]
            block.ref_count += 1
            table.append(block_id)
        while len(table) < self.blocks_for(positions):
            table.append(self._take())
        return table

    def fork(self, table: list[int], positions: int) -> tuple[list[int], tuple[int, int] | None]:
        """A second table holding the first `positions` positions of `table`: its full blocks shared, its last
        partly filled block (if any) replaced by a fresh one, returned with it as (source, destination) for the
        KV pool to copy. The caller checked that a block is free."""
        full = positions // self.block_size
        for block_id in table[:full]:
            self.blocks[block_id].ref_count += 1
        forked = table[:full]
        if positions % self.block_size == 0:
            return forked, None
        forked.append(self._take())
        return forked, (table[full], forked[-1])

    def grow(self, table: list[int], positions: int) -> None:
        """Append fresh blocks to `table` until it holds `positions` positions."""
        while len(table) < self.blocks_for(positions):
            table.append(self._take())

    def _take(self) -> int:
        if self._clean:
            block_id = heapq.heappop(self._clean)
        else:  # evict the least recently freed cached prefix
            block_id, _ = self._cached.popitem(last=False)
            self._forget(self.blocks[block_id])
        block = self.blocks[block_id]
        block.ref_count = 1
        if block_id not in self.touched:
            self.touched.add(block_id)
            self._fresh.append(block_id)
        return block_id

    def take_fresh(self) -> list[int]:
        """Blocks handed out for the first time since the last call: the KV pool zeroes them before use."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self._by_hash.get(block.hash) == block.id:
            del self._by_hash[block.hash]
        block.hash, block.token_ids = None, ()

    def release(self, table: list[int]) -> None:
        """`table`'s holder lets go. Blocks nobody holds are free; sealed ones stay findable until evicted. The
        last block is freed first, so that it is evicted before the prefix it continues."""
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.hash is not None:
                self._cached[block_id] = None
            else:
                heapq.heappush(self._clean, block_id)
        table.clear()

    def seal(self, table: list[int], token_ids: list[int], computed: int, sealed: int) -> int:
        """Seal the blocks of `table` whose positions are all computed (`computed` positions of `token_ids`),
        from block `sealed` on (those before are sealed already). Returns how many are sealed now."""
        size = self.block_size
        parent = self.blocks[table[sealed - 1]].hash if sealed else None
        for index in range(sealed, computed // size):
            block = self.blocks[table[index]]
            ids = tuple(token_ids[index * size:(index + 1) * size])
            if block.hash is None:  # a shared block is sealed already, by the same ids
                block.hash, block.token_ids = chain_hash(parent, ids), ids
                self._by_hash.setdefault(block.hash, block.id)
            parent = block.hash
        return max(sealed, computed // size)
