"""`cogbatch.model.quant.report`: what a load did, measured."""

from __future__ import annotations

import json

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
