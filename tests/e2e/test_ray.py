"""`cogbatch run --engine ray` end to end on CPU with a tiny checkpoint and two actors.

The local engine's rows are the reference: the Ray engine must give exactly the same rows and texts,
keep them exactly once through kill -9 and an actor crash, turn bad images into error rows inside the
actors, and send nothing to any address but loopback.

Every Ray run is a `cogbatch` subprocess (the driver must be killable, and each run starts and stops
its own local cluster). Where the test process may (root, `unshare` present) those runs happen inside
a network namespace that has only a loopback interface, so no packet can leave the machine even if a
probe came back; where `strace` exists the parity run is also traced and every connect(2) of every
Ray process must go to loopback, which proves the engine's settings work without the namespace.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cogbatch.store import prepare_output, read_results
from tests.e2e.conftest import make_images

N_IMAGES = 30
COMPARED = ("path", "prompt", "text", "status", "error", "finish_reason", "tokens_in", "tokens_out", "width", "height",
            "model", "quant", "fingerprint")  # fmt: skip

# Brings the loopback interface of a fresh network namespace up (SIOCGIFFLAGS / SIOCSIFFLAGS | IFF_UP) without
# needing iproute2, then runs the rest of the command line in it.
_LO_UP = (
    "import fcntl, os, socket, struct, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "flags = struct.unpack('16sH', fcntl.ioctl(s, 0x8913, struct.pack('16sH22x', b'lo', 0))[:18])[1]\n"
    "fcntl.ioctl(s, 0x8914, struct.pack('16sH22x', b'lo', flags | 1))\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


# -- helpers ---------------------------------------------------------------------------------------


@functools.cache
def _netns_prefix() -> tuple[str, ...]:
    """`unshare -n` with loopback up, when this machine lets the tests make a network namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    probe = [unshare, "-n", "--", sys.executable, "-c", _LO_UP, sys.executable, "-c", "pass"]
    try:
        ok = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return (unshare, "-n", "--", sys.executable, "-c", _LO_UP) if ok else ()


def _cogbatch(*args: str) -> list[str]:
    exe = shutil.which("cogbatch")
    return [exe, *args] if exe else [sys.executable, "-m", "cogbatch", *args]


def _isolated(cmd: list[str], trace: Path | None = None) -> list[str]:
    """The command in a loopback-only network namespace (where possible), traced for connect(2) if asked."""
    if trace is not None:
        cmd = ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(trace), *cmd]
    return [*_netns_prefix(), *cmd]


@pytest.fixture
def ray_env():
    """The environment of a Ray run: a fresh local cluster (never a RAY_ADDRESS of the machine's), short temp dir."""
    tmp = tempfile.mkdtemp(prefix="cbray-")  # short: Ray's unix socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tmp
    yield env
    shutil.rmtree(tmp, ignore_errors=True)


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    _end_session(proc.pid)
    return proc.returncode, out, err


def _end_session(sid: int) -> None:
    """SIGKILL what is left of a killed run's local cluster (processes of the session the test started)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signal.SIGKILL)


def _rows(output: Path) -> dict[tuple[str, str], dict]:
    rows = read_results(output).to_pylist()
    keys = [(r["image_id"], r["task"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    return {(r["image_id"], r["task"]): {c: r[c] for c in COMPARED} for r in rows}


def _actor_parts(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("part-*-a*-*.parquet"))


def _wait_for_parts(proc: subprocess.Popen, output: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and len(_actor_parts(output)) < n:
        time.sleep(0.05)


def _non_loopback_connects(trace: Path) -> list[str]:
    """connect(2) calls of the traced processes to an IPv4 / IPv6 address that is not loopback."""
    bad = []
    for line in trace.read_text().splitlines():
        for addr in re.findall(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"', line):
            ip = ipaddress.ip_address(addr[0] or addr[1])
            mapped = getattr(ip, "ipv4_mapped", None)
            if not (ip.is_loopback or (mapped is not None and mapped.is_loopback)):
                bad.append(line)
    return bad


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_cogvlm1):
    """30 images, a job with two tasks, and the local engine's output for them (the reference)."""
    root = tmp_path_factory.mktemp("ray_corpus")
    make_images(root / "images", N_IMAGES)
    job = {
        "model": str(tiny_cogvlm1),
        "input": {"folder": str(root / "images")},
        "output": str(root / "local"),
        "quantization": "none",
        "device": "cpu",
        "dtype": "fp32",
        "batch_size": 4,
        "tasks": [
            {"name": "caption", "prompt": "Describe this image.", "max_new_tokens": 4},
            {"name": "colors", "prompt": "What colors are in {stem}?", "template": "vqa", "max_new_tokens": 3},
        ],
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    res = subprocess.run(_cogbatch("run", str(path), "--quiet"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    reference = _rows(root / "local")
    assert len(reference) == 2 * N_IMAGES
    return path, reference


# -- fast checks -----------------------------------------------------------------------------------


def test_missing_ray_extra_is_a_one_line_usage_error(tmp_path, job_factory, monkeypatch):
    from cogbatch.cli import cli

    make_images(tmp_path / "images", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    res = CliRunner().invoke(cli, ["run", str(job_factory()), "--engine", "ray", "--quiet"])
    assert res.exit_code == 2
    assert "the Ray engine needs the ray extra: pip install 'cogbatch[ray]'" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # nothing was done


def test_workers_belongs_to_the_ray_engine(tmp_path, job_factory):
    from cogbatch.cli import cli

    make_images(tmp_path / "images", 1)
    res = CliRunner().invoke(cli, ["run", str(job_factory()), "--workers", "2"])
    assert res.exit_code == 2 and "--workers applies to --engine ray only" in res.output


def test_actor_plan_keeps_a_cpu_free_and_gives_one_gpu_per_actor(tmp_path, job_factory):
    from cogbatch.config import load_job
    from cogbatch.engines import EngineError
    from cogbatch.engines.ray import plan_actors

    make_images(tmp_path / "images", 1)
    cpu_job = load_job(job_factory())  # device: cpu
    auto_job = load_job(job_factory("auto.yaml", device="auto"))
    cuda_job = load_job(job_factory("cuda.yaml", device="cuda:1"))
    assert plan_actors(cpu_job, {"CPU": 3.0}, None) == (2, {"num_cpus": 1})
    assert plan_actors(cpu_job, {"CPU": 2.0}, None) == (1, {"num_cpus": 1})
    assert plan_actors(cpu_job, {"CPU": 16.0, "GPU": 4.0}, 3) == (3, {"num_cpus": 5})  # device: cpu ignores GPUs
    assert plan_actors(auto_job, {"CPU": 16.0, "GPU": 4.0}, None) == (4, {"num_gpus": 1})
    assert plan_actors(cuda_job, {"CPU": 16.0, "GPU": 2.0}, 1) == (1, {"num_gpus": 1})
    with pytest.raises(EngineError, match="need 3 CPUs"):
        plan_actors(cpu_job, {"CPU": 2.0}, 2)  # two actors on two CPUs would starve Ray's own tasks
    with pytest.raises(EngineError, match="needs 5 GPUs"):
        plan_actors(auto_job, {"CPU": 16.0, "GPU": 4.0}, 5)
    with pytest.raises(EngineError, match="no GPUs"):
        plan_actors(cuda_job, {"CPU": 16.0}, None)


def test_input_blocks_group_tasks_by_image_and_spread_small_manifests(tmp_path, job_factory):
    from cogbatch.config import load_job
    from cogbatch.engines.ray import input_blocks
    from cogbatch.runner import RunOptions, plan_run

    make_images(tmp_path / "images", 30)
    plan = plan_run(load_job(job_factory()), RunOptions())
    blocks = input_blocks(plan.todo, batch=8)
    assert [b.num_rows for b in blocks] == [8, 8, 8, 6]  # one actor batch per block: 4 blocks for 2+ actors
    first = blocks[0].to_pylist()[0]
    assert first["tasks"] == ["caption", "colors"] and first["prompts"][1].startswith("What colors are in img_")
    assert Path(first["file"]).is_absolute()


def test_an_actor_batch_is_about_flush_rows_rows_but_every_actor_gets_work(tmp_path, job_factory):
    from cogbatch.config import load_job
    from cogbatch.engines.ray import images_per_batch

    make_images(tmp_path / "images", 1)
    cfg = load_job(job_factory(flush_rows=256))  # two tasks: 128 images make 256 rows
    assert images_per_batch(cfg, 100_000, 4) == 128
    assert images_per_batch(cfg, 30, 2) == 8  # four batches for two actors
    assert images_per_batch(cfg, 1, 8) == 1


def test_the_trace_check_catches_what_plain_ray_does(tmp_path):
    """The connect(2) lines strace wrote for a plain `ray.init()` (Ray 2.60, no cogbatch settings)."""
    trace = tmp_path / "plain.trace"
    trace.write_text(
        '2691  connect(23, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16)'
        " = -1 ENETUNREACH (Network is unreachable)\n"
        '13727 connect(27, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("8.8.8.8")}, 16) = 0\n'
        "2700  connect(9, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), "
        'inet_pton(AF_INET6, "fd00::2", &sin6_addr), sin6_scope_id=0}, 28 <unfinished ...>\n'
        "2700  <... connect resumed>)            = -1 EINPROGRESS (Operation now in progress)\n"
        '2701  connect(5, {sa_family=AF_INET, sin_port=htons(41133), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
        "2702  connect(6, {sa_family=AF_INET6, sin6_port=htons(1), sin6_flowinfo=htonl(0), "
        'inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr), sin6_scope_id=0}, 28) = 0\n'
        '2703  connect(7, {sa_family=AF_UNIX, sun_path="/tmp/ray/session/sockets/raylet"}, 110) = 0\n'
    )
    bad = _non_loopback_connects(trace)
    assert [re.search(r'"([0-9a-f.:]+)"', line).group(1) for line in bad] == ["169.254.169.254", "8.8.8.8", "fd00::2"]


# -- Ray runs --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_gives_the_local_engines_rows_and_sends_nothing_off_the_machine(tmp_path, corpus, ray_env):
    job, reference = corpus
    out = tmp_path / "ray"
    trace = tmp_path / "connect.trace" if shutil.which("strace") else None
    cmd = _cogbatch("run", str(job), "--engine", "ray", "--workers", "2", "--output", str(out), "--json", "--quiet")
    code, stdout, stderr = _finish(_start(_isolated(cmd, trace), ray_env))
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["engine"] == "ray" and summary["workers"] == 2
    assert (summary["done"], summary["failed"], summary["exit_code"]) == (2 * N_IMAGES, 0, 0)
    assert _rows(out) == reference  # same rows, same texts, exactly once
    actors = {name.rsplit("-", 1)[0] for name in _actor_parts(out)}
    assert len(actors) == 2, f"one actor did all the work: {actors}"  # the small manifest was spread

    code, stdout, stderr = _finish(_start(_isolated(cmd), ray_env))  # nothing left: no cluster, no model
    again = json.loads(stdout)
    assert (code, again["pending"], again["model_loaded"]) == (0, 0, False) and "ray_startup_s" not in again

    if trace is not None:
        text = trace.read_text()
        assert "127.0.0.1" in text, "strace saw no connect at all: the trace did not cover the Ray processes"
        assert _non_loopback_connects(trace) == []


@pytest.mark.slow
def test_sigterm_then_kill_nine_of_the_driver_then_resume_exactly_once(tmp_path, corpus, ray_env):
    job, reference = corpus
    small_parts = yaml.safe_load(job.read_text()) | {"flush_rows": 4}  # actor batches of 2 images: 15 parts
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(small_parts, sort_keys=False))
    out = tmp_path / "out"
    cmd = _isolated(_cogbatch("run", str(job), "--engine", "ray", "--output", str(out), "--json", "--quiet"))

    term = _start(cmd, ray_env)  # SIGTERM: the driver stops taking batches, exits 143, resumable
    _wait_for_parts(term, out, 1)
    term.send_signal(signal.SIGTERM)
    code, stdout, stderr = _finish(term)
    assert code in (143, 0), stderr
    if code == 143:
        summary = json.loads(stdout)
        assert summary["interrupted"] is True and summary["exit_code"] == 143
        assert summary["done"] == len(_rows(out))  # batches that landed after the signal are counted too

    killed = _start(cmd, ray_env)  # kill -9 while actors are working
    _wait_for_parts(killed, out, len(_actor_parts(out)) + 2)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    _rows(out)  # whatever is visible is complete and unique

    # At once, while the dead driver's actors may still live for a moment: they must not add rows now.
    final = subprocess.run(_cogbatch("run", str(job), "--output", str(out), "--quiet"), capture_output=True,
                           text=True, timeout=600, env=ray_env)  # fmt: skip
    _end_session(killed.pid)
    assert final.returncode == 0, final.stderr
    prepare_output(out)
    assert _rows(out) == reference


@pytest.mark.slow
def test_bad_images_become_error_rows_and_a_crashed_actor_is_retried_without_duplicates(tmp_path, corpus, ray_env):
    job, reference = corpus
    images = tmp_path / "images"
    make_images(images, 10)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 40)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("not an image")
    (images / "truncated.png").write_bytes((images / "img_000.png").read_bytes()[:60])
    crash = tmp_path / "crashed-once"
    env = {**ray_env, "COGBATCH_RAY_CRASH_ONCE": str(crash)}  # the first actor to write a part dies right after
    cmd = _cogbatch("run", str(job), "--engine", "ray", "--input", str(images), "--output", str(tmp_path / "out"),
                    "--json", "--quiet")  # fmt: skip
    code, stdout, stderr = _finish(_start(_isolated(cmd), env))
    assert code == 0, stderr
    assert crash.exists(), "no actor crashed: the retry path was not exercised"

    rows = _rows(tmp_path / "out")
    assert len(rows) == 2 * 14
    errors = {Path(r["path"]).name: r["error"] for r in rows.values() if r["status"] == "error"}
    assert set(errors) == {"corrupt.png", "empty.png", "notes.png", "truncated.png"}
    assert all(errors.values())
    good = {k: v for k, v in rows.items() if v["status"] == "ok"}
    assert len(good) == 20 and all(reference[k]["text"] == v["text"] for k, v in good.items())
    assert stdout.strip(), f"no JSON summary; stderr:\n{stderr}"
    summary = json.loads(stdout)
    assert (summary["done"], summary["failed"]) == (20, 8)  # the retried batch is counted once
