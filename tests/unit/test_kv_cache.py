"""KVCacheManager: block pool, refcounts, prefix caching, LRU eviction, swap bookkeeping."""

from __future__ import annotations

import itertools

from tessera.core.config import CacheConfig
from tessera.core.engine.kv_cache import KVCacheManager, hash_block
from tessera.core.engine.request import Request
from tessera.core.sampling_params import SamplingParams

BS = 8
_ids = itertools.count()


def make_request(tokens: list[int], extra: tuple[object, ...] = (), **params: object) -> Request:
    return Request(f"r{next(_ids)}", list(tokens), SamplingParams(**params), cache_extra_keys=extra)


def make_kv(num_blocks: int = 10, prefix: bool = True, swap: int = 0) -> KVCacheManager:
    return KVCacheManager(CacheConfig(block_size=BS, enable_prefix_caching=prefix), num_blocks, swap)


def admit(kv: KVCacheManager, request: Request) -> list[int]:
    """What the scheduler does for a whole prompt: take hits, allocate, compute, register."""
    blocks, num_cached = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_cached, blocks) is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_computed_blocks(request, request.num_computed_tokens)
    return kv.block_ids(request.request_id)


def test_allocate_grows_by_blocks_and_free_returns_them() -> None:
    kv = make_kv(10)
    req = make_request(list(range(10)))
    assert kv.allocate_slots(req, 10) == [0, 1]
    assert kv.num_used_blocks == 2 and kv.num_free_blocks == 8
    req.num_computed_tokens = 10
    assert kv.allocate_slots(req, 6) == []  # positions 10..15 fit in block 1
    req.num_computed_tokens = 16
    assert len(kv.allocate_slots(req, 1) or []) == 1  # position 16 opens a third block
    assert len(kv.block_ids(req.request_id)) == 3
    kv.free(req)
    kv.free(req)  # idempotent
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 10 and kv.usage == 0.0
    assert kv.block_ids(req.request_id) == []


def test_allocate_fails_without_changing_anything() -> None:
    kv = make_kv(3)
    a = make_request(list(range(16)))
    assert kv.allocate_slots(a, 16) is not None
    b = make_request(list(range(100, 117)))
    assert kv.allocate_slots(b, 17) is None  # needs 3, 1 free
    assert kv.num_used_blocks == 2 and kv.block_ids(b.request_id) == []
    assert kv.allocate_slots(b, 8) is not None


def test_prefix_hit_shares_blocks_with_refcounts() -> None:
    kv = make_kv(10)
    shared = list(range(2 * BS))
    a = make_request(shared + [900, 901, 902])
    a_blocks = admit(kv, a)
    b = make_request(shared + [700, 701])
    blocks, num_cached = kv.get_computed_blocks(b)
    assert blocks == a_blocks[:2] and num_cached == 2 * BS
    new = kv.allocate_slots(b, b.num_tokens - num_cached, blocks)
    assert new is not None and len(new) == 1 and new[0] not in a_blocks
    assert kv.block_ids(b.request_id) == a_blocks[:2] + new
    assert kv.num_used_blocks == 4  # 3 of a, 1 new of b
    kv.free(a)
    assert kv.num_used_blocks == 3  # the shared blocks stay referenced by b
    kv.free(b)
    assert kv.num_used_blocks == 0
    assert kv.prefix_cache_queries == a.num_tokens + b.num_tokens
    assert kv.prefix_cache_hits == 2 * BS


def test_cached_blocks_survive_free_and_are_revived() -> None:
    kv = make_kv(4)
    a = make_request(list(range(2 * BS + 1)))
    a_blocks = admit(kv, a)
    kv.free(a)
    assert kv.num_used_blocks == 0 and kv.num_cached_blocks == 2
    b = make_request(list(range(2 * BS + 3)))
    blocks, num_cached = kv.get_computed_blocks(b)
    assert blocks == a_blocks[:2] and num_cached == 2 * BS
    # 4 free blocks, 2 of them revived from the cache: 2 left for the new one(s)
    assert kv.allocate_slots(b, 3, blocks) is not None
    assert kv.num_used_blocks == 3 and kv.num_free_blocks == 1


def test_never_caches_the_whole_prompt() -> None:
    kv = make_kv(10)
    prompt = list(range(2 * BS))  # exactly two full blocks
    admit(kv, make_request(prompt))
    blocks, num_cached = kv.get_computed_blocks(make_request(prompt))
    assert len(blocks) == 1 and num_cached == BS  # the last token must be computed
    blocks, num_cached = kv.get_computed_blocks(make_request(prompt + [5]))
    assert len(blocks) == 2 and num_cached == 2 * BS


def test_hash_depends_on_tokens_parent_and_extra_keys() -> None:
    first = hash_block(None, range(BS))
    assert hash_block(None, range(BS)) == first
    assert hash_block(None, range(BS), ("lora-1",)) != first
    assert hash_block(None, range(1, BS + 1)) != first
    other_parent = hash_block(None, range(50, 50 + BS))
    assert hash_block(first, range(BS)) != hash_block(other_parent, range(BS))


def test_extra_keys_and_parent_prevent_false_hits() -> None:
    kv = make_kv(20)
    head, tail = list(range(BS)), list(range(100, 100 + BS))
    admit(kv, make_request(head + tail + [1], extra=("salt-a",)))
    assert kv.get_computed_blocks(make_request(head + tail + [1], extra=("salt-b",))) == ([], 0)
    assert kv.get_computed_blocks(make_request(head + tail + [1], extra=("salt-a",)))[1] == 2 * BS
    # the same second block after a different first block is a different block
    blocks, num_cached = kv.get_computed_blocks(make_request(list(range(200, 200 + BS)) + tail + [1]))
    assert (blocks, num_cached) == ([], 0)


def test_lru_eviction_evicts_least_recently_freed_first() -> None:
    kv = make_kv(6)
    prompts = [[i] * BS + [0] for i in (1, 2, 3)]  # one full block each, plus a tail block
    for prompt in prompts:
        r = make_request(prompt)
        admit(kv, r)
        kv.free(r)  # freed in the order 1, 2, 3
    assert kv.num_used_blocks == 0 and kv.num_cached_blocks == 3
    # the 3 unhashed tail blocks go first, then the cached blocks oldest-freed first
    filler = make_request(list(range(500, 500 + 4 * BS)))
    assert kv.allocate_slots(filler, 4 * BS) is not None
    hits = [kv.get_computed_blocks(make_request(p))[1] for p in prompts]
    assert hits == [0, BS, BS]
    kv.free(filler)
    filler2 = make_request(list(range(600, 600 + 5 * BS)))
    assert kv.allocate_slots(filler2, 5 * BS) is not None  # 4 unhashed + the older cached one
    hits = [kv.get_computed_blocks(make_request(p))[1] for p in prompts]
    assert hits == [0, 0, BS]


def test_reused_cached_block_is_not_evicted_while_in_use() -> None:
    kv = make_kv(3)
    prompt = [7] * BS + [1]
    a = make_request(prompt)
    admit(kv, a)
    kv.free(a)
    b = make_request(prompt)
    admit(kv, b)  # revives the cached block
    filler = make_request(list(range(BS)))
    assert kv.allocate_slots(filler, BS) is not None  # takes the last free block
    assert kv.allocate_slots(make_request([1]), 1) is None
    assert kv.get_computed_blocks(make_request(prompt))[1] == BS


def test_no_hits_without_prefix_caching_or_with_prompt_logprobs() -> None:
    kv = make_kv(10, prefix=False)
    prompt = list(range(3 * BS))
    admit(kv, make_request(prompt))
    assert kv.get_computed_blocks(make_request(prompt)) == ([], 0)
    assert kv.num_cached_blocks == 0
    kv = make_kv(10)
    admit(kv, make_request(prompt))
    assert kv.get_computed_blocks(make_request(prompt, prompt_logprobs=1)) == ([], 0)


def test_blocks_are_registered_as_computed_tokens_advance() -> None:
    kv = make_kv(10)
    prompt = list(range(3 * BS))
    a = make_request(prompt)
    assert kv.allocate_slots(a, BS + 3) is not None  # a chunk of one and a bit blocks
    a.num_computed_tokens = BS + 3
    kv.cache_computed_blocks(a, a.num_computed_tokens)
    assert kv.get_computed_blocks(make_request(prompt))[1] == BS
    assert kv.allocate_slots(a, 2 * BS - 3) is not None
    a.num_computed_tokens = 3 * BS
    kv.cache_computed_blocks(a, a.num_computed_tokens)
    assert kv.get_computed_blocks(make_request(prompt + [1]))[1] == 3 * BS


def test_reset_prefix_cache() -> None:
    kv = make_kv(10)
    prompt = list(range(2 * BS + 1))
    r = make_request(prompt)
    admit(kv, r)
    kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request(prompt)) == ([], 0)
    kv.free(r)
    assert kv.num_used_blocks == 0


def test_swap_out_and_in() -> None:
    kv = make_kv(4, swap=3)
    r = make_request(list(range(2 * BS + 2)))
    admit(kv, r)
    device_blocks = kv.block_ids(r.request_id)
    pairs = kv.swap_out(r)
    assert pairs is not None and [d for d, _ in pairs] == device_blocks
    assert kv.num_used_blocks == 0 and kv.num_free_swap_blocks == 0
    assert kv.block_ids(r.request_id) == []
    other = make_request(list(range(50, 50 + 3 * BS)))
    assert kv.allocate_slots(other, 3 * BS) is not None
    assert not kv.can_swap_in(r)
    kv.free(other)
    assert kv.can_swap_in(r, 1) and not kv.can_swap_in(r, 3 * BS)
    back = kv.swap_in(r)
    assert back is not None and [s for s, _ in back] == [s for _, s in pairs]
    assert [d for _, d in back] == kv.block_ids(r.request_id)
    assert kv.num_free_swap_blocks == 3 and kv.num_used_blocks == 3
    kv.free(r)
    assert kv.num_used_blocks == 0


def test_swapped_in_blocks_are_registered_again() -> None:
    kv = make_kv(3, swap=3)
    prompt = list(range(2 * BS + 1))
    r = make_request(prompt)
    admit(kv, r)
    assert kv.swap_out(r) is not None
    filler = make_request(list(range(100, 100 + 3 * BS)))
    assert kv.allocate_slots(filler, 3 * BS) is not None  # evicts r's cached device blocks
    kv.free(filler)
    assert kv.get_computed_blocks(make_request(prompt)) == ([], 0)
    assert kv.swap_in(r) is not None
    assert kv.get_computed_blocks(make_request(prompt)) == (kv.block_ids(r.request_id)[:2], 2 * BS)


def test_swap_out_fails_when_swap_space_is_short() -> None:
    kv = make_kv(4, swap=1)
    r = make_request(list(range(2 * BS)))
    admit(kv, r)
    assert not kv.can_swap_out(r)
    assert kv.swap_out(r) is None
    assert len(kv.block_ids(r.request_id)) == 2  # unchanged


def test_free_releases_swap_blocks() -> None:
    kv = make_kv(4, swap=4)
    r = make_request(list(range(BS + 1)))
    admit(kv, r)
    assert kv.swap_out(r) is not None
    kv.free(r)
    assert kv.num_free_swap_blocks == 4 and kv.num_used_blocks == 0
