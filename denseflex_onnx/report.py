"""Stage 6, write: the model(s), plan.json, report.json/.csv/.md and the Pareto plot."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .constraints import format_bytes, format_flops, format_seconds
from .model import atomic_write_bytes


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


CSV_FIELDS = ["layer", "spec", "method", "params", "flops", "error", "latency_ms", "p90_ms", "dropped", "chosen"]


def candidate_rows(space, chosen: dict) -> list[dict]:
    rows = []
    for name in sorted(space.candidates):
        for c in space.candidates[name]:
            rows.append({"layer": name, "spec": c.spec, "method": c.choice.method, "params": c.params,
                         "flops": c.flops, "error": None if math.isnan(c.error) else round(c.error, 6),
                         "latency_ms": None if c.latency is None else round(c.latency * 1e3, 5),
                         "p90_ms": None if c.p90 is None else round(c.p90 * 1e3, 5),
                         "dropped": c.dropped, "chosen": chosen.get(name) is c})
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
    """Left: verified plans, latency vs metric, marker size = params. Right: every timed candidate,
    latency relative to its dense layer vs layer error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    b = report["baseline"]
    points = [(b["latency_s"] * 1e3, b["metric"], b["params"], "original")]
    for v in report.get("verifications", []):
        points.append((v["latency_s"] * 1e3, v["metric"], v["params"], "plan"))
    peak = max(p[2] for p in points) or 1
    for lat, metric, params, kind in points:
        left.scatter(lat, metric, s=20 + 300 * params / peak, alpha=0.6,
                     color="black" if kind == "original" else "tab:blue")
    r = report.get("result")
    if r:
        left.scatter(r["latency_s"] * 1e3, r["metric"], s=20 + 300 * r["params"] / peak, facecolors="none",
                     edgecolors="red", linewidths=2, label="chosen")
        left.legend()
    left.set_xlabel("latency (ms)")
    left.set_ylabel(report["metric"])
    left.set_title("end to end (marker size = params)")
    dense = {row["layer"]: row["latency_ms"] for row in report["candidates"] if row["method"] == "dense"}
    for method in sorted({row["method"] for row in report["candidates"]} - {"dense"}):
        xs = [row["error"] for row in report["candidates"] if row["method"] == method and row["latency_ms"] is not None
              and row["error"] is not None and dense.get(row["layer"])]
        ys = [row["latency_ms"] / dense[row["layer"]] for row in report["candidates"] if row["method"] == method
              and row["latency_ms"] is not None and row["error"] is not None and dense.get(row["layer"])]
        right.scatter(xs, ys, s=10, alpha=0.6, label=method)
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
             "held-out errors": "held-out layer errors", "solution": "solver runs"}
    parts = [f"{n} {names.get(kind, kind)}" for kind, n in sorted(hits.items()) if n]
    return f" From the results cache: {', '.join(parts)}." if parts else ""
