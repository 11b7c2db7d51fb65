"""`cogbatch run --engine ray` end to end on CPU with a tiny checkpoint and two actors.

The local engine's rows are the reference: the Ray engine must give exactly the same rows, texts and
summary keys, keep them exactly once through SIGTERM, kill -9 and actor crashes, turn bad images
(and a batch that kills its actor every time) into error rows inside the actors, and send nothing to
any address but loopback.

Every Ray run is a `cogbatch` subprocess (the driver must be killable, and each run starts and stops
its own local cluster). Where the test process may (root, `unshare` present) those runs happen inside
a network namespace that has only a loopback interface, so no packet can leave the machine even if a
probe came back. The parity run is traced with `strace -f -e trace=%network`: every connect, sendto,
sendmsg and sendmmsg of every Ray process must go to loopback, which proves the engine's own settings
work without the namespace. Without strace that proof is skipped loudly (`.ci/run` installs strace);
with neither strace nor a namespace the test fails.
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
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cogbatch.store import prepare_output, read_results
from cogbatch.store.state import RAY, state_file
from tests.e2e.conftest import make_images

N_IMAGES = 30
N_ITEMS = N_IMAGES + 1  # and a byte-identical copy of one: its own rows, the caption's text shared
COMPARED = ("image_id", "path", "prompt", "text", "status", "error", "finish_reason", "tokens_in", "tokens_out",
            "width", "height", "model", "quant", "fingerprint", "attempts")  # fmt: skip

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
def _netns() -> tuple[tuple[str, ...], str]:
    """(`unshare -n` with loopback up, or () and why not), probed once: where the tests may make a namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return (), "unshare is not installed"
    probe = [unshare, "-n", "--", sys.executable, "-c", _LO_UP, sys.executable, "-c", "pass"]
    try:
        res = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return (), f"unshare -n failed: {e}"
    if res.returncode != 0:
        return (), f"unshare -n failed: {res.stderr.strip()[-300:]}"
    return (unshare, "-n", "--", sys.executable, "-c", _LO_UP), ""


def _netns_prefix() -> tuple[str, ...]:
    prefix, why_not = _netns()
    if not prefix:
        warnings.warn(f"Ray test runs are NOT isolated in a network namespace ({why_not})", stacklevel=2)
    return prefix


def _cogbatch(*args: str) -> list[str]:
    exe = shutil.which("cogbatch")
    return [exe, *args] if exe else [sys.executable, "-m", "cogbatch", *args]


def _isolated(cmd: list[str], trace: Path | None = None) -> list[str]:
    """The command in a loopback-only network namespace (where possible), its network syscalls traced if asked."""
    if trace is not None:
        strace = shutil.which("strace")
        assert strace, "tracing needs strace"
        cmd = [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=%network", "-e", "signal=none", "-o", str(trace),
               *cmd]  # fmt: skip
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
    """(path, task) -> the compared columns of its row; exactly one row per key."""
    rows = read_results(output).to_pylist()
    keys = [(r["path"], r["task"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate rows"
    return {(r["path"], r["task"]): {c: r[c] for c in COMPARED} for r in rows}


# An actor writes part-<run id>-a<8 hex>-<seq>; the driver part-<run id>-<seq>, and a run id
# (<time>-<6 hex>) may itself end in "-a...": a glob like part-*-a*-* took the driver's for an actor's.
_ACTOR_PART = re.compile(r"^part-.+-a[0-9a-f]{8}-\d{5,}\.parquet$")


def _actor_parts(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("part-*.parquet") if _ACTOR_PART.match(p.name))


def _wait_for_parts(proc: subprocess.Popen, output: Path, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and len(_actor_parts(output)) < n:
        time.sleep(0.05)


_OUTBOUND = ("connect", "sendto", "sendmsg", "sendmmsg")  # the syscalls that name where data goes
_SYSCALL = re.compile(r"^\d+\s+(\w+)\(")
_ADDRESS = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6?, "([^"]+)"')


def _outbound_calls(trace: Path) -> tuple[list[str], list[str]]:
    """(outbound syscalls to loopback, outbound syscalls to any other IPv4 / IPv6 address) in an strace log.

    bind, accept, getsockname and recvfrom also print addresses, but none sends anything: only the
    destination of connect / sendto / sendmsg / sendmmsg counts.
    """
    loopback, other = [], []
    for line in trace.read_text(errors="replace").splitlines():
        call = _SYSCALL.match(line)
        if call is None or call.group(1) not in _OUTBOUND:
            continue
        for addr in _ADDRESS.findall(line):
            ip = ipaddress.ip_address(addr[0] or addr[1])
            mapped = getattr(ip, "ipv4_mapped", None)
            (loopback if ip.is_loopback or (mapped is not None and mapped.is_loopback) else other).append(line)
    return loopback, other


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_cogvlm1):
    """30 images, a job with two tasks, and the local engine's output for them (the reference)."""
    root = tmp_path_factory.mktemp("ray_corpus")
    images = make_images(root / "images", N_IMAGES)
    (root / "images" / "img_000_copy.png").write_bytes(images[0].read_bytes())
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
    res = subprocess.run(_cogbatch("run", str(path), "--json", "--quiet"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    reference = _rows(root / "local")
    assert len(reference) == 2 * N_ITEMS
    assert [r["attempts"] for r in reference.values()].count(0) == 1  # the copy's caption: reused, not generated
    return path, reference, json.loads(res.stdout)


# -- fast checks -----------------------------------------------------------------------------------


def test_missing_ray_extra_is_a_one_line_usage_error(tmp_path, job_factory, monkeypatch):
    from cogbatch.cli import cli

    make_images(tmp_path / "images", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    res = CliRunner().invoke(cli, ["run", str(job_factory()), "--engine", "ray", "--quiet"])
    assert res.exit_code == 2
    assert "the Ray engine needs the ray extra: pip install 'cogbatch[ray]'" in res.output
    assert "Traceback" not in res.output
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # nothing was done (an empty output dir at most)


def test_workers_belongs_to_the_ray_engine(tmp_path, job_factory):
    from cogbatch.cli import cli

    make_images(tmp_path / "images", 1)
    res = CliRunner().invoke(cli, ["run", str(job_factory()), "--workers", "2"])
    assert res.exit_code == 2 and "--workers applies to --engine ray only" in res.output


def _nodes(*cpus: int, gpus: int = 0) -> list[dict[str, float]]:
    return [{"CPU": float(c), **({"GPU": float(gpus)} if gpus else {})} for c in cpus]


def test_actor_plan_keeps_a_cpu_free_and_gives_one_gpu_per_actor(tmp_path, job_factory):
    from cogbatch.engines.ray import plan_actors
    from cogbatch.errors import EngineError
    from cogbatch.job import load_job

    make_images(tmp_path / "images", 1)
    cpu_job = load_job(job_factory())  # device: cpu
    auto_job = load_job(job_factory("auto.yaml", device="auto"))
    cuda_job = load_job(job_factory("cuda.yaml", device="cuda:1"))
    assert plan_actors(cpu_job, _nodes(3), None) == (2, {"num_cpus": 1})
    assert plan_actors(cpu_job, _nodes(2), None) == (1, {"num_cpus": 1})
    assert plan_actors(cpu_job, _nodes(16, gpus=4), 3) == (3, {"num_cpus": 5})  # device: cpu ignores GPUs
    assert plan_actors(auto_job, _nodes(16, gpus=4), None) == (4, {"num_gpus": 1})
    assert plan_actors(cuda_job, _nodes(16, gpus=2), 1) == (1, {"num_gpus": 1})
    with pytest.raises(EngineError, match="need 3 CPUs"):
        plan_actors(cpu_job, _nodes(2), 2)  # two actors on two CPUs would starve Ray's own tasks
    with pytest.raises(EngineError, match="needs 5 GPUs"):
        plan_actors(auto_job, _nodes(16, gpus=4), 5)
    with pytest.raises(EngineError, match="no GPUs"):
        plan_actors(cuda_job, _nodes(16), None)


def test_a_cpu_actor_is_never_larger_than_the_largest_node(tmp_path, job_factory):
    """4 nodes x 4 CPUs and 2 actors: 15 // 2 = 7 CPUs each would wait forever for a 7-CPU node."""
    from cogbatch.engines.ray import plan_actors
    from cogbatch.errors import EngineError
    from cogbatch.job import load_job

    make_images(tmp_path / "images", 1)
    cpu_job = load_job(job_factory())
    assert plan_actors(cpu_job, _nodes(4, 4, 4, 4), 2) == (2, {"num_cpus": 4})
    assert plan_actors(cpu_job, _nodes(4, 4, 4, 4), 5) == (5, {"num_cpus": 2})  # 3 would fit only 4 actors
    assert plan_actors(cpu_job, _nodes(0, 8, 2), 3) == (3, {"num_cpus": 2})  # a head node without CPUs
    with pytest.raises(EngineError, match="need 17 CPUs"):
        plan_actors(cpu_job, _nodes(4, 4, 4, 4), 16)


def test_the_jobs_workers_key_sets_the_actors_and_the_flag_wins(tmp_path, job_factory, monkeypatch):
    import cogbatch.engines.ray as engine
    from cogbatch.job import load_job

    make_images(tmp_path / "images", 1)
    seen = []
    monkeypatch.setattr(engine, "run_engine", lambda cfg, opts, execute, preflight: execute(None))
    monkeypatch.setattr(engine, "_execute", lambda run, workers: seen.append(workers))
    cfg = load_job(job_factory(workers=3))
    engine.run_ray(cfg)
    engine.run_ray(cfg, workers=1)
    assert seen == [3, 1]


def test_a_failed_ray_job_is_one_line_and_a_wrapped_user_error_keeps_its_exit_code():
    from cogbatch.engines.ray import _failure
    from cogbatch.errors import EXIT_CONFIG, DoesNotFit, RayRunFailed, exit_code_for

    died = _failure(RuntimeError("The actor died unexpectedly before finishing this task.\n\tclass_name: MapWorker"))
    assert isinstance(died, RayRunFailed) and "\n" not in str(died)
    assert "The actor died unexpectedly before finishing this task." in str(died) and "resume" in str(died)
    wrapped = RuntimeError("task failed")
    wrapped.cause = DoesNotFit("even one request does not fit under the vram_ceiling")
    assert exit_code_for(_failure(wrapped)) == EXIT_CONFIG


def test_input_rows_group_tasks_by_image_and_blocks_spread_small_manifests(tmp_path, job_factory):
    from cogbatch.engines.prologue import RunOptions, prepare_run
    from cogbatch.engines.ray import input_block_count, input_rows
    from cogbatch.job import load_job

    make_images(tmp_path / "images", 30)
    work = prepare_run(load_job(job_factory()), RunOptions())
    rows = input_rows(work.todo)
    assert len(rows) == 30
    first = rows[0]
    assert first["tasks"] == ["caption", "colors"] and first["prompts"][1].startswith("What colors are in img_")
    assert first["paths"] == [first["path"]] * 2  # each request's item
    assert Path(first["file"]).is_absolute() and first["row"] is None
    assert input_block_count(30, batch=8) == 4  # about one actor batch per block: 4 blocks for 2+ actors
    assert input_block_count(1, batch=8) == 1 and input_block_count(10**7, batch=8) == 2048


def test_an_actor_batch_is_about_flush_rows_rows_but_every_actor_gets_work(tmp_path, job_factory):
    from cogbatch.engines.ray import images_per_batch
    from cogbatch.job import load_job

    make_images(tmp_path / "images", 1)
    cfg = load_job(job_factory(flush_rows=256))  # two tasks: 128 images make 256 rows
    assert images_per_batch(cfg, 100_000, 4) == 128
    assert images_per_batch(cfg, 30, 2) == 8  # four batches for two actors
    assert images_per_batch(cfg, 1, 8) == 1


def test_the_actors_stats_merge_into_one_workers_summary():
    """Counters add up, ratios are recomputed from the summed counters, plan settings are the common value."""
    from cogbatch.engines.ray import merge_worker_stats
    from cogbatch.results import WorkerCounters

    counters = WorkerCounters()
    for added in ({"requests": 4, "batches": 2, "decode_rows": 20, "decode_steps": 5, "prefill_padding": 5,
                   "prefill_tokens": 30, "model_compute_s": 0.7, "generated_tokens": 12},
                  {"requests": 3, "batches": 1, "decode_rows": 10, "decode_steps": 3, "prefill_tokens": 10,
                   "model_compute_s": 0.53456, "generated_tokens": 9}):  # fmt: skip
        counters.add(added)  # what two actors reported, batch by batch
    actor = {"mode": "resident", "slots": 8}
    other, third = {**actor, "slots": 4}, {**actor, "mode": "swap"}
    merged = merge_worker_stats(counters, [actor, other, third])
    assert (merged.requests, merged.batches, merged.mean_batch_size, merged.padding_fraction) == (7, 3, 3.75, 0.125)
    assert (merged.model_compute_s, merged.execution_mode, merged.planned_batch) == (1.235, "resident", 8)
    assert counters.generated_tokens == 21


def test_the_trace_check_catches_what_plain_ray_does(tmp_path):
    """Network syscalls strace wrote for a plain `ray.init()` (Ray 2.60, no cogbatch settings) and a probe."""
    trace = tmp_path / "plain.trace"
    trace.write_text(
        '2691  connect(23, {sa_family=AF_INET, sin_port=htons(80), sin_addr=inet_addr("169.254.169.254")}, 16)'
        " = -1 ENETUNREACH (Network is unreachable)\n"
        '13727 connect(27, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("8.8.8.8")}, 16) = 0\n'
        "2700  connect(9, {sa_family=AF_INET6, sin6_port=htons(443), sin6_flowinfo=htonl(0), "
        'inet_pton(AF_INET6, "fd00::2", &sin6_addr), sin6_scope_id=0}, 28 <unfinished ...>\n'
        "2700  <... connect resumed>)            = -1 EINPROGRESS (Operation now in progress)\n"
        '2704  sendto(3, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("8.8.4.4")}, 16) = 1\n'
        "2705  sendmsg(4, {msg_name={sa_family=AF_INET6, sin6_port=htons(53), sin6_flowinfo=htonl(0), "
        'inet_pton(AF_INET6, "2001:4860:4860::8888", &sin6_addr), sin6_scope_id=0}, msg_namelen=28, '
        'msg_iov=[{iov_base="y", iov_len=1}], msg_iovlen=1, msg_controllen=0, msg_flags=0}, 0) = 1\n'
        '2701  connect(5, {sa_family=AF_INET, sin_port=htons(41133), sin_addr=inet_addr("127.0.0.1")}, 16) = 0\n'
        "2702  connect(6, {sa_family=AF_INET6, sin6_port=htons(1), sin6_flowinfo=htonl(0), "
        'inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6_addr), sin6_scope_id=0}, 28) = 0\n'
        '2703  connect(7, {sa_family=AF_UNIX, sun_path="/tmp/ray/session/sockets/raylet"}, 110) = 0\n'
        '2706  bind(5, {sa_family=AF_INET, sin_port=htons(0), sin_addr=inet_addr("0.0.0.0")}, 16) = 0\n'
        '2707  recvfrom(3, "x", 1, 0, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("8.8.8.8")}, '
        "[16]) = 1\n"
        '2708  getsockname(3, {sa_family=AF_INET, sin_port=htons(43115), sin_addr=inet_addr("10.0.0.3")}, [16]) = 0\n'
    )
    loopback, bad = _outbound_calls(trace)
    assert [re.search(r'"([0-9a-f.:]+)"', line).group(1) for line in bad] == [
        "169.254.169.254", "8.8.8.8", "fd00::2", "8.8.4.4", "2001:4860:4860::8888"]  # fmt: skip
    assert len(loopback) == 2


# -- Ray runs --------------------------------------------------------------------------------------


def _require_isolation_or_proof() -> Path | None:
    """strace's path when the no-traffic proof can run; fails when the Ray runs could be neither proven
    to stay on loopback nor kept there."""
    strace = shutil.which("strace")
    if strace is None and not _netns()[0]:
        pytest.fail(f"neither strace nor a network namespace ({_netns()[1]}): the Ray runs can be neither "
                    "traced nor kept off the network; install strace (.ci/run does)")  # fmt: skip
    return Path(strace) if strace else None


@pytest.mark.slow
def test_ray_gives_the_local_engines_rows_and_sends_nothing_off_the_machine(tmp_path, corpus, ray_env):
    job, reference, local_summary = corpus
    out = tmp_path / "ray"
    strace = _require_isolation_or_proof()
    trace = tmp_path / "network.trace" if strace else None
    cmd = _cogbatch("run", str(job), "--engine", "ray", "--workers", "2", "--output", str(out), "--json", "--quiet")
    code, stdout, stderr = _finish(_start(_isolated(cmd, trace), ray_env))
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["engine"] == "ray" and summary["workers"] == 2
    assert (summary["done"], summary["failed"], summary["exit_code"]) == (2 * N_ITEMS, 0, 0)
    assert summary["reused"] == local_summary["reused"] == 1
    assert _rows(out) == reference  # same rows, same texts, exactly once
    actors = {name.rsplit("-", 1)[0] for name in _actor_parts(out)}
    assert len(actors) == 2, f"one actor did all the work: {actors}"  # the small manifest was spread
    missing = set(local_summary) - set(summary)
    assert not missing, f"keys of the local engine's summary that the Ray engine lacks: {sorted(missing)}"
    for key in ("requests", "vision_encodes", "generated_tokens"):  # the same work, counted the same way
        assert summary[key] == local_summary[key], key

    code, stdout, stderr = _finish(_start(_isolated(cmd), ray_env))  # nothing left: no cluster, no model
    again = json.loads(stdout)
    assert (code, again["pending"], again["model_loaded"]) == (0, 0, False) and "ray_startup_s" not in again

    if trace is None:
        pytest.skip("strace is not installed: the Ray runs were kept in a network namespace, but that the engine "
                    "itself sends nothing off the machine was NOT proven (apt-get install strace)")  # fmt: skip
    loopback, bad = _outbound_calls(trace)
    assert loopback, "strace saw no connect to loopback at all: the trace did not cover the Ray processes"
    assert bad == []


@pytest.mark.slow
def test_sigterm_then_kill_nine_of_the_driver_then_resume_exactly_once(tmp_path, corpus, ray_env):
    job, reference, _ = corpus
    small_parts = yaml.safe_load(job.read_text()) | {"flush_rows": 4}  # actor batches of 2 images: 15 parts
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(small_parts, sort_keys=False))
    out = tmp_path / "out"
    cmd = _isolated(_cogbatch("run", str(job), "--engine", "ray", "--output", str(out), "--json", "--quiet"))

    term = _start(cmd, ray_env)  # SIGTERM: the driver stops taking batches, exits 143, resumable
    _wait_for_parts(term, out, 1)
    assert term.poll() is None and _actor_parts(out), "the run ended before the test could stop it"
    term.send_signal(signal.SIGTERM)
    code, stdout, stderr = _finish(term)
    assert code == 143, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True and summary["exit_code"] == 143
    assert summary["done"] == len(_rows(out)) < 2 * N_ITEMS  # batches that landed after the signal count too

    before = set(_actor_parts(out))
    killed = _start(cmd, ray_env)  # kill -9 while actors are working
    _wait_for_parts(killed, out, len(before) + 1)
    assert killed.poll() is None, "the run ended before the test could kill it"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    landed = set(_actor_parts(out)) - before
    assert landed, "the killed run wrote no part"
    assert len({name.rsplit("-a", 1)[0] for name in landed}) == 1  # all from the killed run
    assert summary["done"] < len(_rows(out)) < 2 * N_ITEMS  # whatever is visible is complete and unique

    # At once, while the dead driver's actors may still live for a moment: they must not add rows now.
    local = subprocess.run(_cogbatch("run", str(job), "--output", str(out), "--limit", "2", "--quiet"),
                           capture_output=True, text=True, timeout=600, env=ray_env)  # fmt: skip
    assert local.returncode == 0, local.stderr
    _rows(out)

    resumed = _start(cmd, ray_env)  # the rest, on Ray again
    code, stdout, stderr = _finish(resumed)
    _end_session(killed.pid)
    assert code == 0, stderr
    assert json.loads(stdout)["done"] > 0
    prepare_output(out)
    assert _rows(out) == reference


@pytest.mark.slow
def test_failures_in_the_actors_become_error_rows_never_duplicates_or_a_hang(tmp_path, corpus, ray_env):
    """Bad images are error rows; an actor killed once is restarted and its batch retried without
    duplicates; a batch that kills its actor every time becomes error rows after MAX_BATCH_CRASHES."""
    from cogbatch.engines.ray import MAX_BATCH_CRASHES

    job, reference, _ = corpus
    images = tmp_path / "images"
    make_images(images, 10)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 40)
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("not an image")
    (images / "truncated.png").write_bytes((images / "img_000.png").read_bytes()[:60])
    crash = tmp_path / "crashed-once"
    env = {
        **ray_env,
        # the first actor to write a part dies right after; a batch holding img_004.png kills its actor each time
        "COGBATCH_FAULT": f"ray-part-written!{crash},ray-batch@img_004.png",
    }
    cmd = _cogbatch("run", str(job), "--engine", "ray", "--input", str(images), "--output", str(tmp_path / "out"),
                    "--json", "--quiet")  # fmt: skip
    code, stdout, stderr = _finish(_start(_isolated(cmd), env))
    assert code == 0, stderr
    assert crash.exists(), "no actor crashed: the retry path was not exercised"

    rows = _rows(tmp_path / "out")
    assert len(rows) == 2 * 14
    errors = {Path(r["path"]).name: r["error"] for r in rows.values() if r["status"] == "error"}
    killed = {name for name, error in errors.items() if f"the Ray actor died {MAX_BATCH_CRASHES} times" in error}
    assert "img_004.png" in killed and len(killed) <= 4  # img_004's batch: at most 4 images (14 over 2 actors)
    assert set(errors) - killed == {"corrupt.png", "empty.png", "notes.png", "truncated.png"} - killed
    assert all(errors.values())
    good = {k: v for k, v in rows.items() if v["status"] == "ok"}
    assert len(good) == 2 * (10 - len(killed - {"corrupt.png", "empty.png", "notes.png", "truncated.png"}))
    by_request = {(v["image_id"], k[1], v["prompt"]): v["text"] for k, v in reference.items()}
    assert all(by_request[(v["image_id"], k[1], v["prompt"])] == v["text"] for k, v in good.items())
    assert stdout.strip(), f"no JSON summary; stderr:\n{stderr}"
    summary = json.loads(stdout)
    assert (summary["done"], summary["failed"]) == (len(good), 28 - len(good))  # the retried batch counted once
    assert list(state_file(tmp_path / "out", RAY).rglob("*")) == []  # the crash notes are gone
    assert all(p.name.startswith("part-") for p in (tmp_path / "out").iterdir())  # the output: parts only



@pytest.mark.slow
def test_two_ray_runs_in_a_row_print_nothing_of_ray_on_stderr(tmp_path, ray_env):
    """The demo job twice: no token notice, deprecation, core-worker record, colour code or crash dump of
    Ray's (a crash dump came from the workers of `from_arrow`'s schema tasks exiting while the run went on)."""
    root = Path(__file__).resolve().parents[2]
    for i in range(2):
        cmd = _cogbatch("run", "jobs/demo.yaml", "--engine", "ray", "--output", str(tmp_path / f"out{i}"))
        proc = subprocess.Popen(_isolated(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ray_env, cwd=root, start_new_session=True)  # fmt: skip
        code, stdout, stderr = _finish(proc)
        assert code == 0, stderr
        foreign = [line for line in stderr.splitlines() if line.strip() and not line.startswith("cogbatch: ")]
        assert foreign == [], stderr
        assert "\x1b" not in stderr and "cogbatch: 8/8 images (100%)" in stderr
        assert stdout.startswith("8 files, 8 distinct images: 16 ok, 0 failed")
        assert re.search(r"^ray: 2 actor\(s\), start-up [\d.]+ s$", stdout, re.MULTILINE)  # the summary says the cost
