"""Stage 6, write: the model(s), plan.json, report.json/.csv/.md and the Pareto plot."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from typing import TYPE_CHECKING

from .constraints import format_bytes, format_flops, format_seconds
from .model import atomic_write_bytes

if TYPE_CHECKING:
    from . import search
    from .api import _Explored
    from .plan import Plan


def peak_memory_bytes() -> int | None:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that across
    fork and exec, so a child of a big parent reports the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def output_paths(out: Path) -> dict[str, Path]:
    """Every file `optimize -o out.onnx` may write (CLI.md, Output files)."""
    out = Path(out)
    stem = out.name[:-5] if out.name.endswith(".onnx") else out.name
    base = out.parent / stem
    return {"model": out, "plan": Path(f"{base}.plan.json"), "json": Path(f"{base}.report.json"),
            "csv": Path(f"{base}.report.csv"), "md": Path(f"{base}.report.md"),
            "png": Path(f"{base}.pareto.png"), "closest": Path(f"{base}.closest.onnx"),
            "closest_plan": Path(f"{base}.closest.plan.json")}


def alt_paths(out: Path, k: int) -> tuple[Path, Path]:
    paths = output_paths(out)
    base = str(paths["model"])[:-5] if str(paths["model"]).endswith(".onnx") else str(paths["model"])
    return Path(f"{base}.alt{k}.onnx"), Path(f"{base}.alt{k}.plan.json")


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


CSV_FIELDS = ["layer", "spec", "method", "params", "flops", "error", "latency_ms", "p90_ms", "latency_bound_ms", "dropped",
              "chosen"]


def candidate_rows(space, chosen: dict) -> list[dict]:
    rows = []
    for name in sorted(space.candidates):
        for c in space.candidates[name]:
            rows.append({"layer": name, "spec": c.spec, "method": c.choice.method, "params": c.params,
                         "flops": c.flops, "error": None if math.isnan(c.error) else round(c.error, 6),
                         # a bound (model-guided timing: never timed) is not a latency
                         "latency_ms": None if c.latency is None or c.latency_bound else round(c.latency * 1e3, 5),
                         "latency_bound_ms": round(c.latency * 1e3, 5) if c.latency_bound else None,
                         "p90_ms": None if c.p90 is None else round(c.p90 * 1e3, 5),
                         "dropped": c.dropped, "chosen": chosen.get(name) is c,
                         # a pair's candidate replaces these layers too (its params and FLOPs are the pair's)
                         "covers": list(c.covers)})
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
    atomic_write_bytes(path, buf.getvalue().encode())


def markdown(report: dict) -> str:
    b, r = report["baseline"], report.get("result")
    lines = [f"# denseflex-onnx report: {Path(report['model']).name}", "",
             f"Status: **{report['status']}**. Provider {report['provider']}, {report['threads']} thread(s), "
             f"inputs {report['input_shapes']}, factorization {report['factorization']}, metric {report['metric']}.", ""]
    if report.get("misses"):
        lines += ["Missed: " + "; ".join(report["misses"]), ""]
    lines += ["| | latency | weights | FLOPs | metric |", "|---|---|---|---|---|",
              f"| original | {format_seconds(b['latency_s'])} | {format_bytes(b['bytes'])} | "
              f"{format_flops(b['flops'])} | {b['metric']:.2f} |"]
    if r:
        lines.append(f"| chosen | {format_seconds(r['latency_s'])} ({r['speedup']:.2f}x) | {format_bytes(r['bytes'])} | "
                     f"{format_flops(r['flops'])} | {r['metric']:.2f} |")
    q = report.get("int8_baseline")
    if q:
        lines.append(f"| {INT8_BASELINE} | {format_seconds(q['latency_s'])} ({q['speedup']:.2f}x) | "
                     f"{format_bytes(q['bytes'])} | {format_flops(q['flops'])} | {q['metric']:.2f} |")
    s = report["stages"]
    lines += ["", "## Design space", "",
              f"Grid {s['grid']} candidates; {s['after_saves_nothing']} after dropping those that save nothing; "
              f"{s['after_dominated']} after dropping Pareto-dominated ones (params, FLOPs, error); "
              f"{s.get('after_timing', '-')} after timing. {s.get('timed', 0)} timed in this run, "
              f"{s.get('cached', 0)} from the cache; {100 * s.get('never_timed_share', 0):.1f}% of the grid never timed."
              + _results_line(s.get("results_cached") or {}),
              "", "## Layers", "",
              "Layer error: the relative output error estimated on calibration samples the layer's fit did not "
              "see (data-aware modes: fitted on every other one, measured on the rest); held out: measured "
              "on the evaluation samples, each layer alone on the original model's inputs (a pruned pair: its "
              "consumer's output).", "",
              "| layer | choice | params | FLOPs | layer error | held out | latency (ms) |",
              "|---|---|---|---|---|---|---|"]
    held = report.get("held_out_errors") or {}
    for row in report["candidates"]:
        if row["chosen"]:
            lat = "" if row["latency_ms"] is None else f"{row['latency_ms']:.4f}"
            h = f"{held[row['layer']]:.4f}" if row["layer"] in held and row["method"] != "dense" else ""
            lines.append(f"| {row['layer']} | {row['spec']} | {row['params']} | {row['flops']} | "
                         f"{row['error'] if row['error'] is not None else ''} | {h} | {lat} |")
    special = {n: st for n, st in report.get("statistics", {}).items() if st["kind"] != "full"}
    if special or report.get("kept_dense"):
        lines += ["", "## Statistics and layers kept dense", "",
                  f"Memory budget {format_bytes(report.get('memory_budget_bytes') or 0)}; this run's peak "
                  f"{format_bytes(report.get('peak_memory_bytes') or 0)}. Every other layer kept its full X^T X.", ""]
        lines += [f"- {n}: {st['kind']} ({st['why']})" for n, st in special.items()]
        lines += [f"- {n}: kept dense before any statistics ({why})" for n, why in report.get("kept_dense", {}).items()]
    if report.get("verifications"):
        lines += ["", "## End-to-end verifications", "",
                  "Each plan built and measured; the uniform ones are the simplest baselines, verified first, "
                  "beside the search's." + _correction_line(report.get("error_correction") or {}), "",
                  "| plan | estimated error (sum) | measured drop | latency | speedup | metric | missed |",
                  "|---|---|---|---|---|---|---|"]
        for v in report["verifications"]:
            what = v.get("uniform") or f"search, error budget {v['error_budget']:.4g}"
            drop = v.get("metric_drop")
            lines.append(f"| {what} | {v.get('estimated_error', 0):.4g} | {'' if drop is None else f'{drop:.2f}'} | "
                         f"{format_seconds(v['latency_s'])} | {v['speedup']:.2f}x | "
                         f"{v['metric']:.2f} | {', '.join(v['misses']) or '-'} |")
    return "\n".join(lines) + "\n"


def _correction_line(scale: dict[str, float]) -> str:
    if not scale:
        return ""
    return (" Their measured drops corrected the estimates the search weighed: "
            + ", ".join(f"{m} errors x{x:.3g}" for m, x in sorted(scale.items())) + " (in factorization's units).")


def pareto_png(path: Path, report: dict) -> None:
    """Left: verified plans, latency vs metric, marker size = params, those with INT8 layers in
    their own colour, beside the original and whole-model INT8. Right: every timed candidate,
    latency relative to its dense layer vs layer error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    b = report["baseline"]
    points = [(b["latency_s"] * 1e3, b["metric"], b["params"], "original")]
    for v in report.get("verifications", []):
        mixed = any(spec.endswith("+int8") for spec in v.get("plan", {}).values())
        points.append((v["latency_s"] * 1e3, v["metric"], v["params"], "plan with INT8 layers" if mixed else "float plan"))
    peak = max(p[2] for p in points) or 1
    colours = {"original": "black", "float plan": "tab:blue", "plan with INT8 layers": "tab:green"}
    for kind, colour in colours.items():
        mine = [p for p in points if p[3] == kind]
        if mine:
            left.scatter([p[0] for p in mine], [p[1] for p in mine], s=[20 + 300 * p[2] / peak for p in mine],
                         alpha=0.6, color=colour, label=kind)
    r = report.get("result")
    if r:
        left.scatter(r["latency_s"] * 1e3, r["metric"], s=20 + 300 * r["params"] / peak, facecolors="none",
                     edgecolors="red", linewidths=2, label="chosen")
    q = report.get("int8_baseline")
    if q:
        left.scatter(q["latency_s"] * 1e3, q["metric"], s=60, marker="x", color="tab:orange", label=INT8_BASELINE)
    line = sorted(report.get("frontier") or [], key=lambda p: p["latency_s"])
    if line:
        left.plot([p["latency_s"] * 1e3 for p in line], [p["metric"] for p in line], color="gray", lw=1,
                  ls="--", label="estimated frontier (solver over error budgets)")
    left.legend(fontsize=8)
    left.set_xlabel("latency (ms)")
    left.set_ylabel(report["metric"])
    left.set_title("end to end (marker size = params)")
    dense = {row["layer"]: row["latency_ms"] for row in report["candidates"] if row["spec"] == "dense"}
    kind = lambda row: row["method"] + ("+int8" if row["spec"].endswith("+int8") else "")     # noqa: E731
    timed = [row for row in report["candidates"] if row["latency_ms"] is not None and row["error"] is not None
             and dense.get(row["layer"]) and row["spec"] != "dense"]
    for method in sorted({kind(row) for row in timed}):
        mine = [row for row in timed if kind(row) == method]
        right.scatter([row["error"] for row in mine], [row["latency_ms"] / dense[row["layer"]] for row in mine],
                      s=10, alpha=0.6, label=method)
    chosen = [row for row in report["candidates"] if row["chosen"] and row["latency_ms"] is not None
              and dense.get(row["layer"])]
    right.scatter([row["error"] or 0 for row in chosen], [row["latency_ms"] / dense[row["layer"]] for row in chosen],
                  s=40, facecolors="none", edgecolors="red", label="chosen")
    right.axhline(1.0, color="gray", lw=0.8)
    right.set_xlabel("layer error (relative, calibration data)")
    right.set_ylabel("latency / dense layer")
    right.set_title("timed candidates")
    right.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _results_line(hits: dict) -> str:
    """What came from the results cache (an earlier run with the same inputs), if anything."""
    names = {"errors": "layers' candidate errors", "probe": "sensitivity probes", "verified": "verified plans",
             "statistics": "calibration statistics", "reference": "original model outputs",
             "held-out errors": "held-out layer errors", "solution": "solver runs",
             "removal order": "channel removal orders"}
    parts = [f"{n} {names.get(kind, kind)}" for kind, n in sorted(hits.items()) if n]
    return f" From the results cache: {', '.join(parts)}." if parts else ""


def explore_report(ex: "_Explored", path, status, chosen: dict, verified: "search.Verified | None",
                   misses: list[str], steps: list, plan: "Plan | None") -> dict:
    """report.json's content for a run (`ex`, api._explore's), its chosen plan and the verifications."""
    grid = ex.space.stage_counts.get("grid", 0)
    never = sum(1 for c in ex.space.all() if c.latency is None or c.latency_bound)
    stages = {**ex.space.stage_counts, "timed": ex.measure_stats.timed, "cached": ex.measure_stats.cached,
              "timing_failed": ex.measure_stats.failed, "not_timed_budget": ex.measure_stats.skipped_budget,
              "never_timed_share": never / grid if grid else 0.0,
              # layer errors, probes and verified plans an earlier run with the same inputs computed
              "results_cached": dict(ex.results.hits) if ex.results else {}}
    b = ex.baseline
    params_total = ex.prep.discovery.total_params
    out = {
        "status": status, "model": str(path), "model_sha256": ex.prep.loaded.sha256,
        "provider": ex.provider, "threads": ex.threads,
        "input_shapes": {k: list(v) for k, v in ex.prep.loaded.input_shapes.items()},
        "factorization": ex.mode, "calibration": ex.calibration, "metric": ex.metric,
        "samples": {"calibration": ex.calib.samples, "evaluation": ex.evaluation.samples,
                    "synthetic": ex.calib.synthetic},
        "constraints": {"latency": ex.constraints.latency and ex.constraints.latency.text,
                        "memory": ex.constraints.memory and ex.constraints.memory.text,
                        "flops": ex.constraints.flops and ex.constraints.flops.text,
                        "max_accuracy_drop": ex.constraints.max_accuracy_drop,
                        "objective": ex.constraints.objective},
        "baseline": {"latency_s": b.latency, "bytes": b.bytes, "flops": b.flops, "metric": b.metric,
                     "params": params_total},
        "stages": stages, "misses": misses,
        "kept_dense": ex.kept_dense, "statistics": ex.statistics,
        "memory_budget_bytes": ex.memory_budget, "peak_memory_bytes": peak_memory_bytes(),
        "sensitivity": {n: {"scale": ex.space.error_scale.get(n, 1.0), "probes": p} for n, p in ex.sensitivity.items()},
        "plan": plan.to_json() if plan else None,
        "verifications": [step_row(ex, s) for s in steps if s.verified is not None],
        "candidates": candidate_rows(ex.space, chosen),
    }
    if verified is not None:
        params = params_total + sum(ex.space.delta(c, "params") for c in chosen.values())
        out["result"] = {"latency_s": b.latency * verified.latency / verified.baseline_latency,
                         "latency_ab_s": [verified.baseline_latency, verified.latency],
                         "speedup": verified.speedup, "bytes": verified.bytes, "flops": verified.flops,
                         "params": params, "metric": verified.metric, "metric_drop": b.metric - verified.metric}
    return out


# the baseline row every optimize report shows beside the original and the chosen plan
INT8_BASELINE = "INT8 (whole model, dynamic)"


def measured_row(ex: "_Explored", v: "search.Verified") -> dict:
    """A measured model's figures (api: the whole-model INT8 baseline), latency on the baseline's
    scale through its A/B ratio."""
    return {"latency_s": ex.baseline.latency * v.latency / v.baseline_latency, "speedup": v.speedup,
            "bytes": v.bytes, "flops": v.flops, "metric": v.metric, "metric_drop": ex.baseline.metric - v.metric}


def step_row(ex: "_Explored", step) -> dict:
    v = step.verified
    params = ex.prep.discovery.total_params + sum(ex.space.delta(c, "params") for c in step.choices.values())
    return {"error_budget": step.error_budget, "uniform": step.label, "estimated_error": step.estimate.error,
            "metric_drop": ex.baseline.metric - v.metric,
            "latency_s": ex.baseline.latency * v.latency / v.baseline_latency,
            "speedup": v.speedup, "metric": v.metric, "bytes": v.bytes, "flops": v.flops, "params": params,
            "misses": list(step.misses), "plan": {n: c.spec for n, c in step.choices.items() if not c.is_dense}}


def missed_line(misses: dict) -> list[str]:
    """Each missed limit as `name reached > limit (+x%)`."""
    out = []
    for name, (reached, limit) in misses.items():
        fmt = {"latency": format_seconds, "memory": format_bytes, "flops": format_flops}.get(name, lambda v: f"{v:.2f}")
        pct = f" (+{100 * (reached / limit - 1):.0f}%)" if limit > 0 else ""
        out.append(f"{name} {fmt(reached)} > {fmt(limit)}{pct}")
    return out
