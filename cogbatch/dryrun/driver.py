"""The dry run itself, and the only module of `cogbatch.dryrun` that knows the project's internals.

What runs is the project's code, unmodified, on fake `cuda` tensors (`session.FakeCudaSession`):

* **load**: the worker's `load_model` (`CogVLM.from_pretrained` on `cuda`, the vision tower parked in
  host memory when the run swaps phases) through the quantizing loader. Only reading the checkpoint
  is replaced: `weight_files`, `scan_tensors` and the stream's `_checkpoint_tensors` hand out fake
  tensors of the checkpoint's shapes, from the real config.json and a tokenizer built by
  `cogbatch.testing.tokenizer.build_tokenizer` (no weights on disk). The loader's worker pool runs
  its blocks on the loading thread (`InlineExecutor`): fake and tracing modes are per thread.
  The builder of the first Linear of each (shape, rule, kernel) runs in full; for the others its
  allocations are replayed into the allocator and a weight of the same classes, shapes and
  strides is handed to the loader (`replay.LoaderMemo`); `trace_every_layer` traces them all.
* **worker**: `ModelWorker.process` of `images` images x `tasks` prompts under the job's plan (the
  planner's mode, or a forced one), with stop tokens off so that every request makes `new_tokens`
  tokens (as `scripts/bench_gpu.py` does).
* **generate** (optional): plain `model.generate` of a batch, every weight resident.
* **api** (`TraceConfig(api=True)`): the load and the worker part as a notebook runs them, `cogbatch.load`
  then `VLM.generate` of PIL images; the `load_model` and `ModelWorker` they call are the traced ones.

Phases are the project's own functions: `ModelWorker._place` (placement), `CogVLM.encode_images`
(vision encode), `decoding.prefill_prefixes` (prefix prefill), `ContinuousDecoder.__init__` (slot
cache), `ContinuousDecoder._prefill` (prompt prefill), `ContinuousDecoder._step` (decode). When the package is
reorganised, this module is the one to re-point.
"""

from __future__ import annotations

import contextlib
import gc
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import accelerate
import torch
from torch.utils._python_dispatch import _disable_current_modes, is_traceable_wrapper_subclass

import cogbatch.model.cogvlm as cogvlm_module
import cogbatch.model.decoding as decoding_module
import cogbatch.model.quant.loader as loader_module
import cogbatch.model.quant.quantizer as quantizer_module
import cogbatch.model.quant.stream as stream_module
from cogbatch.dryrun.config import DryRunError, TraceConfig
from cogbatch.dryrun.patches import AttrPatches
from cogbatch.dryrun.replay import LoaderMemo
from cogbatch.dryrun.report import TraceReport, build_report
from cogbatch.dryrun.session import FakeCudaSession

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_FAKE_SHARD = "model-fake.safetensors"  # named in the fake index, never opened (an empty file)
# A forced mode loads as a run in that mode would; auto lets the worker's loader predict it.
_PARK = {"swap": True, "resident": False, "auto": None}


class InlineExecutor(Executor):
    """The loader's pool, run on the calling thread: each block runs as it is submitted.

    The quantizer's per-thread scratch space goes at shutdown, as it goes with a pool thread's end.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        quantizer_module._local.__dict__.pop("quantizer", None)


def _in_phase(session: FakeCudaSession, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with session.trace.phase(name):
            return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapped


def write_checkpoint_dir(config: dict[str, Any], out: Path, dtype: str) -> Path:
    """A checkpoint directory without weights: config.json and a tokenizer (prompts need only lengths)."""
    from cogbatch.model.config import CogVLMConfig
    from cogbatch.testing.tokenizer import build_tokenizer

    config = {**config, "torch_dtype": _DTYPE_NAMES[dtype]}
    tokenizer, tokenizer_config, special = build_tokenizer(CogVLMConfig.from_dict(config))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / _FAKE_SHARD).write_bytes(b"")  # the loader sizes its shards for progress; nothing reads this one
    return out


def _fake_checkpoint_io(cfg_dict: dict[str, Any], dtype: torch.dtype) -> list[tuple[Any, str, Any]]:
    """Patches that make the loader read fake tensors of the checkpoint's shapes instead of shards."""
    from cogbatch.model.config import CogVLMConfig, checkpoint_tensor_shapes
    from cogbatch.model.weights import DERIVED_SUFFIXES, TensorInfo

    shapes = checkpoint_tensor_shapes(CogVLMConfig.from_dict(cfg_dict))
    code = {torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")

    def weight_files(ckpt: Path) -> list[Path]:
        return [Path(ckpt) / _FAKE_SHARD]

    def scan_tensors(files: list[Path]) -> dict[str, Any]:
        return {n: TensorInfo(files[0], tuple(s), code) for n, s in shapes.items()}

    def checkpoint_tensors(load: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, torch.empty(s, dtype=dtype)) for n, s in shapes.items() if not n.endswith(DERIVED_SUFFIXES))

    def stream_tensors(files: list[Path], device: Any = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        return ((n, torch.empty(s, dtype=dtype, device=device)) for n, s in shapes.items())

    # Skeletons live on `meta` with real nn.Parameters: under fake mode nn.Parameter(meta) is a FakeTensor,
    # which accelerate cannot rebuild (`type(param)(value)` needs a fake_mode argument).
    build_skeleton = loader_module.build_skeleton
    init_empty_weights = accelerate.init_empty_weights

    def build_skeleton_outside(*args: Any, **kwargs: Any) -> Any:
        with _disable_current_modes():
            return build_skeleton(*args, **kwargs)

    @contextlib.contextmanager
    def init_empty_weights_outside(*args: Any, **kwargs: Any) -> Iterator[None]:
        with _disable_current_modes(), init_empty_weights(*args, **kwargs):
            yield

    from cogbatch.model.cogvlm import CogVLM

    module_to = CogVLM.to

    def to_in_place(self: Any, *args: Any, **kwargs: Any) -> Any:
        # The unquantized loader's `model.to(device)` moves the (real) rotary buffers; its parameters are on
        # the device already. Module._apply would swap every FakeTensor parameter for itself, which
        # swap_tensors refuses for tensors that fake mode's memo refers to weakly.
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or dtype is not None or any(p.device.type != device.type for p in self.parameters()):
            return module_to(self, *args, **kwargs)
        for m in self.modules():
            for name, buf in m._buffers.items():
                if buf is not None and buf.device.type != device.type:
                    m._buffers[name] = buf.to(device)
        return self

    return [
        (CogVLM, "to", to_in_place),
        (accelerate, "init_empty_weights", init_empty_weights_outside),
        (cogvlm_module, "weight_files", weight_files),
        (cogvlm_module, "scan_tensors", scan_tensors),
        (cogvlm_module, "stream_tensors", stream_tensors),
        (stream_module, "_checkpoint_tensors", checkpoint_tensors),
        (stream_module, "make_pool", lambda workers: InlineExecutor()),
        (loader_module, "build_skeleton", build_skeleton_outside),
    ]


def _job(cfg: TraceConfig, ckpt: Path, work: Path) -> Any:
    from cogbatch.job import load_job
    from cogbatch.model.errors import ConfigError

    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "pipeline.yaml").write_text("{}\n")  # not a pipeline.yaml of the current directory
    tasks = [{"name": f"task{i}", "prompt": cfg.prompt, "max_new_tokens": cfg.new_tokens, "stop_on_repetition": False}
             for i in range(cfg.tasks)]  # fmt: skip
    job = {"model": str(ckpt), "input": {"folder": str(work / "images")}, "output": str(work / "out"),
           "device": "cuda", "dtype": cfg.dtype, "quantization": cfg.job_quantization(),
           "vram_ceiling": cfg.ceiling, "batch_size": cfg.batch, "cache_dir": str(work / "cache"),
           "tasks": tasks}  # fmt: skip
    try:
        return load_job(job, pipeline=work / "pipeline.yaml")
    except ConfigError as e:
        raise DryRunError(str(e)) from None


def _trace_worker_class(session: FakeCudaSession, short_decode: bool) -> type:
    from cogbatch.worker.worker import ModelWorker

    class TraceWorker(ModelWorker):
        """The pipeline's worker; every request makes exactly max_new_tokens (no stop token, no loop stop).

        With `short_decode` each request makes 2 of them, in a decoder sized for the task's max_new_tokens
        (`_planned_size_decoder`).
        """

        def _generation_config(self, task: Any, attempt: int) -> Any:
            gen = replace(super()._generation_config(task, attempt), stop_token_ids=(), stop_on_repetition=False)
            return replace(gen, max_new_tokens=min(2, gen.max_new_tokens)) if short_decode else gen

        def _place(self, phase: str) -> None:
            with session.trace.phase("placement"):
                super()._place(phase)

    return TraceWorker


def _force_mode(worker: Any, mode: str) -> list[str]:
    """Replace the planner's choice by `mode`: its own plan for that mode, or the same batches if none fits."""
    from cogbatch.planning.batches import plan_mode

    if mode == "auto" or worker.plan.mode == mode:
        return []
    mm, plan = worker.memory, worker.plan
    forced = plan_mode(mm, worker.ceiling, worker.max_text, worker.max_new, worker.slot_limit, None, mode)
    if forced is not None:
        worker.plan = forced
        return [f"mode {mode} forced (the planner chose {plan.mode})"]
    both = mode == "resident"
    peak = max(mm.decode_peak(plan.slots, plan.max_text, plan.max_new, both), mm.encode_peak(plan.encode_batch, both))
    worker.plan = replace(plan, mode=mode, peak_bytes=peak)
    return [f"mode {mode} forced with the {plan.mode} plan's batches, for which the planner predicts "
            f"{peak / 2**30:.2f} GiB (by the planner not even one request fits the {worker.ceiling / 2**30:.2f} GiB "
            f"ceiling in this mode)"]  # fmt: skip


def _planned(worker: Any, plan: Any, max_text: int) -> dict[str, int]:
    """The planner's predicted peak per phase for `plan` (margin included, as `plan.peak_bytes`)."""
    mm = worker.memory
    resident = plan.mode == "resident"
    engine = mm.decode_peak(plan.slots, max_text, plan.max_new, resident)
    both = mm.weights(True, True)
    return {
        "placement": both if resident else max(mm.weights(True, False), mm.weights(False, True)),
        "vision_encode": mm.encode_peak(plan.encode_batch, resident),
        "prefix_prefill": engine,
        "slot_cache": engine,
        "prompt_prefill": engine,
        "decode": engine,
    }


def _run_worker(session: FakeCudaSession, cfg: TraceConfig, jcfg: Any, model: Any, out: dict[str, Any]) -> None:
    from cogbatch.inputs.entries import ImageEntry
    from cogbatch.inputs.pending import Request
    from cogbatch.planning.report import plan_report
    from cogbatch.worker.loading import LoadedImage

    with session.outside():
        out["plan_from_config"] = plan_report(jcfg).to_dict()
    worker = _trace_worker_class(session, cfg.short_decode)(jcfg, "dryrun", model=model)
    out["notes"] += _force_mode(worker, cfg.mode)
    plan = worker.plan
    out["plan"] = plan.to_dict()
    if cfg.card_from_plan:
        session.allocator.capacity = plan.peak_bytes
        out["notes"].append(f"card from the plan: the allocator holds at most {plan.peak_bytes / 2**30:.2f} GiB")
    weights = {"vision": worker.memory.weights_vision, "language": worker.memory.weights_language}
    out["planned_phases"] = _planned(worker, plan, plan.max_text)
    # The same at the prompt's real length (the plan assumes 128 tokens until it has seen the prompts).
    prompt = max(len(model.build_inputs(None, cfg.prompt, None, t.template).input_ids) - 1 for t in jcfg.tasks)
    out["planned_phases_at_prompt"] = _planned(worker, plan, prompt)
    out["prompt_tokens"] = prompt
    size = model.config.vision.image_size
    chunk = []
    for i in range(cfg.images):
        entry = ImageEntry(image_id=f"{i:064x}", path=f"fake-{i}.jpg", values={})
        pixels = torch.empty(3, size, size)  # a fake CPU tensor: decoded pixels wait in host memory
        chunk.append(
            (LoadedImage(entry, pixels, size, size), [Request(entry, t, cfg.prompt, "dryrun") for t in jcfg.tasks])
        )
    t0 = time.perf_counter()
    sized = [(decoding_module, "ContinuousDecoder", _planned_size_decoder(worker.max_new))] if cfg.short_decode else []
    with session.trace.phase("worker"), AttrPatches(sized):
        rows = worker.process(chunk)
    out["timings"]["worker_s"] = time.perf_counter() - t0
    _worker_figures(worker, weights, rows, out)


def _traced_load(session: FakeCudaSession, memo: LoaderMemo, load_model: Callable[..., Any]) -> Callable[..., Any]:
    """The worker's `load_model` as the "load" phase, without the quantized-weights cache (fake weights)."""

    def load(jcfg: Any, park_vision: bool | None = None, use_cache: bool = True, progress: Any = None) -> Any:
        session.oracle.enabled = False  # the loader reads no values: no shadows to keep
        try:
            with session.trace.phase("load"):
                model = load_model(jcfg, park_vision=park_vision, use_cache=False, progress=progress)
        finally:
            session.oracle.enabled = True
        memo.clear()
        gc.collect()
        return model

    return load


def _load_api(session: FakeCudaSession, cfg: TraceConfig, ckpt: Path, work: Path, traced_load: Any) -> Any:
    """`cogbatch.load` as a notebook calls it; its `load_model` and `ModelWorker` are the traced ones."""
    import cogbatch.worker.placement as placement_module
    import cogbatch.worker.worker as worker_module
    from cogbatch.model.errors import ConfigError
    from cogbatch.vlm import load

    worker_class = _trace_worker_class(session, cfg.short_decode)
    patches = [(placement_module, "load_model", traced_load), (worker_module, "ModelWorker", worker_class)]
    try:
        with AttrPatches(patches):
            return load(str(ckpt), device="cuda", dtype=cfg.dtype, quantization=cfg.job_quantization(),
                        vram_ceiling=cfg.ceiling, batch_size=cfg.batch, cache_dir=work / "cache",
                        pipeline=work / "pipeline.yaml", max_new_tokens=cfg.new_tokens,
                        stop_on_repetition=False)  # fmt: skip
    except ConfigError as e:
        raise DryRunError(str(e)) from None


def _run_api(session: FakeCudaSession, cfg: TraceConfig, vlm: Any, out: dict[str, Any]) -> None:
    """`VLM.generate` of `images` PIL images x `tasks` prompts: decoded, planned and run by `cogbatch.vlm`."""
    from PIL import Image

    from cogbatch.planning.report import plan_report

    worker = vlm._worker
    with session.outside():
        out["plan_from_config"] = plan_report(vlm.config).to_dict()
    prompt = len(vlm.model.build_inputs(None, cfg.prompt, None, "chat").input_ids) - 1
    weights = {"vision": worker.memory.weights_vision, "language": worker.memory.weights_language}
    images = [Image.new("RGB", (64, 48), (i % 256, i // 256 % 256, 0)) for i in range(cfg.images)]  # distinct ids
    prompts = {f"task{i}": cfg.prompt for i in range(cfg.tasks)}
    planned: dict[str, Any] = {}
    use_tasks = worker.use_tasks

    def planned_call(call_cfg: Any) -> None:  # the call's plan (its tasks'), before the run calibrates it
        use_tasks(call_cfg)
        if not planned:
            p = worker.plan
            planned.update(plan=p, phases=_planned(worker, p, p.max_text), at_prompt=_planned(worker, p, prompt))

    worker.use_tasks = planned_call
    t0 = time.perf_counter()
    sized = [(decoding_module, "ContinuousDecoder", _planned_size_decoder(worker.max_new))] if cfg.short_decode else []
    with session.trace.phase("worker"), AttrPatches(sized):
        answers = vlm.generate(images, prompts)
    out["timings"]["worker_s"] = time.perf_counter() - t0
    out["plan"] = planned["plan"].to_dict()
    out["planned_phases"], out["planned_phases_at_prompt"] = planned["phases"], planned["at_prompt"]
    out["prompt_tokens"] = prompt
    rows = [{"status": "ok" if a.ok else "error", "error": a.error, "tokens_out": a.tokens_out}
            for by_task in answers for a in by_task.values()]  # fmt: skip
    _worker_figures(worker, weights, rows, out)


def _worker_figures(worker: Any, weights: dict[str, int], rows: list[dict], out: dict[str, Any]) -> None:
    out["rows"] = len(rows)
    out["rows_ok"] = sum(r["status"] == "ok" for r in rows)
    out["row_errors"] = sorted({r["error"] for r in rows if r["status"] != "ok"})
    out["tokens_out"] = [r.get("tokens_out") for r in rows]
    out["worker"] = {
        "weights": weights,  # device bytes of each phase's weights, as the planner measured them after the load
        "stats": worker.summary_stats(),
        "measured_work": {k: {"predicted": p, "measured": m} for k, (p, m) in worker._measured.items()},
        "correction_after": worker.memory.correction,
        "plan_after": worker.plan.to_dict(),
        "max_text": worker.max_text,
    }


def _planned_size_decoder(max_new: int) -> type:
    """The decoder with its cache sized for the plan's `max_new` tokens, whatever its requests ask (`short_decode`)."""
    base = decoding_module.ContinuousDecoder

    class PlannedSizeDecoder(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "max_new": max_new})

    return PlannedSizeDecoder


def _run_generate(session: FakeCudaSession, cfg: TraceConfig, model: Any, out: dict[str, Any]) -> None:
    from cogbatch.model.settings import GenerationConfig

    size = model.config.vision.image_size
    samples = [model.build_inputs(None, cfg.prompt, torch.empty(3, size, size), "chat") for _ in range(cfg.batch)]
    gcfg = GenerationConfig(max_new_tokens=cfg.new_tokens, stop_token_ids=(), stop_on_repetition=False)
    t0 = time.perf_counter()
    with session.trace.phase("generate"):
        result = model.generate(model.collate(samples), gcfg)
    out["timings"]["generate_s"] = time.perf_counter() - t0
    out["generate"] = {"tokens": [len(t) for t in result.token_ids], "prompt_tokens": result.prompt_tokens}


def trace(cfg: TraceConfig) -> TraceReport:
    """Run the configured dry run and return its report (see `report.TraceReport`)."""
    from cogbatch.worker.placement import load_model

    t_start = time.perf_counter()
    cfg_dict = cfg.config_dict()
    dtype = getattr(torch, _DTYPE_NAMES[cfg.dtype])
    session = FakeCudaSession(
        capability=cfg.capability,
        card_bytes=cfg.card_bytes,
        context_bytes=cfg.context_bytes,
        expandable_segments=cfg.expandable_segments,
        raise_oom=cfg.raise_oom,
        strict_kernels=cfg.strict_kernels,
        guard_build_dir=_guard_build_dir(),
    )
    out: dict[str, Any] = {"timings": {}, "notes": []}
    with tempfile.TemporaryDirectory(prefix="cogbatch-dryrun-") as tmp:
        work = Path(tmp)
        ckpt = write_checkpoint_dir(cfg_dict, work / "checkpoint", cfg.dtype)
        jcfg = _job(cfg, ckpt, work)
        quant_arg = jcfg.quantization.effective()
        memo = LoaderMemo(session, stream_module.linear_builder, cfg.trace_every_layer)
        patches = [*_fake_checkpoint_io(cfg_dict, torch.bfloat16), (stream_module, "linear_builder", memo)]
        with session, AttrPatches(patches), AttrPatches(_phase_hooks(session)):
            t0 = time.perf_counter()
            traced_load = _traced_load(session, memo, load_model)
            vlm = _load_api(session, cfg, ckpt, work, traced_load) if cfg.api else None
            model = vlm.model if vlm is not None else traced_load(jcfg, park_vision=_PARK.get(cfg.mode))
            out["timings"]["load_s"] = time.perf_counter() - t0
            out["load"] = _load_figures(session, model, memo, quant_arg, dtype)
            if cfg.generate:
                _run_generate(session, cfg, model, out)
                gc.collect()
                torch.cuda.empty_cache()  # the worker part then starts from the load's state, as in a run
            if cfg.worker and vlm is not None:
                _run_api(session, cfg, vlm, out)
            elif cfg.worker:
                _run_worker(session, cfg, jcfg, model, out)
            del model, vlm
            gc.collect()
    out["timings"]["total_s"] = time.perf_counter() - t_start
    return build_report(cfg, session, out)


def _phase_hooks(session: FakeCudaSession) -> list[tuple[Any, str, Any]]:
    """The project functions whose calls are the phases of the report."""
    from cogbatch.model.cogvlm import CogVLM

    engine = decoding_module.ContinuousDecoder
    return [
        (decoding_module, "prefill_prefixes", _in_phase(session, "prefix_prefill", decoding_module.prefill_prefixes)),
        (engine, "__init__", _in_phase(session, "slot_cache", engine.__init__)),
        (engine, "_prefill", _in_phase(session, "prompt_prefill", engine._prefill)),
        (engine, "_step", _in_phase(session, "decode", engine._step)),
        (CogVLM, "encode_images", _in_phase(session, "vision_encode", CogVLM.encode_images)),
    ]


def _kernels_by_component(model: Any) -> dict[str, dict[str, int]]:
    """Weight class of the quantized Linears per component (vision, language, lm_head): the kernel each runs."""
    from cogbatch.model.quant.plan import component_of

    out: dict[str, Counter[str]] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if w is not None and is_traceable_wrapper_subclass(w.data):
            out.setdefault(component_of(name + "."), Counter())[type(w.data).__name__] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def _load_figures(session: FakeCudaSession, model: Any, memo: LoaderMemo, quant_arg: Any, dtype: Any) -> dict:
    from cogbatch.model.quant.plan import predict_weight_bytes
    from cogbatch.model.quant.spec import QuantConfig

    embeddings_on_cpu = model.model.embed_tokens.weight.device.type == "cpu"  # the job's setting, or auto's choice
    quant = QuantConfig.parse(quant_arg)
    if quant is not None:
        quant = replace(quant, embeddings_on_cpu=embeddings_on_cpu)
    planned = predict_weight_bytes(model.config, quant, dtype)["device"]
    report = model.load_report
    return {
        "embeddings_on_cpu": embeddings_on_cpu,
        "weights_allocated_bytes": session.allocator.stats.allocated,
        "weights_exact_bytes": session.trace.exact["cuda"],
        "reserved_after_bytes": session.allocator.stats.reserved,
        "host_bytes": report.host_bytes,
        "kernels": dict(report.kernels),
        "kernels_by_component": _kernels_by_component(model),
        "fallback_layers": report.fallback_layers,
        "traced_layers": memo.traced,
        "replayed_layers": memo.replayed,
        "vision_parked": all(p.device.type == "cpu" for p in model.vision_tower.parameters()),
        "planned_device_bytes": planned,
    }


def _guard_build_dir() -> Path:
    """Where the fallback guard extension is built, if ever: under the cogbatch cache directory."""
    from cogbatch.model.quant.cache import default_cache_dir

    return default_cache_dir() / "dryrun-guard"
