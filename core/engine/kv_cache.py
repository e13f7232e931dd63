"""The paged KV cache's bookkeeping: block pool, block tables, refcounts, prefix cache, swap space."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

from tessera.core.config import CacheConfig
from tessera.core.engine.request import Request

logger = logging.getLogger(__name__)


class BlockHash(NamedTuple):
    """The identity of a full block: equal keys mean equal KV contents.

    The key holds the block's own tokens, so a lookup compares them exactly; the prefix is
    folded into `parent` (the Python hash of the parent block's key; None for the first block).
    Python's hash is only stable within one process, which is all the cache ever lives in.
    """

    parent: int | None
    token_ids: tuple[int, ...]
    extra_keys: tuple[object, ...]


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple[object, ...] = ()) -> BlockHash:
    return BlockHash(None if parent is None else hash(parent), tuple(token_ids), extra_keys)


class KVCacheManager:
    """Hands out fixed-size KV blocks to requests; shares identical full prefix blocks.

    Every block is either referenced by live requests (refcount > 0) or in the free queue.
    The free queue is ordered for eviction: blocks holding nothing worth keeping first, then
    cached blocks in least-recently-freed order. A cached block with refcount 0 keeps its hash
    until it is taken for new data, so a later request with the same prefix reuses it.

    Usage by the scheduler:
      admit:   blocks, n = get_computed_blocks(req); new = allocate_slots(req, k, blocks)
               (then req.num_computed_tokens = n)
      step:    new = allocate_slots(req, k)            # None: not enough free blocks
      after:   cache_computed_blocks(req, req.num_computed_tokens)
      finish:  free(req)
    """

    def __init__(self, cache_config: CacheConfig, num_blocks: int, num_swap_blocks: int = 0) -> None:
        assert num_blocks > 0 and num_swap_blocks >= 0
        self.block_size = cache_config.block_size
        self.num_blocks = num_blocks
        self.num_swap_blocks = num_swap_blocks
        self.enable_prefix_caching = cache_config.enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._block_hash: list[BlockHash | None] = [None] * num_blocks
        self._cached: dict[BlockHash, int] = {}  # full block identity -> device block
        self._tables: dict[str, list[int]] = {}  # request id -> device block table
        self._hashes: dict[str, list[BlockHash]] = {}  # request id -> hashes of its full blocks
        self._num_cached: dict[str, int] = {}  # request id -> its leading blocks already registered
        self._free_swap: list[int] = list(range(num_swap_blocks))
        self._swap_tables: dict[str, list[int]] = {}  # request id -> swap block table
        # prefix-cache counters, in tokens, counted once per admission
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take (including cached blocks no live request uses)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by live requests; 0 when no request holds blocks (the leak check)."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_free_swap_blocks(self) -> int:
        return len(self._free_swap)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's device block table (a copy; empty when it holds none)."""
        return list(self._tables.get(request_id, ()))

    # -- prefix cache --------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The cached blocks of the request's longest cached prefix, and the tokens they hold.

        Never covers the last token: the model must compute at least one position to produce
        logits to sample from. Requests asking for prompt logprobs get no hits (the cached
        positions would have no logits). Changes nothing; allocate_slots takes the blocks.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._request_hashes(request, max_blocks)
        blocks: list[int] = []
        for key in hashes[:max_blocks]:
            block = self._cached.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def cache_computed_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that became full within its first num_computed_tokens."""
        if not self.enable_prefix_caching:
            return
        table = self._tables.get(request.request_id)
        if table is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(table))
        start = self._num_cached.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._request_hashes(request, num_full)
        for i in range(start, num_full):
            block, key = table[i], hashes[i]
            # a block another request already registered with the same contents keeps that one
            if self._block_hash[block] is None and key not in self._cached:
                self._block_hash[block] = key
                self._cached[key] = block
        self._num_cached[request.request_id] = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every block hash (e.g. after new weights); blocks in use stay allocated."""
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        # unhashed free blocks are all equally cheap; keep them in the free queue as they are
        logger.info("prefix cache reset")

    def _request_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The hashes of the request's first num_blocks full blocks, extended lazily."""
        hashes = self._hashes.setdefault(request.request_id, [])
        if len(hashes) < num_blocks:
            tokens = request.all_token_ids
            size = self.block_size
            parent = hashes[-1] if hashes else None
            for i in range(len(hashes), num_blocks):
                parent = hash_block(parent, tokens[i * size : (i + 1) * size], request.cache_extra_keys)
                hashes.append(parent)
        return hashes

    # -- allocation ----------------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: Sequence[int] = ()
    ) -> list[int] | None:
        """Make room for num_new_tokens more tokens after the request's computed ones.

        computed_blocks (from get_computed_blocks) are only given when the request holds no
        blocks yet; they become the head of its table. Returns the newly allocated block ids
        (not the computed ones), or None if the free pool is too small (nothing changed).
        """
        request_id = request.request_id
        table = self._tables.get(request_id)
        assert not computed_blocks or (table is None and request.num_computed_tokens == 0), (
            "computed blocks are only taken at admission"
        )
        num_held = len(table) if table is not None else len(computed_blocks)
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_needed = max(0, self.num_blocks_for(num_tokens) - num_held)
        # cached blocks nobody references sit in the free queue; taking them shrinks it
        num_revived = sum(1 for b in computed_blocks if self._ref_counts[b] == 0)
        if num_needed > len(self._free) - num_revived:
            return None
        if table is None:
            table = self._tables[request_id] = []
            self._num_cached[request_id] = len(computed_blocks)
            if self.enable_prefix_caching:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += len(computed_blocks) * self.block_size
            for block in computed_blocks:
                if self._ref_counts[block] == 0:
                    del self._free[block]
                self._ref_counts[block] += 1
            table.extend(computed_blocks)
        new_blocks = [self._take_free_block() for _ in range(num_needed)]
        table.extend(new_blocks)
        return new_blocks

    def free(self, request: Request) -> None:
        """Release everything the request holds (device and swap blocks). Idempotent."""
        request_id = request.request_id
        self._release(self._tables.pop(request_id, []))
        self._free_swap.extend(self._swap_tables.pop(request_id, []))
        self._hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._block_hash[block]
        if key is not None:  # evict: its contents are about to be overwritten
            self._block_hash[block] = None
            if self._cached.get(key) == block:
                del self._cached[key]
        self._ref_counts[block] = 1
        return block

    def _release(self, table: list[int]) -> None:
        # tail blocks first: they are the least likely to be shared, so evict them first
        for block in reversed(table):
            self._ref_counts[block] -= 1
            assert self._ref_counts[block] >= 0, f"block {block} freed twice"
            if self._ref_counts[block] == 0:
                self._free[block] = None
                if self._block_hash[block] is None:  # holds nothing reusable: hand it out first
                    self._free.move_to_end(block, last=False)

    # -- swap ----------------------------------------------------------------------------------
    def can_swap_out(self, request: Request) -> bool:
        return len(self._tables.get(request.request_id, ())) <= len(self._free_swap)

    def swap_out(self, request: Request) -> list[tuple[int, int]] | None:
        """Move the request's blocks to swap space. Returns (device block, swap block) pairs to
        copy before the next forward, or None if swap space is too small (nothing changed)."""
        request_id = request.request_id
        if request_id not in self._tables or not self.can_swap_out(request):
            return None
        table = self._tables.pop(request_id)
        swap_blocks = [self._free_swap.pop() for _ in table]
        self._swap_tables[request_id] = swap_blocks
        self._release(table)
        # the new device blocks after swap-in get registered afresh from the kept hashes
        self._num_cached[request_id] = 0
        return list(zip(table, swap_blocks))

    def can_swap_in(self, request: Request, num_new_tokens: int = 0) -> bool:
        """Whether swap_in and then allocate_slots(request, num_new_tokens) would both succeed."""
        swap_table = self._swap_tables.get(request.request_id)
        if swap_table is None:
            return False
        num_tokens = request.num_computed_tokens + num_new_tokens
        return max(len(swap_table), self.num_blocks_for(num_tokens)) <= len(self._free)

    def swap_in(self, request: Request) -> list[tuple[int, int]] | None:
        """Bring a swapped-out request's blocks back. Returns (swap block, device block) pairs
        to copy before the next forward, or None if the free pool is too small."""
        request_id = request.request_id
        swap_table = self._swap_tables.get(request_id)
        if swap_table is None or len(swap_table) > len(self._free):
            return None
        del self._swap_tables[request_id]
        table = self._tables[request_id] = [self._take_free_block() for _ in swap_table]
        self._free_swap.extend(swap_table)
        self.cache_computed_blocks(request, request.num_computed_tokens)
        return list(zip(swap_table, table))
