"""A first quantized load: the checkpoint streamed through worker threads into the model's final tensors.

Every checkpoint tensor becomes a builder (`builders`: TinyGemm's CPU layout, quanto's portable one,
int8, or a plain cast) whose row blocks go, in file order, to a pool of threads. Each worker reads
its block straight from the memory-mapped shard (the page cache, or the disk behind it) and
quantizes it with its own scratch buffers; torch ops release the GIL, so reading one block overlaps
quantizing another and every core is busy. Measured on the 2-core machine (docs/performance.md): a
dedicated reader thread would idle, since reading and casting is about a fifth of a block's work.

Workers run their ops single-threaded (`torch.set_num_threads(1)` for the duration): the pool is the
parallelism, and nested OpenMP teams on a busy machine spin (quanto's quantization of one weight
measured 6x slower with two threads than with one on the loaded 2-core VM). On CUDA one worker feeds
the GPU, which quantizes as tensors arrive.

Peak memory stays the finished model plus a few MB per worker: builders allocate only final tensors,
and a block's temporaries live in the worker's scratch space.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import nn

from cogbatch.model.quant.builders import Builder, CastBuilder, linear_builder
from cogbatch.model.quant.quantizer import Timings
from cogbatch.model.quant.skeleton import assign_quantized, assign_tensor
from cogbatch.model.quant.stfile import MappedFile
from cogbatch.model.weights import DERIVED_SUFFIXES

if TYPE_CHECKING:
    from cogbatch.model.quant.loader import QuantizedLoad


def make_pool(workers: int) -> Executor:
    """The pool that runs one load's row blocks. A module-level function so that a caller can swap in an
    executor of its own: the dry run's dispatch modes are per thread, so it runs every block on the
    loading thread (pool threads would escape its tracing)."""
    return ThreadPoolExecutor(workers, "cogbatch-quantize")


def worker_count(device: torch.device) -> int:
    """CPU: torch's intra-op thread count (the user's, or one per core); CUDA: one thread feeding the GPU."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


@contextlib.contextmanager
def _single_threaded_ops(active: bool) -> Iterator[None]:
    before = torch.get_num_threads()
    if active and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def stream_quantize(load: QuantizedLoad, model: nn.Module) -> dict[str, float]:
    """Fill `model` (the quantized skeleton on meta) from the checkpoint; returns seconds per phase,
    summed over the worker threads (read, quantize, pack)."""
    workers = worker_count(load.device)
    timings: list[Timings] = []
    local = threading.local()

    def run(builder: Builder, src: torch.Tensor, a: int, b: int) -> None:
        times = getattr(local, "times", None)
        if times is None:
            times = local.times = Timings()
            timings.append(times)
        builder.fill(src, a, b, times)

    pending: deque[tuple[Callable[[], None], list[Future], int]] = deque()
    load.tracker.reading("checkpoint", sum(f.stat().st_size for f in load.files))

    def finish_done(block: bool) -> None:
        """Hand finished tensors to the model in file order, counting their bytes as read (the caller's
        progress, on this thread); with `block`, wait for all of them."""
        while pending and (block or all(f.done() for f in pending[0][1])):
            done, futures, nbytes = pending.popleft()
            for f in futures:
                f.result()  # a worker's exception surfaces here
            done()
            load.tracker.read(nbytes)

    # the workers' scratch buffers are thread-local: they go when the pool's threads end with the load
    with _single_threaded_ops(load.device.type == "cpu"), make_pool(workers) as pool:
        try:
            for name, src in _checkpoint_tensors(load):
                builder, done = _builder_for(load, model, name, tuple(src.shape))
                futures = [pool.submit(run, builder, src, a, b) for a, b in builder.blocks()]
                pending.append((done, futures, src.numel() * src.element_size()))
                finish_done(block=False)
            finish_done(block=True)
        except BaseException:
            for _, futures, _ in pending:
                for f in futures:
                    f.cancel()
            raise
    return {
        "read": sum(t.read for t in timings),
        "quantize": sum(t.quantize for t in timings),
        "pack": sum(t.pack for t in timings),
    }


def _checkpoint_tensors(load: QuantizedLoad) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, view of the shard) for every tensor to load, in file order; the next one's pages are
    requested ahead (`will_need`), so that a checkpoint not in the page cache is read while we compute."""
    for path in load.files:
        shard = MappedFile(path)
        names = [n for n in shard.names() if not n.endswith(DERIVED_SUFFIXES)]
        for i, name in enumerate(names):
            if i + 1 < len(names):
                shard.will_need(names[i + 1])
            yield name, shard.tensor(name, align=shard.info(name)[1].itemsize)


def _builder_for(load: QuantizedLoad, model: nn.Module, name: str, shape: tuple[int, ...]):
    """(builder, what to do with its result) for one checkpoint tensor."""
    module_name, _, leaf = name.rpartition(".")
    lp = load.plan.get(module_name)
    if lp is not None and leaf == "weight":
        builder = linear_builder(lp, load.kernels[module_name], shape, load.dtype, load.device)

        def done() -> None:
            module = model.get_submodule(module_name)
            assign_quantized(module, builder.finish(), load.dtype, load.device)
            load.park(module_name, module)  # a parked module's device copy goes as soon as it is made

        return builder, done
    builder = CastBuilder(shape, load.dtype, load.home(name))
    return builder, lambda: assign_tensor(model, name, builder.finish())
