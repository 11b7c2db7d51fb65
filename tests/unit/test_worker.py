"""Runner pieces that need no model: text post-processing and the tiny-model source."""

from __future__ import annotations

import pytest

from cogbatch.worker import postprocess


@pytest.mark.parametrize(
    "text, prefixes, expected",
    [
        ("  The image shows a red square. ", ("The image shows",), "A red square."),
        ("this image depicts: two dogs", ("The image shows", "This image depicts"), "Two dogs"),
        ("A cat on a mat.", ("The image shows",), "A cat on a mat."),
        ("\n trailing space \t", (), "trailing space"),
    ],
)
def test_postprocess_strips_configured_openings_and_whitespace(text, prefixes, expected):
    assert postprocess(text, prefixes) == expected


def test_the_ceiling_is_lowered_to_what_the_gpu_can_still_give(monkeypatch, caplog):
    """An 8 GiB card (or one shared with another process) under the default 11 GiB vram_ceiling: the
    plan uses free + what cogbatch already holds, and says so; a ceiling within reach is kept."""
    import torch

    from cogbatch.worker import usable_ceiling

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(1.5 * gib), 8 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)  # the weights
    cuda = torch.device("cuda", 0)
    with caplog.at_level("WARNING", logger="cogbatch"):
        assert usable_ceiling(11 * gib, cuda) == int(7.5 * gib)
    assert "vram_ceiling 11.00 GiB is more than this process can use on cuda:0 (7.50 GiB" in caplog.text
    caplog.clear()
    assert usable_ceiling(7 * gib, cuda) == 7 * gib
    assert usable_ceiling(11 * gib, torch.device("cpu")) == 11 * gib
    assert not caplog.text
