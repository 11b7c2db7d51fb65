"""Quantized weights as bytes: quanto's portable packing, TinyGemm's CPU layout, the compiler-free unpack.

Everything here turns codes into the layout a kernel consumes, or one quanto layout into another, a
block of rows at a time and bit-identical to what quanto computes for the whole tensor (quanto's
own repack converts a whole layer to int32 codes first; converting TinyGemm back costs an
O(K^2 N) identity matmul). Importing it also registers a pure-PyTorch `unpack` in place of quanto's
JIT-compiled C++/CUDA ones, so that loading never needs a compiler.
"""

from __future__ import annotations

import logging
import sys
import warnings

import torch
from optimum.quanto import qint4
from optimum.quanto.tensor import QTensor, WeightQBitsTensor, WeightQBytesTensor
from optimum.quanto.tensor.weights.tinygemm import TinyGemmWeightQBitsTensor
from optimum.quanto.tensor.weights.tinygemm.packed import TinyGemmPackedTensor

from cogbatch.model.quant.quantizer import block_rows

log = logging.getLogger("cogbatch.model.quantize")

# Weights per block when a whole layer is repacked by blocks (uint8 only, two temporaries).
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


def encode_tinygemm_cpu(codes: torch.Tensor, out: torch.Tensor, block: int, mode: str) -> None:
    """(rows, k) codes in the low byte of an integer view (`GroupQuantizer.int4`) -> `out`, (rows, k/2) bytes
    of torch's CPU int4 layout. Rows start at a multiple of `block`; a last partial block is the tensor's tail.

    Two rows' codes become one byte in one op on the 16-bit view (lo + 16 * hi: only the low byte is
    kept, and the bits above it never reach it), then a narrowing copy and the word-wise transpose:
    measured 1.1 ms per 4.7 M weights against 2.2 (transposed narrowing copy) and 6 at k = 4096.
    """
    rows, k = codes.shape
    full = rows // block
    if full:
        c = codes[: full * block].view(full, block, k)
        lo, hi = (c[:, : block // 2], c[:, block // 2 :]) if mode == "halves" else (c[:, 0::2], c[:, 1::2])
        pairs = torch.add(lo, hi, alpha=16).to(torch.uint8)  # (full, block/2, k)
        _transpose_bytes(pairs, out[: full * block].view(full, k, block // 2))
    if rows > full * block:
        _encode_tinygemm_cpu(codes[full * block :].to(torch.uint8), block, mode, out=out[full * block :])


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
    and CUDA, so blocks are packed separately: on CPU with our encoder, elsewhere (or for an unknown
    CPU packing) with quanto's constructor, whose CUDA layout we do not reimplement.
    """
    n, k = w.shape
    g = w._group_size
    packed = w._data._data
    per_row, half = k // g, packed.shape[0]
    layout = tinygemm_cpu_layout() if packed.device.type == "cpu" else None
    data = None
    for n0, n1 in block_rows(n, k, REPACK_CHUNK_ELEMENTS, 64):
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
