"""`cogbatch.engines.ray_cluster`: what a Ray run shows on the driver's stderr (Ray itself is not needed here)."""

from __future__ import annotations

import os
import warnings

from cogbatch.engines.ray_cluster import quiet_ray_warnings, without_ray_records

RECORD = (b"[2026-12-07 06:43:51,306 E 27149 27149] core_worker.cc:2465: Actor with class name: "
          b"'MapWorker(MapBatches(CaptionActor))' has constructor arguments in the object store\n")  # fmt: skip


def test_ray_records_on_stderr_are_dropped_and_everything_else_passes_in_order(capfd):
    with without_ray_records():
        os.write(2, b"cogbatch: loading model ...\n")
        os.write(2, RECORD)
        os.write(2, b"(MapWorker pid=12) a line an actor printed\n" + RECORD + b"cogbatch: 0/8 images\n")
        os.write(2, b"\rcogbatch:  50%|#####     | 4/8")  # a bar's frame: no newline, passed at once
    assert capfd.readouterr().err == (
        "cogbatch: loading model ...\n(MapWorker pid=12) a line an actor printed\ncogbatch: 0/8 images\n"
        "\rcogbatch:  50%|#####     | 4/8"
    )
    os.write(2, b"after\n")  # stderr is itself again
    with without_ray_records(enabled=False):  # --verbose
        os.write(2, RECORD)
    assert capfd.readouterr().err == "after\n" + RECORD.decode()


def test_rays_python_warnings_are_ignored_inside_the_run_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warnings.catch_warnings():
            quiet_ray_warnings()
            warnings.warn_explicit("tip", FutureWarning, "worker.py", 1, module="ray._private.worker")
            warnings.warn("`x` is deprecated and will be removed in Ray 2.64.", DeprecationWarning, stacklevel=1)
        warnings.warn_explicit("tip", FutureWarning, "worker.py", 1, module="ray._private.worker")
    assert [str(w.message) for w in caught] == ["tip"]
