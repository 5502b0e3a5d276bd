"""Paged KV blocks: allocation, reference counts, prefix caching by chained block hashes.

Pure Python with no clock and no I/O: the engine and the simulator drive the same object.
A block whose reference count drops to zero stays in the prefix cache (if it is full and
hashed) until it is reused for something else, least recently freed first.
"""
from __future__ import annotations

from collections import OrderedDict

from pdserve.engine.request import Sequence


def hash_block(parent: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    # Python's hash of an int tuple is stable across processes (no hash randomisation for ints).
    return hash((parent if parent is not None else -1, *tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # ref-count-zero blocks; allocation takes from the front (unhashed first, then LRU).
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0   # prompt tokens looked up in the cache
        self.prefix_hits = 0      # of which found

    # ---- accounting -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached-but-free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------
    def _prompt_hashes(self, seq: Sequence) -> list[int]:
        """Hashes of the full blocks of seq.token_ids, computed once and extended as it grows."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), len(seq.token_ids) // bs):
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def match_prefix(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Ids of cached blocks holding the longest prefix of seq (at most max_tokens tokens)."""
        if not self.enable_prefix_caching:
            return []
        bs, out = self.block_size, []
        for i, h in enumerate(self._prompt_hashes(seq)[: max_tokens // bs]):
            b = self.hash_to_block.get(h)
            if b is None or self.block_tokens[b] != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            out.append(b)
        return out

    # ---- allocation -------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Whether seq (holding no blocks yet) can take `cached` and room for num_new_tokens more."""
        need = self.blocks_for(len(cached) * self.block_size + num_new_tokens) - len(cached)
        revived = sum(1 for b in cached if self.ref_counts[b] == 0)
        return need + revived <= len(self.free_queue)

    def allocate(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> None:
        """First allocation for seq: take refs on its cached prefix, then fresh blocks."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        for b in cached:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
        seq.block_table = list(cached)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size
        self.prefix_queries += seq.num_prompt_tokens
        self.prefix_hits += seq.num_cached_tokens
        self.append_slots(seq, num_new_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free_queue)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to cover its computed tokens plus num_new_tokens."""
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self.free_queue):
            raise RuntimeError(f"out of KV blocks: need {need}, have {len(self.free_queue)}")
        for _ in range(need):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        b, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[b]
        if h is not None:  # evict from the prefix cache
            if self.hash_to_block.get(h) == b:
                del self.hash_to_block[h]
            self.block_hash[b] = self.block_tokens[b] = None
        self.ref_counts[b] = 1
        return b

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of seq's blocks that are full and whose KV is now computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        if n_full == 0 or self.block_hash[seq.block_table[n_full - 1]] is not None:
            return
        hashes = self._prompt_hashes(seq)
        for i in range(n_full - 1, -1, -1):  # walk back to the first already-committed block
            b = seq.block_table[i]
            if self.block_hash[b] is not None:
                break
            self.block_hash[b] = hashes[i]
            self.block_tokens[b] = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self.hash_to_block.setdefault(hashes[i], b)

    def free(self, seq: Sequence) -> None:
        """Drop seq's refs. Tail blocks are freed first so a shared prefix outlives its suffixes."""
        self._release(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = 0

    def _release(self, blocks) -> None:
        for b in blocks:
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None
                if self.block_hash[b] is None:  # worthless: reuse it first
                    self.free_queue.move_to_end(b, last=False)

    def pin(self, blocks: list[int]) -> None:
        """Take an extra reference on blocks (e.g. while a KV pull writes into them), so an
        abort of their request cannot hand them to someone else before the writer is done."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1

    def unpin(self, blocks: list[int]) -> None:
        self._release(blocks)

