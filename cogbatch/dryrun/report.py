"""The dry run's figures: one JSON-able dict, and a table for people.

Bytes everywhere (the table shows GiB). `peak_*` come from the allocator model over the whole run;
`phases` give each phase's peaks while it ran (every byte live on the device then, not the phase's own
work: `growth` is that), beside the planner's prediction for the phase (`planned`, with its margin).
"""

from __future__ import annotations

import platform
import resource
from dataclasses import asdict, dataclass
from typing import Any

GiB = 2**30
PHASE_ORDER = ("load", "placement", "vision_encode", "prefix_prefill", "slot_cache", "prompt_prefill", "decode",
               "worker", "generate")  # fmt: skip
INT_OPS = ("_convert_weight_to_int4pack", "_weight_int4pack_mm", "_convert_weight_to_int4pack_for_cpu",
           "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm", "_int_mm")  # fmt: skip


@dataclass
class TraceReport:
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def table(self) -> str:
        """A readable summary: the run, per-phase peaks beside the planner, kernels, counters."""
        d = self.data
        g = lambda n: "-" if n is None else f"{n / GiB:6.2f}"  # noqa: E731
        c = d["config"]
        lines = [
            f"{c['model']} sm{c['capability'][0]}{c['capability'][1]} {c['dtype']} {d['quantization']}, "
            f"batch {c['batch']}, {c['images']} images x {c['tasks']} task(s), {c['new_tokens']} new tokens, "
            f"card {c['card_bytes'] / GiB:.2f} GiB (allocator {d['device']['capacity_bytes'] / GiB:.2f} GiB)"
            + (", expandable segments" if d.get("allocator_expandable", c["expandable_segments"]) else ""),
        ]
        plan = d.get("plan")
        if plan:
            lines.append(f"plan: {plan['mode']}, {plan['slots']} slots, encode batch {plan['encode_batch']}, "
                         f"planned peak {g(plan['peak_bytes']).strip()} GiB")  # fmt: skip
        lines.append("")
        lines.append(f"{'phase':16s} {'calls':>6s} {'peak alloc':>10s} {'reserved':>9s} {'exact':>7s} "
                     f"{'growth':>7s} {'planned':>8s} {'trace s':>8s}")  # fmt: skip
        for name, p in d["phases"].items():
            lines.append(f"{name:16s} {p['calls']:6d} {g(p['peak_allocated']):>10s} {g(p['peak_reserved']):>9s} "
                         f"{g(p['peak_exact']):>7s} {g(p['growth']):>7s} {g(p.get('planned')):>8s} "
                         f"{p['seconds']:8.1f}")  # fmt: skip
        lines.append("")
        lines.append(f"peak allocated {g(d['peak_allocated_bytes']).strip()} GiB, peak reserved "
                     f"{g(d['peak_reserved_bytes']).strip()} GiB, planned {g(d['planned_peak_bytes']).strip()} GiB; "
                     f"out-of-memory events {d['oom_events']}, segment releases {d['segment_releases']}")  # fmt: skip
        load = d.get("load", {})
        if load:
            lines.append(f"weights on the device {g(load['weights_exact_bytes']).strip()} GiB "
                         f"(planner {g(load['planned_device_bytes']).strip()} GiB); kernels "
                         + ", ".join(f"{k} x{v}" for k, v in load["kernels"].items()))  # fmt: skip
        if "rows_ok" in d:
            lines.append(
                f"rows ok {d['rows_ok']}/{d['rows']}" + (f" ({'; '.join(d['row_errors'])})" if d["row_errors"] else "")
            )
        lines.append("int ops: " + (", ".join(f"{k} {v}" for k, v in d["int4_ops"].items()) or "none"))
        lines.append("sdpa: " + (", ".join(f"{k} {v}" for k, v in d["sdpa"].items()) or "none"))
        for phase, calls in d["sdpa_by_phase"].items():
            lines.append(f"  {phase}: " + ", ".join(f"{k} {v}" for k, v in calls.items()))
        t = d["timings"]
        lines.append("trace: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if isinstance(v, float))
                     + f"; {t['ops']} ops dispatched, max RSS {t['max_rss_bytes'] / GiB:.2f} GiB")  # fmt: skip
        for note in d["notes"]:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def build_report(cfg: Any, session: Any, out: dict[str, Any]) -> TraceReport:
    """Assemble the report from the session's counters and the driver's findings (`out`)."""
    import optimum.quanto
    import torch

    a = session.allocator.stats
    planned_phases = out.get("planned_phases", {})
    phases = {}
    for name in sorted(session.trace.phases, key=lambda n: PHASE_ORDER.index(n) if n in PHASE_ORDER else 99):
        p = session.trace.phases[name].to_dict()
        p.pop("name")
        p["seconds"] = round(p["seconds"], 2)
        planned = planned_phases.get(name)
        if name == "load":
            planned = out.get("load", {}).get("planned_device_bytes")
        p["planned"] = planned
        phases[name] = p
    by_phase: dict[str, dict[str, int]] = {}
    for (phase, backend), n in sorted(session.sdpa.by_phase.items()) if session.sdpa else []:
        by_phase.setdefault(phase, {})[backend] = n
    counts = session.mode.counts
    out["timings"]["ops"] = session.trace.ops
    out["timings"]["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    data = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "config"}
        | {"config": "custom" if cfg.config else None},
        "quantization": _describe_quant(cfg, out.get("load", {}).get("embeddings_on_cpu")),
        "device": {
            "capability": list(cfg.capability),
            "card_bytes": cfg.card_bytes,
            "capacity_bytes": session.allocator.capacity,
            "guard": session.guard,
        },
        "versions": {
            "torch": torch.__version__,
            "optimum_quanto": optimum.quanto.__version__,
            "python": platform.python_version(),
        },
        "peak_allocated_bytes": a.peak_allocated,
        "peak_reserved_bytes": a.peak_reserved,
        "peak_exact_bytes": session.trace.peak_exact["cuda"],
        "planned_peak_bytes": (out.get("plan") or {}).get("peak_bytes"),
        "plan": out.get("plan"),
        "plan_from_config": out.get("plan_from_config"),
        "phases": phases,
        "load": out.get("load", {}),
        "kernels": out.get("load", {}).get("kernels", {}),
        "int4_ops": {k: counts[k] for k in INT_OPS if counts.get(k)},
        "quanto_ops": {k: v for k, v in counts.items() if k not in INT_OPS and not k.startswith("_scaled")},
        "sdpa": dict(session.sdpa.calls) if session.sdpa else {},
        "sdpa_by_phase": by_phase,
        "sdpa_reasons": dict(session.sdpa.reasons) if session.sdpa else {},
        "oom_events": a.out_of_memory,
        "oom_sizes": a.oom_sizes[:20],
        "segment_releases": a.releases,
        "segments": a.segments,
        # The worker asks for expandable segments itself (unless PYTORCH_CUDA_ALLOC_CONF is set): what it ran with
        "allocator_expandable": session.allocator.expandable,
        "kernel_check_failures": dict(session.mode.check_failures),
        "oracle": dict(session.oracle.stats),
        "largest_allocations": _largest(session.trace.largest),
        "timings": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out["timings"].items()},
        "notes": out["notes"],
    }
    for key in ("rows", "rows_ok", "row_errors", "tokens_out", "prompt_tokens", "worker", "generate",
                "planned_phases_at_prompt"):  # fmt: skip
        if key in out:
            data[key] = out[key]
    return TraceReport(data)


def _largest(allocations: list[tuple[int, str, tuple[int, ...], str]]) -> list[dict[str, Any]]:
    """The device allocations of 256 MiB or more, one entry per (phase, shape, dtype) with its count."""
    seen: dict[tuple[str, tuple[int, ...], str], dict[str, Any]] = {}
    for nbytes, phase, shape, dtype in allocations:
        entry = seen.setdefault((phase, shape, dtype), {"bytes": nbytes, "phase": phase, "shape": list(shape),
                                                        "dtype": dtype, "count": 0})  # fmt: skip
        entry["count"] += 1
    return sorted(seen.values(), key=lambda e: -e["bytes"])[:12]


def _describe_quant(cfg: Any, embeddings_on_cpu: bool | None) -> str:
    """`int4-g64 +rules emb-cpu`: the weights and, as loaded, where the token embeddings were."""
    q = cfg.job_quantization()
    if isinstance(q, dict):
        text = f"{q.get('default', 'int4')}" + (f"-g{q['group_size']}" if q.get("group_size") else "")
        text += " +rules" if q.get("rules") else ""
        text += " kv-int8" if q.get("kv_cache") == "int8" else ""
    else:
        text = str(q)
    return text + (" emb-cpu" if embeddings_on_cpu else "")
