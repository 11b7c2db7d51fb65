"""The caching-allocator model against hand-computed cases of c10's rules, and its invariants."""

import random

import pytest

from cogbatch.dryrun.allocator import CachingAllocator, SimulatedOutOfMemory, round_size, segment_size

MiB = 2**20


def test_rounding_and_segment_sizes():
    assert [round_size(n) for n in (1, 511, 512, 513, 1536)] == [512, 512, 512, 1024, 1536]
    assert segment_size(512) == segment_size(MiB) == 2 * MiB  # small pool: 2 MiB segments
    assert segment_size(MiB + 512) == segment_size(10 * MiB - 512) == 20 * MiB  # large, below 10 MiB
    assert segment_size(10 * MiB) == 10 * MiB and segment_size(13 * MiB + 1) == 14 * MiB  # rounded to 2 MiB


def test_small_requests_share_a_2mib_segment():
    a = CachingAllocator()
    a.malloc(100)
    a.malloc(1000)
    assert (a.stats.allocated, a.stats.requested, a.stats.reserved, a.stats.segments) == (512 + 1024, 1100, 2 * MiB, 1)
    a.check_invariants()


def test_large_block_is_not_split_under_one_mib():
    """13.125 MiB takes a 14 MiB segment whole: 0.875 MiB left is not more than 1 MiB."""
    a = CachingAllocator()
    b = a.malloc(13 * MiB + MiB // 8)
    assert b.size == 14 * MiB and a.stats.allocated == 14 * MiB and a.stats.reserved == 14 * MiB


def test_split_best_fit_and_coalescing():
    a = CachingAllocator()
    x = a.malloc(5 * MiB)  # 20 MiB segment, split: 5 allocated + 15 free
    y = a.malloc(5 * MiB)  # best fit: the 15 MiB remainder, not a new segment
    assert a.stats.reserved == 20 * MiB and x.segment is y.segment and y.offset == 5 * MiB
    z = a.malloc(12 * MiB)  # 10 MiB free is too small: a 12 MiB segment
    assert a.stats.reserved == 32 * MiB and z.segment is not x.segment
    a.free(z)
    w = a.malloc(6 * MiB)  # free: 10 MiB (segment 1) and 12 MiB (segment 2): best fit is the 10 MiB one
    assert w.segment is x.segment
    a.free(x)
    a.free(w)
    a.free(y)  # merges with both neighbours: segment 1 is one free block again
    a.check_invariants()
    assert a.empty_cache() == 32 * MiB and a.stats.reserved == 0


def test_release_and_retry_then_out_of_memory():
    a = CachingAllocator(capacity=40 * MiB)
    a.free(a.malloc(24 * MiB))  # cached: 24 MiB reserved, none allocated
    a.malloc(30 * MiB)  # 24 + 30 > 40: the free segment is released, then 30 fits
    assert (a.stats.reserved, a.stats.releases, a.stats.out_of_memory) == (30 * MiB, 1, 0)
    a.malloc(16 * MiB)  # nothing to release: counted as out of memory (and allocated, to go on tracing)
    assert a.stats.out_of_memory == 1 and a.stats.oom_sizes == [16 * MiB] and a.stats.reserved == 46 * MiB
    strict = CachingAllocator(capacity=40 * MiB, raise_oom=True)
    strict.malloc(30 * MiB)
    with pytest.raises(SimulatedOutOfMemory):
        strict.malloc(16 * MiB)


def test_peaks_and_user_peak_reset():
    a = CachingAllocator()
    b = a.malloc(30 * MiB)
    a.free(b)
    assert a.stats.peak_allocated == a.user_peak_allocated == 30 * MiB
    a.reset_peak()
    assert a.user_peak_allocated == 0 and a.user_peak_reserved == 30 * MiB and a.stats.peak_allocated == 30 * MiB


def test_expandable_segments_grow_in_pages_and_unmap_whole_pages():
    a = CachingAllocator(expandable_segments=True)
    x = a.malloc(5 * MiB)  # one 20 MiB page mapped; 15 MiB free remain mapped
    y = a.malloc(30 * MiB)  # 15 free + one more page: contiguous after x
    assert a.stats.reserved == 40 * MiB and y.offset == 5 * MiB and a.stats.segments == 1
    a.free(x)
    assert a.empty_cache() == 0  # free ranges [0, 5) and [35, 40) MiB hold no whole page
    z = a.malloc(50 * MiB)  # from 35 MiB on: 5 mapped + 45 -> 60 MiB newly mapped
    assert a.stats.reserved == 100 * MiB and z.offset == 35 * MiB
    a.free(y)
    a.free(z)
    a.check_invariants()
    a.empty_cache()
    assert a.stats.reserved == 0 and a.stats.allocated == 0
    a.check_invariants()


@pytest.mark.parametrize("expandable", [False, True])
def test_random_sequences_keep_invariants(expandable):
    rng = random.Random(7)
    a = CachingAllocator(capacity=2**30, expandable_segments=expandable)
    live = []
    for step in range(1500):
        if live and rng.random() < 0.45:
            a.free(live.pop(rng.randrange(len(live))))
        else:
            live.append(
                a.malloc(rng.choice([rng.randint(1, 4096), rng.randint(1, 2 * MiB), rng.randint(1, 64 * MiB)]))
            )
        if step % 100 == 0:
            a.empty_cache()
        a.check_invariants()
    for b in live:
        a.free(b)
    a.empty_cache()
    a.check_invariants()
    assert a.stats.allocated == 0 and a.stats.requested == 0 and a.stats.reserved == 0
