"""The CUDA device guard for fake tensors, in a fresh process each (the registration lasts for the process)."""

import os
import subprocess
import sys

import pytest

CHECK = """
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode(allow_non_fake_inputs=True):
    t = torch.empty(8, 4, device="cuda")
    assert t[:2].shape == (2, 4) and t.to("cuda").device.type == "cuda"
    t[torch.tensor([1, 2])] = 1.0
    assert torch.tensor([1, 2], device="cuda").device.type == "cuda"
"""


def run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)


def test_indexing_fails_without_a_guard():
    with pytest.raises(subprocess.CalledProcessError):
        run(CHECK)


def test_python_guard_needs_no_compiler():
    run(
        "import cogbatch.dryrun.fakecuda as fc, ctypes\n"
        "assert fc.install_device_guard() == 'python'\n"
        "slots = fc._guard_slots(fc._c10())\n"
        "assert slots[fc._CUDA] and not slots[fc._PRIVATE_USE1], 'PrivateUse1 left registered'\n" + CHECK
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("COGBATCH_TEST_GUARD_BUILD"),
    reason="builds a C++ extension (~40 s), a fallback torch 2.13 never needs: set COGBATCH_TEST_GUARD_BUILD=1",
)
def test_extension_guard_fallback(tmp_path):
    """Where torch lacks the Python hooks: c10's FakeGuardImpl built with load_inline (g++, ~40 s)."""
    build = "import cogbatch.dryrun.fakecuda as fc, pathlib\n"
    run(build + f"fc._install_extension_guard(pathlib.Path({str(tmp_path)!r}))\n" + CHECK)
