"""BlockManager: allocation, reference counts, prefix caching, LRU eviction."""
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import SamplingParams, Sequence


def seq(rid, tokens):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=4))


def compute_all(bm, s):
    """Allocate s with whatever the cache holds and mark its prompt computed."""
    cached = bm.match_prefix(s, s.num_tokens - 1)
    bm.allocate(s, cached, s.num_tokens - len(cached) * bm.block_size)
    s.num_computed_tokens = s.num_tokens
    bm.commit(s)
    return cached


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(8, 4)
    a = seq("a", range(10))
    compute_all(bm, a)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(a)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(16, 4)
    a, b = seq("a", range(13)), seq("b", list(range(12)) + [99, 98])
    compute_all(bm, a)
    cached = compute_all(bm, b)
    assert cached == a.block_table[:3]          # three full blocks shared
    assert b.num_cached_tokens == 12
    assert all(bm.ref_counts[x] == 2 for x in cached)
    bm.free(a)
    assert all(bm.ref_counts[x] == 1 for x in cached)
    bm.free(b)
    assert bm.num_free_blocks == 16
    assert bm.prefix_hits == 12 and bm.prefix_queries == 27


def test_full_prompt_hit_still_computes_last_token():
    bm = BlockManager(16, 4)
    a = seq("a", range(8))
    compute_all(bm, a)
    bm.free(a)
    b = seq("b", range(8))
    cached = bm.match_prefix(b, b.num_tokens - 1)
    assert len(cached) == 1  # 7 tokens may be reused: only the first full block


def test_freed_cached_blocks_survive_until_reused_lru():
    bm = BlockManager(4, 4)
    a = seq("a", range(9))            # 2 full blocks + 1 partial
    compute_all(bm, a)
    first, second = a.block_table[:2]
    bm.free(a)
    assert len(bm.hash_to_block) == 2
    compute_all(bm, seq("c", range(100, 105)))  # 2 blocks: the unhashed ones go first
    assert len(bm.hash_to_block) == 3           # a's two + c's full block
    compute_all(bm, seq("d", [7]))              # 1 more: evicts a's tail before its head
    assert bm.block_hash[second] is None and bm.hash_to_block[bm.block_hash[first]] == first
    assert bm.match_prefix(seq("b", range(9)), 8) == [first]


def test_eviction_removes_hash_and_mismatched_tokens_do_not_hit():
    bm = BlockManager(2, 4)
    a = seq("a", range(8))
    compute_all(bm, a)
    bm.free(a)
    c = seq("c", range(50, 58))
    compute_all(bm, c)  # reuses both blocks: a's hashes are evicted
    assert bm.match_prefix(seq("b", range(8)), 8) == []


def test_can_allocate_counts_revived_cached_blocks():
    bm = BlockManager(3, 4)
    a = seq("a", range(8))
    compute_all(bm, a)
    bm.free(a)
    b = seq("b", list(range(8)) + [7, 7, 7, 7, 7])
    cached = bm.match_prefix(b, b.num_tokens - 1)
    assert len(cached) == 2
    assert bm.can_allocate(b, cached, 4)        # 12 tokens: 2 revived + 1 new block = 3 free
    assert not bm.can_allocate(b, cached, 5)    # 13 tokens need a 4th block


def test_pinned_blocks_outlive_their_request():
    bm = BlockManager(4, 4)
    a = seq("a", range(8))
    compute_all(bm, a)
    blocks = list(a.block_table)
    bm.pin(blocks)          # a writer still fills them
    bm.free(a)              # the request is aborted meanwhile
    assert bm.num_free_blocks == 2
    bm.unpin(blocks)
    assert bm.num_free_blocks == 4
