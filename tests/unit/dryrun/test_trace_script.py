"""scripts/trace_gpu.py: the JSON a run writes, and one-line errors with exit 2 for bad options."""

import json

import pytest

from tests.scripts import import_script

trace_gpu = import_script("trace_gpu")
bench_gpu = import_script("bench_gpu")

REQUIRED = ("peak_allocated_bytes", "peak_reserved_bytes", "planned_peak_bytes", "phases", "rows_ok", "kernels",
            "int4_ops", "sdpa", "oom_events", "timings")  # fmt: skip


def test_small_run_writes_the_report(tmp_path, capsys):
    out = tmp_path / "trace.json"
    code = trace_gpu.main(["--model", "cogvlm2", "--small", "--images", "2", "--batch", "2", "--new-tokens", "2",
                           "--json", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert all(key in report for key in REQUIRED)
    assert report["rows_ok"] == 2 and report["phases"]["decode"]["calls"] == 1
    assert {"peak_allocated", "peak_reserved", "planned"} <= set(report["phases"]["vision_encode"])
    assert "decode" in capsys.readouterr().out  # the table
    # bench_gpu.py runs the traced configuration for real (here on the CPU, tiny shapes) and prints both.
    real = tmp_path / "real.json"
    code = bench_gpu.main(["--traced", str(out), "--simulate", "--workdir", str(tmp_path / "w"), "--json", str(real)])
    assert code == 0
    figures = json.loads(real.read_text())
    assert figures["worker"]["rows_ok"] == 2 and figures["worker"]["mode"] == report["plan"]["mode"]
    assert "| worker |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--capability", "sm86"], "capability must look like 8.6"),
        (["--vram", "lots"], "--vram: cannot read a size"),
        (["--batch", "0"], "batch must be a positive integer"),
        (["--json", "/nonexistent/dir/out.json"], "no directory"),
        (["--kv-cache", "int4"], "--kv-cache: invalid choice: 'int4'"),
    ],
)
def test_bad_options_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        trace_gpu.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_quantization_the_job_refuses_exits_2(capsys):
    assert trace_gpu.main(["--small", "--quantization", "int5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantization" in err[0]
