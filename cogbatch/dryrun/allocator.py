"""A model of PyTorch's CUDA caching allocator, to say what `memory_reserved` a traced run would reach.

`torch.cuda.memory_allocated` counts blocks, not tensor bytes, and a card runs out when the
allocator's *segments* (what it took from the driver) pass its size, not when live tensors do. The
model follows c10/cuda/CUDACachingAllocator.cpp with its default settings (one stream, no
`max_split_size_mb`, no garbage-collection threshold):

* sizes round up to 512 B; requests of at most 1 MiB come from the small pool, whose segments are
  2 MiB; larger ones from the large pool, whose segments are 20 MiB below 10 MiB and the request
  rounded up to 2 MiB from there;
* a request takes the best-fitting free block of its pool (smallest size, then lowest address) and
  splits off the rest when at least 512 B (small pool) or more than 1 MiB (large pool) remain;
  a freed block merges with free neighbours of its segment;
* when a new segment would pass the card, every wholly free segment is released
  (`release_cached_blocks`) and the allocation is tried once more; if that fails too it is an
  out-of-memory error (counted, or raised when asked);
* `empty_cache` releases every wholly free segment.

With `expandable_segments` (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`) each pool is one
growing range of virtual addresses mapped in pages of 2 MiB (small) or 20 MiB (large): a request
that no free mapped block fits maps just enough pages after the lowest free range that can hold it,
any free remainder of 512 B or more is split off, and a release unmaps the whole pages inside free
blocks. The model leaves out the allocator's refinement that ranks an expandable block by the size
it could grow to.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MiB = 2**20
MIN_BLOCK = 512  # kMinBlockSize: every size is rounded up to a multiple of this
SMALL_SIZE = 1 * MiB  # kSmallSize: largest request served by the small pool
SMALL_BUFFER = 2 * MiB  # kSmallBuffer: small pool segment (and expandable page) size
MIN_LARGE_ALLOC = 10 * MiB  # kMinLargeAlloc: requests below it get a whole 20 MiB segment
ROUND_LARGE = 2 * MiB  # kRoundLarge: larger requests round up to a multiple of this
LARGE_BUFFER = 20 * MiB  # kLargeBuffer: large segment (and expandable page) size
_ADDRESS_SPACE = 1 << 50  # an expandable segment's virtual range: never the limit here


class SimulatedOutOfMemory(RuntimeError):
    """The modelled card has no room for an allocation even after releasing its cached segments."""


def round_size(nbytes: int) -> int:
    """Bytes a request of `nbytes` occupies in a block (512 B multiples, at least 512)."""
    return MIN_BLOCK if nbytes < MIN_BLOCK else -(-nbytes // MIN_BLOCK) * MIN_BLOCK


def segment_size(size: int) -> int:
    """Bytes of the segment a rounded request that no free block fits allocates (`get_allocation_size`)."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class _Segment:
    __slots__ = ("expandable", "id", "page", "size", "small")

    def __init__(self, sid: int, size: int, small: bool, expandable: bool) -> None:
        self.id, self.size, self.small, self.expandable = sid, size, small, expandable
        self.page = SMALL_BUFFER if small else LARGE_BUFFER


class Block:
    """A range of a segment; `mapped` is False only for unmapped address space of an expandable segment."""

    __slots__ = ("allocated", "mapped", "next", "offset", "prev", "requested", "segment", "size")

    def __init__(self, segment: _Segment, offset: int, size: int, mapped: bool = True) -> None:
        self.segment, self.offset, self.size, self.mapped = segment, offset, size, mapped
        self.allocated = False
        self.requested = 0
        self.prev: Block | None = None
        self.next: Block | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.size, self.segment.id, self.offset)

    def __repr__(self) -> str:
        state = "allocated" if self.allocated else ("free" if self.mapped else "unmapped")
        return f"Block(seg {self.segment.id}, +{self.offset}, {self.size} B, {state})"


class _FreeBlocks:
    """Free blocks ordered by (size, segment, offset): the first one not smaller than a request is the best fit."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, int]] = []
        self.blocks: dict[tuple[int, int, int], Block] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, b: Block) -> None:
        k = b.key()
        bisect.insort(self.keys, k)
        self.blocks[k] = b

    def remove(self, b: Block) -> None:
        k = b.key()
        i = bisect.bisect_left(self.keys, k)
        del self.keys[i]
        del self.blocks[k]

    def best_fit(self, size: int) -> Block | None:
        i = bisect.bisect_left(self.keys, (size, -1, -1))
        if i == len(self.keys):
            return None
        k = self.keys.pop(i)
        return self.blocks.pop(k)

    def __iter__(self):
        return iter(list(self.blocks.values()))


@dataclass
class AllocatorStats:
    """Counters of one model run; bytes are block bytes (what `torch.cuda` reports), `requested` exact."""

    allocated: int = 0
    reserved: int = 0
    requested: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    peak_requested: int = 0
    segments: int = 0
    allocations: int = 0
    releases: int = 0  # times cached segments were released to retry an allocation
    out_of_memory: int = 0  # allocations that did not fit even after that
    oom_sizes: list[int] = field(default_factory=list)


class CachingAllocator:
    """The device's memory as the caching allocator manages it; `capacity` None means an unbounded card."""

    def __init__(self, capacity: int | None = None, expandable_segments: bool = False, raise_oom: bool = False):
        self.capacity = capacity
        self.expandable = expandable_segments
        self.raise_oom = raise_oom
        self.stats = AllocatorStats()
        self.user_peak_allocated = 0  # torch.cuda.max_memory_allocated(): reset by reset_peak_memory_stats
        self.user_peak_reserved = 0
        self._pools = {True: _FreeBlocks(), False: _FreeBlocks()}
        self._segments: dict[int, _Segment] = {}
        self._heads: dict[int, Block] = {}  # first block of each segment
        self._expandable: dict[bool, _Segment] = {}
        self._unmapped: dict[bool, list[tuple[int, Block]]] = {True: [], False: []}  # (offset, block), sorted
        self._next_id = 0

    # -- public ---------------------------------------------------------------------------------

    @property
    def allocated(self) -> int:
        return self.stats.allocated

    @property
    def reserved(self) -> int:
        return self.stats.reserved

    def malloc(self, nbytes: int) -> Block:
        """A block for `nbytes` (> 0); may release cached segments, count or raise an out-of-memory error."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        b = self._pools[small].best_fit(size)
        if b is None:
            b = self._alloc_block(size, small)
        self._split(b, size)
        b.allocated = True
        b.requested = nbytes
        s = self.stats
        s.allocations += 1
        s.allocated += b.size
        s.requested += nbytes
        if s.allocated > s.peak_allocated:
            s.peak_allocated = s.allocated
        if s.allocated > self.user_peak_allocated:
            self.user_peak_allocated = s.allocated
        if s.requested > s.peak_requested:
            s.peak_requested = s.requested
        return b

    def free(self, b: Block) -> None:
        s = self.stats
        s.allocated -= b.size
        s.requested -= b.requested
        b.allocated = False
        b.requested = 0
        pool = self._pools[b.segment.small]
        b = self._merge(b, pool)
        pool.add(b)

    def empty_cache(self) -> int:
        """`torch.cuda.empty_cache()`: release what no live block uses; returns the bytes released."""
        return self._release_cached()

    def reset_peak(self) -> None:
        """`torch.cuda.reset_peak_memory_stats()`."""
        self.user_peak_allocated = self.stats.allocated
        self.user_peak_reserved = self.stats.reserved

    def segment_sizes(self) -> list[int]:
        """Mapped bytes per segment, largest first (for reports and tests)."""
        sizes = []
        for sid, head in self._heads.items():
            seg = self._segments[sid]
            if seg.expandable:
                mapped, b = 0, head
                while b is not None:
                    mapped += b.size if b.mapped else 0
                    b = b.next
                sizes.append(mapped)
            else:
                sizes.append(seg.size)
        return sorted(sizes, reverse=True)

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (blocks tile segments, counters add up,
        free neighbours are merged, the free lists hold exactly the free mapped blocks)."""
        allocated = mapped = 0
        free_keys = set()
        for sid, b in self._heads.items():
            seg = self._segments[sid]
            offset, prev = 0, None
            while b is not None:
                assert b.segment is seg and b.offset == offset and b.prev is prev and b.size > 0, b
                if prev is not None and not prev.allocated and not b.allocated:
                    assert prev.mapped != b.mapped, f"unmerged free neighbours {prev} {b}"
                if b.allocated:
                    assert b.mapped, b
                    allocated += b.size
                elif b.mapped:
                    free_keys.add((seg.small, b.key()))
                mapped += b.size if b.mapped else 0
                offset, prev, b = offset + b.size, b, b.next
            assert offset == seg.size, f"segment {sid}: blocks cover {offset} of {seg.size} B"
        assert allocated == self.stats.allocated, (allocated, self.stats.allocated)
        assert mapped == self.stats.reserved, (mapped, self.stats.reserved)
        pooled = {(small, k) for small, pool in self._pools.items() for k in pool.keys}
        assert pooled == free_keys, "free lists differ from the free blocks"
        assert self.stats.allocated <= self.stats.reserved

    # -- segments -------------------------------------------------------------------------------

    def _grow(self, nbytes: int) -> None:
        s = self.stats
        s.reserved += nbytes
        if s.reserved > s.peak_reserved:
            s.peak_reserved = s.reserved
        if s.reserved > self.user_peak_reserved:
            self.user_peak_reserved = s.reserved

    def _fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.stats.reserved + nbytes <= self.capacity

    def _alloc_block(self, size: int, small: bool) -> Block:
        """A new free block of at least `size` bytes: a new segment, or newly mapped pages of an expandable one."""
        cost = self._expand_cost(size, small) if self.expandable else segment_size(size)
        if not self._fits(cost):
            self.stats.releases += 1
            self._release_cached()
            if self.expandable:
                cost = self._expand_cost(size, small)
            if not self._fits(cost):
                self.stats.out_of_memory += 1
                self.stats.oom_sizes.append(size)
                if self.raise_oom:
                    raise SimulatedOutOfMemory(
                        f"simulated out of memory: {size} B requested, {self.stats.reserved} B reserved "
                        f"of {self.capacity} B"
                    )
        if self.expandable:
            return self._expand(size, small)
        seg = self._new_segment(segment_size(size), small, expandable=False)
        head = Block(seg, 0, seg.size)
        self._heads[seg.id] = head
        self._grow(seg.size)
        return head

    def _new_segment(self, size: int, small: bool, expandable: bool) -> _Segment:
        self._next_id += 1
        seg = _Segment(self._next_id, size, small, expandable)
        self._segments[seg.id] = seg
        self.stats.segments += 1
        return seg

    def _split(self, b: Block, size: int) -> None:
        remaining = b.size - size
        small_rule = b.segment.small or b.segment.expandable  # c10's should_split
        if not (remaining >= MIN_BLOCK if small_rule else remaining > SMALL_SIZE):
            return
        rest = Block(b.segment, b.offset + size, remaining)
        self._link_after(b, rest)
        b.size = size
        self._pools[b.segment.small].add(rest)

    @staticmethod
    def _link_after(b: Block, new: Block) -> None:
        new.prev, new.next = b, b.next
        if b.next is not None:
            b.next.prev = new
        b.next = new

    def _unlink(self, b: Block) -> None:
        if b.prev is not None:
            b.prev.next = b.next
        else:
            self._heads[b.segment.id] = b.next
        if b.next is not None:
            b.next.prev = b.prev

    def _merge(self, b: Block, pool: _FreeBlocks) -> Block:
        """Merge free block `b` (not in `pool`) with free neighbours in the same mapping state."""
        for nb in (b.prev, b.next):
            if nb is None or nb.allocated or nb.mapped != b.mapped:
                continue
            if nb.mapped:
                pool.remove(nb)
            else:
                self._remove_unmapped(nb)
            if nb is b.prev:
                nb.size += b.size
                self._unlink(b)
                b = nb
            else:
                b.size += nb.size
                self._unlink(nb)
        return b

    def _release_cached(self) -> int:
        released = 0
        for small in (True, False):
            pool = self._pools[small]
            for b in pool:
                if b.segment.expandable:
                    released += self._unmap_free(b, pool)
                elif b.prev is None and b.next is None:
                    pool.remove(b)
                    seg = b.segment
                    del self._segments[seg.id], self._heads[seg.id]
                    self.stats.reserved -= seg.size
                    released += seg.size
        return released

    # -- expandable segments --------------------------------------------------------------------

    def _add_unmapped(self, b: Block) -> None:
        bisect.insort(self._unmapped[b.segment.small], (b.offset, id(b), b))

    def _remove_unmapped(self, b: Block) -> None:
        lst = self._unmapped[b.segment.small]
        i = bisect.bisect_left(lst, (b.offset, id(b)))
        del lst[i]

    def _candidate(self, size: int, small: bool) -> Block:
        """The lowest free range that can hold `size`: an unmapped block, or the free mapped block just before it."""
        seg = self._expandable.get(small)
        if seg is None:
            seg = self._new_segment(_ADDRESS_SPACE, small, expandable=True)
            head = Block(seg, 0, seg.size, mapped=False)
            self._heads[seg.id] = head
            self._expandable[small] = seg
            self._add_unmapped(head)
        for _, _, c in self._unmapped[small]:
            if c.prev is not None and not c.prev.allocated:
                c = c.prev
            room, b = 0, c
            while room < size and b is not None and not b.allocated:
                room += b.size
                b = b.next
            if room >= size:
                return c
        raise AssertionError("an expandable segment always ends in unmapped space")

    def _expand_cost(self, size: int, small: bool) -> int:
        """Bytes that mapping room for `size` would add to what is reserved."""
        b = self._candidate(size, small)
        page = b.segment.page
        room = cost = 0
        while room < size:  # the walk `_expand` makes: map what the free range still lacks, page by page
            if b.mapped:
                room += b.size
            else:
                take = min(b.size, -(-(size - room) // page) * page)
                cost += take
                room += take
            b = b.next
        return cost

    def _expand(self, size: int, small: bool) -> Block:
        c = self._candidate(size, small)
        pool = self._pools[small]
        if not c.mapped:
            c = self._map(c, min(c.size, size), pool)
        while c.size < size:
            c = self._map(c.next, min(size - c.size, c.next.size), pool)
        pool.remove(c)
        return c

    def _map(self, b: Block, nbytes: int, pool: _FreeBlocks) -> Block:
        """Map whole pages at the start of unmapped block `b`; returns the merged free mapped block."""
        page = b.segment.page
        mapped = min(b.size, -(-nbytes // page) * page)
        self._remove_unmapped(b)
        if mapped < b.size:
            rest = Block(b.segment, b.offset + mapped, b.size - mapped, mapped=False)
            self._link_after(b, rest)
            self._add_unmapped(rest)
            b.size = mapped
        b.mapped = True
        self._grow(mapped)
        b = self._merge(b, pool)
        pool.add(b)
        return b

    def _unmap_free(self, b: Block, pool: _FreeBlocks) -> int:
        """Unmap the whole pages inside free mapped block `b`, keeping its partial pages mapped."""
        page = b.segment.page
        start = -(-b.offset // page) * page
        end = (b.offset + b.size) // page * page
        if end <= start:
            return 0
        pool.remove(b)
        head_size, tail_size = start - b.offset, b.offset + b.size - end
        middle = b
        if head_size:
            middle = Block(b.segment, start, b.size - head_size)
            self._link_after(b, middle)
            b.size = head_size
            pool.add(b)
        if tail_size:
            tail = Block(b.segment, end, tail_size)
            self._link_after(middle, tail)
            middle.size -= tail_size
            pool.add(tail)
        middle.mapped = False
        self.stats.reserved -= middle.size
        released = middle.size
        middle = self._merge(middle, pool)
        self._add_unmapped(middle)
        return released
