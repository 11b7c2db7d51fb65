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
