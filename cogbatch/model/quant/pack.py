"""Quantized weights as bytes: block-wise quantization, quanto's portable packing, TinyGemm's CPU layout.

Everything here turns rows of a float weight into quanto weight tensors, or one quanto layout into
another, a block of rows at a time, bit-identical to what quanto computes for the whole tensor
(QUANTO_NOTES: its own repack converts a whole layer to int32 codes first; converting TinyGemm back
costs an O(K^2 N) identity matmul). Importing it also registers a pure-PyTorch `unpack` in place of
quanto's JIT-compiled C++/CUDA ones, so that loading never needs a compiler.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from optimum.quanto import qint4, qint8
from optimum.quanto.tensor import AbsmaxOptimizer, MaxOptimizer, QTensor, WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.packed import PackedTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor

log = logging.getLogger("cogbatch.model.quantize")

# Elements of a weight quantized per step: quantization makes ~8 temporaries of a block, so blocks stay
# small (the transient memory of a load is a few MB). Repacking (uint8 only, two temporaries) takes bigger ones.
CHUNK_ELEMENTS = 1 << 19
REPACK_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# pure-PyTorch unpack


def unpack_pure(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's `unpack` (uint8 holding 8/bits values, packed along dim 0) in plain tensor ops.

    Same result as quanto's Python reference and its C++ extension: value i of each byte is
    `(byte >> bits*i) & mask`, and the i-th slice goes to rows [i*R, (i+1)*R).
    """
    if bits not in (2, 4):
        raise ValueError(f"can only unpack 2-bit or 4-bit values, got bits={bits}")
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (bits * i)) & mask for i in range(8 // bits)]).to(torch.uint8)


_UNPACK_LIB: torch.library.Library | None = None


def install_pure_unpack() -> None:
    """Replace quanto's CPU (and CUDA) `unpack` kernels, which JIT-compile C++/CUDA on first use.

    A reload (`optimize()`) and every call of the int4 fallback path unpack; with this, loading never
    needs g++/ninja/nvcc and never writes into site-packages. Idempotent.
    """
    global _UNPACK_LIB
    if _UNPACK_LIB is not None:
        return
    lib = torch.library.Library("quanto", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        for key in ("CPU", "CUDA"):
            lib.impl("unpack", unpack_pure, key, allow_override=True)
    _UNPACK_LIB = lib  # the registration lives as long as the Library object


install_pure_unpack()


# --------------------------------------------------------------------------------------------
# TinyGemm's CPU packing


_CPU_LAYOUTS = ((64, "halves"), (32, "halves"), (32, "pairs"))
_cpu_layout_cache: dict[str, tuple[int, str] | None] = {}


def _decode_tinygemm_cpu(packed: torch.Tensor, n: int, k: int, block: int, mode: str) -> torch.Tensor:
    """uint8 codes (n, k) from `_convert_weight_to_int4pack_for_cpu`'s layout.

    Rows come in blocks of `block` (64 with AVX-512, 32 otherwise); per block and input column there
    are block/2 bytes. "halves": byte j holds rows j (low nibble) and j + block/2 (high); "pairs"
    (no vector ISA, and the last partial block): rows 2j and 2j+1.
    """
    flat = packed.reshape(-1)
    full = n // block
    cut = full * block * k // 2
    parts = []
    if full:
        lo, hi = (flat[:cut] & 0x0F).view(full, k, block // 2), (flat[:cut] >> 4).view(full, k, block // 2)
        blk = torch.cat([lo, hi], 2) if mode == "halves" else torch.stack([lo, hi], 3).reshape(full, k, block)
        parts.append(blk.transpose(1, 2).reshape(full * block, k))  # (n_full, k)
    rest = n - full * block
    if rest:
        lo, hi = (flat[cut:] & 0x0F).view(k, rest // 2), (flat[cut:] >> 4).view(k, rest // 2)
        parts.append(torch.stack([lo, hi], 2).reshape(k, rest).t())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _encode_tinygemm_cpu(codes: torch.Tensor, block: int, mode: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of `_decode_tinygemm_cpu`: (n, k) codes -> (n, k/2) bytes in torch's CPU int4 layout.

    Plain uint8 tensor ops (torch's packer wants int32 codes: 4 B/param of the layer); full blocks
    are transposed into `out` directly.
    """
    n, k = codes.shape
    out = torch.empty((n, k // 2), dtype=torch.uint8, device=codes.device) if out is None else out
    flat = out.view(-1)
    full = n // block
    cut = full * block * k // 2
    if full:
        c = codes[: full * block].view(full, block, k)
        lo, hi = (c[:, : block // 2], c[:, block // 2 :]) if mode == "halves" else (c[:, 0::2], c[:, 1::2])
        _transpose_bytes(lo | (hi << 4), flat[:cut].view(full, k, block // 2))
    rest = n - full * block
    if rest:
        c = codes[full * block :]
        flat[cut:].view(k, rest // 2).copy_((c[0::2] | (c[1::2] << 4)).t())
    return out


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # every byte's low nibble, in an int64 lane
_HIGH_NIBBLES = ~_LOW_NIBBLES


def _portable_to_tinygemm_cpu(p: torch.Tensor, out_lo: torch.Tensor, out_hi: torch.Tensor, block: int, mode: str):
    """Both TinyGemm row blocks encoded in a block of portable bytes, without unpacking the codes.

    `p` (rows, k) holds row r of the first half in its low nibbles and row r + n/2 in its high ones;
    rows is a multiple of `block`. A TinyGemm byte pairs two rows of one half, so it is
    (x & 0xF) | (y << 4) for the first half and (x >> 4) | (y & 0xF0) for the second: computed on
    int64 lanes (8 bytes per element; the masks keep nibbles from crossing bytes), then transposed
    into TinyGemm's column-major blocks.
    """
    rows, k = p.shape
    nb = rows // block
    c = p.view(nb, block, k)
    x, y = (c[:, : block // 2], c[:, block // 2 :]) if mode == "halves" else (c[:, 0::2], c[:, 1::2])
    x, y = x.view(torch.int64), y.view(torch.int64)  # rows stay contiguous: (nb, block/2, k/8)
    lo = ((x & _LOW_NIBBLES) | ((y & _LOW_NIBBLES) << 4)).view(torch.uint8)
    _transpose_bytes(lo.view(nb, block // 2, k), out_lo.view(nb, k, block // 2))
    del lo
    hi = (((x >> 4) & _LOW_NIBBLES) | (y & _HIGH_NIBBLES)).view(torch.uint8)
    _transpose_bytes(hi.view(nb, block // 2, k), out_hi.view(nb, k, block // 2))


def _transpose_bytes(src: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, c, j] = src[b, j, c] for uint8 (nb, m, k) -> (nb, k, m), m % 4 == 0, `out` contiguous.

    Moved as int32 words of 4 rows (little-endian: byte r of a word is row 4q + r): a byte-wise strided
    copy reads 32 rows k bytes apart, which at power-of-two k (4096) hits cache-set conflicts and runs
    ~5x slower (measured 1.9 against 0.35 ms per MB at k=4096, 1 thread). Same bytes either way.
    """
    nb, m, k = src.shape
    if sys.byteorder != "little" or m % 4:
        out.copy_(src.transpose(1, 2))
        return
    rows = src.view(nb, m // 4, 4, k)
    words = rows[:, :, 0].to(torch.int32)  # (nb, m/4, k)
    part = torch.empty_like(words)
    for r in (1, 2, 3):
        part.copy_(rows[:, :, r])
        words |= part.bitwise_left_shift_(8 * r)
    out.view(torch.int32).copy_(words.transpose(1, 2))  # (nb, k, m/4)


def tinygemm_cpu_layout() -> tuple[int, str] | None:
    """(block, mode) of this torch build's CPU int4 packing, found by packing a random probe with torch.

    The layout depends on the CPU's vector ISA (torch's int4mm kernel). If neither our decoder nor our
    encoder reproduces torch's packer exactly, the direct paths are disabled (quanto's slower,
    layout-agnostic code is used and dynamic dequantization is off) rather than risking wrong weights.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in _cpu_layout_cache:
        gen = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 16, (208, 64), generator=gen, dtype=torch.int32)  # 3 blocks of 64 + 16 rows
        packed = torch._convert_weight_to_int4pack_for_cpu(probe, innerKTiles=2)
        codes = probe.to(torch.uint8)
        found = None
        for block, mode in _CPU_LAYOUTS:
            if torch.equal(_decode_tinygemm_cpu(packed, 208, 64, block, mode), codes) and torch.equal(
                _encode_tinygemm_cpu(codes, block, mode), packed
            ):
                found = (block, mode)
                break
        if found is None:
            log.warning("unknown TinyGemm CPU packing (%s): direct repack and dynamic dequant disabled", cap)
        _cpu_layout_cache[cap] = found
    return _cpu_layout_cache[cap]


def tinygemm_tensor(
    data: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, shape: tuple[int, int], group: int
) -> TinyGemmWeightQBitsTensor:
    """A TinyGemm weight from packed data and quanto's (scale, shift), formatted exactly as its constructor does."""
    n, k = shape
    scale_shift = torch.empty((k // group, n, 2), dtype=scale.dtype, device=scale.device)
    scale_shift[:, :, 0] = scale.view(n, k // group).t()
    # The kernel wants the mid-point of the range: -shift + 8 * scale, one rounding as in quanto's two ops.
    scale_shift[:, :, 1] = torch.add(-shift, scale, alpha=2 ** (qint4.bits - 1)).view(n, k // group).t()
    packed = TinyGemmPackedTensor(data, (n, k), (k, 1))
    return TinyGemmWeightQBitsTensor(qint4, 0, group, (n, k), (k, 1), packed, scale_shift)


# --------------------------------------------------------------------------------------------
# quantizing a weight a block of rows at a time


def _chunk_rows(n_rows: int, row_len: int, align: int = 64, elements: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, stop) row blocks of about `elements` (CHUNK_ELEMENTS), `align`-aligned, never a last block of one row.

    A single-row block would make quanto treat it per-tensor (axis=None): different shapes.
    """
    step = max(align, ((elements or CHUNK_ELEMENTS) // max(row_len, 1)) // align * align)
    start = 0
    while start < n_rows:
        stop = min(n_rows, start + step)
        if 0 < n_rows - stop < 2:
            stop = n_rows
        yield start, stop
        start = stop


def _quantize_block_int4(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, shift) of a block of rows, exactly as QModuleMixin.qweight + quantize_weight compute them."""
    s, z = MaxOptimizer()(w, qtype=qint4, axis=0, group_size=group_size)
    codes = torch.ops.quanto.quantize_affine(w, bits=4, axis=0, group_size=group_size, scale=s, shift=z)
    return codes, s.view(-1, 1), z.view(-1, 1)


def quantize_int4_rows(
    read_rows: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int],
    group_size: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> WeightQBitsTensor:
    """A portable (kernel-agnostic) int4 weight, quantized block by block.

    `read_rows(a, b)` returns rows [a, b) in the compute dtype on `device`. Groups run along the
    input dimension, so a block's codes, scales and shifts are those of the whole-tensor
    quantization. quanto packs grouped row r with row r + ceil(R/2) into one byte; the packed buffer
    is filled in place.
    """
    n, k = shape
    gs = group_size or k
    per_row = k // gs
    total = n * per_row
    half = (total + 1) // 2
    packed = torch.zeros((half, gs), dtype=torch.uint8, device=device)
    scale = torch.empty((total, 1), dtype=dtype, device=device)
    shift = torch.empty((total, 1), dtype=dtype, device=device)
    for n0, n1 in _chunk_rows(n, k):
        r0, r1 = n0 * per_row, n1 * per_row
        codes, scale[r0:r1], shift[r0:r1] = _quantize_block_int4(read_rows(n0, n1), group_size)
        low_end = min(r1, half)
        if r0 < low_end:
            packed[r0:low_end] |= codes[: low_end - r0]
        if r1 > half:
            start = max(r0, half)
            packed[start - half : r1 - half] |= codes[start - r0 :] << 4
    data = PackedTensor(packed, 4, (total, gs), (gs, 1))
    return WeightQBitsTensor(qint4, 0, group_size, (n, k), (k, 1), data, scale, shift)


def direct_tinygemm_layout(
    shape: tuple[int, ...], group_size: int | None, dtype: torch.dtype, device: torch.device
) -> tuple[int, str] | None:
    """The CPU layout when a weight can go straight to TinyGemm block by block (bf16, group 128, rows % 128 == 0).

    Rows % 128 keeps both halves that quanto's portable packing pairs aligned to TinyGemm's row blocks.
    """
    if device.type != "cpu" or dtype != torch.bfloat16 or group_size != 128 or len(shape) != 2 or shape[0] % 128:
        return None
    return tinygemm_cpu_layout()


def quantize_int4_tinygemm_cpu(
    read_rows: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int],
    dtype: torch.dtype,
    layout: tuple[int, str],
    on_packed: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[TinyGemmWeightQBitsTensor, torch.Tensor, torch.Tensor]:
    """Quantize straight into TinyGemm's CPU layout: (weight, scale, shift), never a second copy of the layer.

    Row blocks [a, b) and [a + n/2, b + n/2) are quantized together: their codes are the low and high
    nibbles of rows [a, b) of quanto's portable packing, which `on_packed(first_grouped_row, bytes)`
    receives for the cache, and each is encoded into its rows of the TinyGemm buffer.
    """
    n, k = shape
    per_row, h = k // 128, n // 2
    data = torch.empty((n, k // 2), dtype=torch.uint8)
    scale = torch.empty((n * per_row, 1), dtype=dtype)
    shift = torch.empty((n * per_row, 1), dtype=dtype)
    for a, b in _chunk_rows(h, 2 * k):
        codes = []
        for lo in (a, a + h):
            r0, r1 = lo * per_row, (lo + b - a) * per_row
            c, scale[r0:r1], shift[r0:r1] = _quantize_block_int4(read_rows(lo, lo + b - a), 128)
            codes.append(c)
        portable = codes[0] | (codes[1] << 4)  # (rows * per_row, 128): quanto's packing of these rows
        del codes
        if on_packed is not None:
            on_packed(a * per_row, portable)
        _portable_to_tinygemm_cpu(portable.view(b - a, k), data[a:b], data[a + h : b + h], *layout)
    return tinygemm_tensor(data, scale, shift, (n, k), 128), scale, shift


def tinygemm_repack_blocks(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Grouped-row ranges [r0, r1) of the portable packing that `tinygemm_data_from_portable_cpu` reads, in order."""
    n, k = shape
    per_row = k // 128
    return [(a * per_row, b * per_row) for a, b in _chunk_rows(n // 2, 2 * k, elements=REPACK_CHUNK_ELEMENTS)]


def tinygemm_data_from_portable_cpu(
    read_packed: Callable[[int, int], torch.Tensor], shape: tuple[int, int], layout: tuple[int, str]
) -> torch.Tensor:
    """TinyGemm's CPU bytes from quanto's portable packing, read a block of packed rows at a time.

    `read_packed(r0, r1)` returns grouped rows [r0, r1): low nibbles are output rows a.., high ones
    rows a + n/2.. (the blocks of `tinygemm_repack_blocks`).
    """
    n, k = shape
    per_row, h = k // 128, n // 2
    data = torch.empty((n, k // 2), dtype=torch.uint8)
    for r0, r1 in tinygemm_repack_blocks(shape):
        a, b = r0 // per_row, r1 // per_row
        p = read_packed(r0, r1)  # (rows * per_row, 128)
        _portable_to_tinygemm_cpu(p.reshape(b - a, k), data[a:b], data[a + h : b + h], *layout)
    return data


def tinygemm_from_portable_cpu(
    read_packed: Callable[[int, int], torch.Tensor],
    scale: torch.Tensor,
    shift: torch.Tensor,
    shape: tuple[int, int],
    layout: tuple[int, str],
) -> TinyGemmWeightQBitsTensor:
    """A TinyGemm weight from quanto's portable packing (see `tinygemm_data_from_portable_cpu`)."""
    return tinygemm_tensor(tinygemm_data_from_portable_cpu(read_packed, shape, layout), scale, shift, shape, 128)


def quantize_int8_rows(
    read_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> WeightQBytesTensor:
    """A per-row symmetric int8 weight (quanto's AbsmaxOptimizer), quantized block by block."""
    n, k = shape
    data = torch.empty((n, k), dtype=torch.int8, device=device)
    scale = torch.empty((n, 1), dtype=dtype, device=device)
    optimizer = AbsmaxOptimizer()
    for n0, n1 in _chunk_rows(n, k):
        w = read_rows(n0, n1)
        s = optimizer(w, qtype=qint8, axis=0)
        data[n0:n1] = torch.ops.quanto.quantize_symmetric(w, dtype=torch.int8, axis=0, scale=s)
        scale[n0:n1] = s
    return WeightQBytesTensor(qint8, 0, (n, k), (k, 1), data, scale, None)


def _tinygemm_target(w: WeightQBitsTensor) -> bool:
    """Whether quanto's `WeightQBitsTensor.create` would choose TinyGemm (its test, plus the CPU packer's N % 16).

    Without the N % 16 check quanto crashes in `_convert_weight_to_int4pack_for_cpu`; we keep the
    fallback layout instead.
    """
    if not (w.qtype == qint4 and w.axis == 0 and w._group_size == 128 and w.ndim == 2):
        return False
    if w._scale.dtype != torch.bfloat16:
        return False
    dev = w._data.device
    if dev.type == "cpu":
        return w.shape[0] % 16 == 0
    if dev.type == "cuda" and torch.version.cuda:
        major, minor = (int(x) for x in torch.version.cuda.split(".")[:2])
        return (major, minor) >= (12, 1) and torch.cuda.get_device_capability(dev)[0] >= 8
    return False


def _nibbles(packed: torch.Tensor, r0: int, r1: int, half: int) -> torch.Tensor:
    """Unpacked 4-bit codes of grouped rows [r0, r1) of a portable PackedTensor's buffer."""
    parts = []
    low_end = min(r1, half)
    if r0 < low_end:
        parts.append(packed[r0:low_end] & 0x0F)
    if r1 > half:
        start = max(r0, half)
        parts.append(packed[start - half : r1 - half] >> 4)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _to_tinygemm(w: WeightQBitsTensor) -> TinyGemmWeightQBitsTensor:
    """Repack a portable int4 weight for TinyGemm block by block.

    quanto's own repack (`optimize()`) converts all codes to int32 first: 4 B/param of the layer at
    once, 2.6 GB for CogVLM2's lm_head. TinyGemm's packing is local to blocks of output rows on CPU
    and CUDA, so blocks are packed separately: on CPU with our encoder, elsewhere with quanto's
    constructor (whose CUDA layout we do not reimplement).
    """
    n, k = w.shape
    g = w._group_size
    packed = w._data._data
    layout = direct_tinygemm_layout(w.shape, g, w._scale.dtype, packed.device)
    if layout is not None:
        return tinygemm_from_portable_cpu(lambda r0, r1: packed[r0:r1], w._scale, w._shift, (n, k), layout)
    per_row, half = k // g, packed.shape[0]
    layout = tinygemm_cpu_layout() if packed.device.type == "cpu" else None
    data = None
    # On CUDA each block is one `_convert_weight_to_int4pack` call and one quanto tensor: blocks of 4 M codes
    # (16 MB as int32) keep CogVLM2 at ~8 calls per Linear instead of ~56 with the 0.5 M read blocks.
    elements = REPACK_CHUNK_ELEMENTS if layout is None else None
    for n0, n1 in _chunk_rows(n, k, elements=elements):
        r0, r1 = n0 * per_row, n1 * per_row
        codes = _nibbles(packed, r0, r1, half).view(n1 - n0, k)
        if layout is not None:
            bdata = _encode_tinygemm_cpu(codes, *layout)
        else:
            scale_shift = (w._scale[r0:r1], w._shift[r0:r1])
            bdata = TinyGemmWeightQBitsTensor(qint4, 0, g, (n1 - n0, k), (k, 1), codes, scale_shift)._data._data
        if data is None:  # CPU: (rows, k/2) uint8; CUDA: (rows/8, k/32, 32, 1) int32
            rows_per_item = (n1 - n0) // bdata.shape[0]
            data = bdata.new_empty((n // rows_per_item, *bdata.shape[1:]))
        data[n0 // rows_per_item : n1 // rows_per_item] = bdata
    return tinygemm_tensor(data, w._scale, w._shift, (n, k), g)


def optimize_weight(w: QTensor) -> QTensor:
    """Portable weight -> the layout of the fastest kernel quanto has for it on its device."""
    if type(w) is WeightQBitsTensor:
        if _tinygemm_target(w):
            return _to_tinygemm(w)
        if w._data.device.type == "cuda":
            return w.optimize()  # AWQ for fp16 on sm80+ (whole-tensor repack), else unchanged
        return w
    if type(w) is WeightQBytesTensor:
        return w.optimize()
    return w
