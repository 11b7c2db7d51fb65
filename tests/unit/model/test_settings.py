"""`cogbatch.model.settings`: what the job reader and the model share (sizes, dtypes, generation settings)."""

from __future__ import annotations

import pytest

from cogbatch.model.settings import DTYPE_NAMES, GenerationConfig, parse_size


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1234, 1234), ("200MB", 200 * 10**6), ("2mb", 2 * 10**6), ("1GB", 10**9), ("64MiB", 64 * 2**20), ("1.5KB", 1500),
     ("11GiB", 11 * 2**30), ("10GB", 10**10), ("512 MiB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30))],
)  # fmt: skip
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize(
    ("size", "message"),
    [("12XB", "cannot read a size from '12XB'"), (0, "at least 1 byte"), ("0", "at least 1 byte"),
     (True, "cannot read"), (1.5e9, "cannot read")],
)  # fmt: skip
def test_parse_size_refuses_what_is_no_size(size, message):
    with pytest.raises(ValueError, match=message):
        parse_size(size)


def test_one_dtype_table_names_torch_dtypes():
    import torch

    from cogbatch.model.settings import torch_dtype

    assert {torch_dtype(name) for name in DTYPE_NAMES} == {torch.float32, torch.float16, torch.bfloat16}


def test_job_settings_leave_out_the_stop_tokens_only():
    g = GenerationConfig(stop_token_ids=(1,), retry_on_repetition=2)
    assert "stop_token_ids" not in g.job_dict() and g.job_dict()["retry_on_repetition"] == 2
    with pytest.raises(ValueError, match="retry_on_repetition"):
        GenerationConfig(retry_on_repetition=-1)
