"""`cogbatch.model.quant.report`: what a load did, measured."""

from __future__ import annotations

import json
from pathlib import Path

from cogbatch.model.cogvlm import CogVLM
from tests.unit.quant.helpers import (
    MIXED,
    load,
)


def test_load_report_fields(ckpt, cache_dir):
    model = load(ckpt, MIXED, cache_dir)
    r = model.load_report
    d = r.to_dict()
    json.dumps(d)  # plain data
    assert set(r.weight_bytes) == {"int4", "int8", "16-bit"}
    assert d["total_weight_bytes"] == sum(r.component_bytes.values())
    assert r.peak_host_rss_bytes and r.peak_host_anon_bytes and r.peak_device_bytes is None
    assert r.read_s > 0 and r.quantize_s > 0 and r.cache_write_s > 0 and r.total_s >= r.read_s
    text = r.summary()
    for part in (
        "int4-g128+rules",
        "weights",
        "peak host RSS",
        "kernels: ",
        "TinyGemmWeightQBitsTensor",
        "cache: written",
    ):
        assert part in text
    plain = CogVLM.from_pretrained(ckpt, dtype="bfloat16", device="cpu")
    assert plain.load_report.quantization == "none" and plain.load_report.kernels == {}
    assert plain.load_report.weight_bytes == {"16-bit": plain.load_report.total_weight_bytes}


def test_every_load_reports_the_bytes_it_reads_from_start_to_end(ckpt, cache_dir):
    """The checkpoint when quantizing or loading plainly, the cache file on a hit: each counted up to its size."""
    from cogbatch.model.quant.cachefile import CACHE_WEIGHTS
    from cogbatch.model.weights import weight_files

    checkpoint_bytes = sum(f.stat().st_size for f in weight_files(ckpt))

    def calls(**kw) -> tuple[CogVLM, list[tuple[str, int, int]]]:
        seen: list[tuple[str, int, int]] = []
        model = load(ckpt, kw.pop("quantization", None), cache_dir, progress=lambda *a: seen.append(a), **kw)
        return model, seen

    for kw in ({"quantization": None}, {"quantization": MIXED}):  # plain, then quantizing (the cache is written)
        _, seen = calls(**kw)
        assert {what for what, _, _ in seen} == {"checkpoint"} and {t for _, _, t in seen} == {checkpoint_bytes}
        done = [d for _, d, _ in seen]
        assert done[0] == 0 and done[-1] == checkpoint_bytes and done == sorted(done)
        assert len(set(done)) > 20  # tensor by tensor, not once per file
        assert done[-2] > checkpoint_bytes * 0.9  # the tensors' bytes, short of the file only by its header

    hit, seen = calls(quantization=MIXED)
    assert hit.load_report.cache_hit
    cache_bytes = (Path(hit.load_report.cache_path) / CACHE_WEIGHTS).stat().st_size
    assert {what for what, _, _ in seen} == {"quantized-weights cache"} and seen[-1][1:] == (cache_bytes, cache_bytes)
    assert len({d for _, d, _ in seen}) > 20
