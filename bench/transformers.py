"""Transformers: MiniLM-L6 at FLOPs -15%, -25% and -40%: the full search, three ablations, the
uniform baselines and whole-model dynamic INT8, all measured in one run.

Each cell is optimize as a user calls it,

    denseflex_onnx.optimize(MODEL, OUT, flops=LIMIT, max_accuracy_drop=2, data="models/minilm_sentences.npz",
                            input_shapes={input_ids, attention_mask, token_type_ids: (1, 64)},
                            cache_dir=CACHE, timing=Budget(min_runs=5, max_runs=100, max_seconds=0.2))

with one profile cache shared by every run of the bench (so only the first run times candidates
cold), and one change per ablation: methods=["svd", "tt"] (no channel pruning), sensitivity=False
(the layer errors unweighted by their one-layer probes), calibration="sequential" (the default is
independent) and max_verifications=1. Reported per cell: the held-out
metric (100 x mean cosine of the embedding to the original's over samples 128..511; the first 128
calibrate) and the speedup, both as the tool measured them (report["result"]: its interleaved A/B
against the original). An infeasible run shows its verified plan with the best metric among those
within the FLOPs limit, marked "infeasible". The uniform baselines ("rank 0.5 everywhere", "keep 0.5
everywhere": per family the highest fraction whose estimate meets the limit) are the uniform rows
of the full search's own verifications at that limit. INT8 is
onnxruntime.quantization.quantize_dynamic (QInt8) of the whole model, scored with the tool's own
metric code (metrics.outputs/score) on the same held-out samples, its speedup an interleaved
5-round A/B against the original (bench/e2e.py `interleaved`); it has no FLOPs limit, so its cell
is the same in every column.

Runs go in priority order (INT8, then -25%, -15%, -40%, each with every variant); one is skipped
when the time left is less than a run like it took, and one still running at the end of the
budget is stopped; the markdown says which.

    python bench/transformers.py [--budget 1800] [--model models/minilm.onnx] [--out-md F] [--out-json F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    # bench/ first on sys.path would make this file the `transformers` package for everything
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import denseflex_onnx
from denseflex_onnx import data as data_mod, loading, metrics, profile
from denseflex_onnx.runtime import create_session

from bench import e2e

ROOT = Path(__file__).resolve().parent.parent
MODEL = e2e.MODELS["minilm"].path
DATA = e2e.MODELS["minilm"].data
SHAPES = e2e.MINILM_SHAPES
MAX_DROP = 2.0
LIMITS = ["-15%", "-25%", "-40%"]               # the table's columns
ORDER = ["-25%", "-15%", "-40%"]                # the order they run in
VARIANTS = [("search: all", {}), ("no channel pruning", {"methods": ["svd", "tt"]}),
            ("no layer sensitivity", {"sensitivity": False}),
            ("sequential calibration on", {"calibration": "sequential"}),
            ("one verification", {"max_verifications": 1})]
GUESS_S = {"optimize": 180.0, "int8": 40.0}     # what a task takes before one like it has run
RESERVE_S = 5.0


class Bench:
    def __init__(self, budget_s: float, model: Path, tmp: Path):
        self.t0, self.budget, self.model, self.tmp = time.monotonic(), budget_s, model, tmp
        self.cache = tmp / "cache"
        self.runs: dict[tuple[str, str], dict] = {}      # (variant, limit) -> record
        self.int8: dict | None = None
        self.took: dict[str, list[float]] = {}
        self.notes: list[str] = []
        self.problems: list[str] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def attempt(self, name: str, kind: str, fn, *args):
        """fn(*args) if a task like it fits in the time left; None when skipped, stopped or failed."""
        left = self.left() - RESERVE_S
        family = kind.split(":")[0]
        need = (self.took.get(kind) or self.took.get(family) or [GUESS_S[family]])[-1]
        if left < need:
            self.notes.append(f"{name}: skipped, a run like it takes about {need:.0f} s and {max(left, 0):.0f} s "
                              f"were left")
            return None
        t = time.monotonic()
        out = e2e.guarded(name, fn, args, left, self.notes, self.problems, "transformers")
        if out is None:
            return None
        for k in {kind, family}:
            self.took.setdefault(k, []).append(time.monotonic() - t)
        return out

    def optimize(self, variant: str, options: dict, limit: str) -> dict:
        out = Path(tempfile.mkdtemp(dir=self.tmp)) / "out.onnx"
        t = time.monotonic()
        result = denseflex_onnx.optimize(self.model, out, flops=limit, max_accuracy_drop=MAX_DROP, data=DATA,
                                         input_shapes=SHAPES, cache_dir=self.cache, timing=e2e.TIMING, **options)
        wall = time.monotonic() - t
        for f in result.files:          # the numbers are in the report; 90 MB a model is not kept
            Path(f).unlink(missing_ok=True)
        rep = result.report
        verifications = rep["verifications"]
        if result.status == "ok":
            shown = {"metric": rep["result"]["metric"], "speedup": rep["result"]["speedup"],
                     "flops": rep["result"]["flops"], "from": "result"}
        else:                           # the best verified metric within the FLOPs limit
            within = [v for v in verifications if "flops" not in v["misses"]]
            best = max(within, key=lambda v: v["metric"], default=None)
            shown = best and {"metric": best["metric"], "speedup": best["speedup"], "flops": best["flops"],
                              "from": best["uniform"] or f"error budget {best['error_budget']:.3g}"}
        rec = {"variant": variant, "limit": limit, "options": options, "status": result.status,
               "misses": result.misses, "wall_s": wall, "shown": shown, "result": rep.get("result"), "baseline": rep["baseline"],
               "calibration": rep["calibration"], "factorization": rep["factorization"],
               "samples": rep["samples"], "stages": rep["stages"], "verifications": verifications}
        self.runs[(variant, limit)] = rec
        print(f"[transformers] {variant} {limit}: {result.status}, {cell(shown, result.status)}, {wall:.0f} s",
              file=sys.stderr, flush=True)
        return rec

    def run_int8(self) -> dict:
        loaded = loading.load(self.model, SHAPES)
        calib, held = data_mod.split(data_mod.load_data(DATA, loaded), e2e.CALIB)
        int8 = e2e.quantize(self.model, self.tmp / "int8.onnx")
        t = time.monotonic()
        base, quant = e2e.interleaved([self.model, int8], profile.profiling_inputs(loaded, calib))
        ab_s = time.monotonic() - t
        reference = metrics.outputs(create_session(str(self.model)), held, loaded, None)
        result = metrics.outputs(create_session(str(int8)), held, loaded, None)
        self.int8 = {"metric": metrics.score("cosine", result, reference, None),
                     "original_metric": metrics.score("cosine", reference, reference, None),
                     "speedup": base / quant, "latency_ab_s": [base, quant], "ab_wall_s": ab_s,
                     "file_bytes": [e2e.file_bytes(self.model), e2e.file_bytes(int8)], "samples": held.samples}
        print(f"[transformers] INT8: {cell(self.int8, 'ok')}", file=sys.stderr, flush=True)
        return self.int8

    def main(self) -> None:
        self.attempt("INT8 (dynamic QInt8)", "int8", self.run_int8)
        for limit in ORDER:
            for variant, options in VARIANTS:
                self.attempt(f"{variant} at FLOPs {limit}", f"optimize:{variant}", self.optimize, variant, options,
                             limit)

    def uniform(self, limit: str) -> dict[str, dict]:
        """family ("rank", "keep") -> the uniform row the full search verified at this limit."""
        rec = self.runs.get(("search: all", limit))
        rows = [v for v in rec["verifications"] if v["uniform"]] if rec else []
        return {v["uniform"].split()[0]: v for v in rows}


def cell(shown: dict | None, status: str) -> str:
    if not shown:
        return "no plan within the limit"
    text = f"{shown['metric']:.2f} ({shown['speedup']:.2f}x)"
    return text if status == "ok" else f"{text} infeasible"


def render(b: Bench, elapsed: float) -> tuple[str, list[dict]]:
    any_run = next(iter(b.runs.values()), None)
    md = ["## Transformers (MiniLM-L6)", "",
          f"MiniLM-L6 (`{b.model.name}`, 1 x 64 tokens, CPU, 1 onnxruntime thread), optimize --flops LIMIT "
          f"--max-accuracy-drop {MAX_DROP:g} with models/minilm_sentences.npz; one profile cache for the whole run. "
          f"Each cell: 100 x mean cosine to the original's embedding on the held-out sentences (all but the first "
          f"{e2e.CALIB}, which calibrate), and the speedup, both as verified by the tool (its interleaved A/B); \"infeasible\": no plan "
          f"met every limit, the cell is the verified plan with the best cosine within the FLOPs limit. Uniform: the "
          f"full search's own verification of the uniform plan at that limit (fraction in brackets). INT8: "
          f"quantize_dynamic of the whole model, a {e2e.AB_ROUNDS}-round interleaved A/B; no FLOPs limit, the same "
          f"cell in every column.", ""]
    if any_run:
        base = any_run["baseline"]
        md += [f"Held out: {any_run['samples']['evaluation']} sentences. Original: {base['latency_s'] * 1e3:.1f} ms, {base['flops'] / 1e6:,.0f} MFLOPs (the limits are of "
               f"these), cosine {base['metric']:.2f}. Ran {elapsed:.0f} s of a {b.budget:.0f} s budget.", ""]
    md += ["| method | " + " | ".join(f"FLOPs {l}" for l in LIMITS) + " |", "|---|" + "---|" * len(LIMITS)]
    rows = []
    for variant, options in VARIANTS:
        cells = []
        for limit in LIMITS:
            r = b.runs.get((variant, limit))
            cells.append("not run" if r is None else cell(r["shown"], r["status"]))
            if r is not None:
                rows.append({"bench": "transformers", "variant": variant, "constraint": f"flops {limit}",
                             "status": r["status"], "metric_after": r["shown"] and r["shown"]["metric"],
                             "speedup_tool": r["shown"] and r["shown"]["speedup"],
                             "flops_after": r["shown"] and r["shown"]["flops"], "shown_from": r["shown"] and
                             r["shown"]["from"], "metric_before": r["baseline"]["metric"],
                             "flops_before": r["baseline"]["flops"], "verifications": len(r["verifications"]),
                             "wall_s": r["wall_s"]})
        md.append(f"| {variant} | " + " | ".join(cells) + " |")
    for family in ("rank", "keep"):
        cells = []
        for limit in LIMITS:
            v = b.uniform(limit).get(family)
            if v is None:
                cells.append("not run" if ("search: all", limit) not in b.runs else "none verified")
                continue
            fraction = v["uniform"].split()[1]
            missed = f", misses {', '.join(v['misses'])}" if v["misses"] else ""
            cells.append(f"{v['metric']:.2f} ({v['speedup']:.2f}x) [{fraction}{missed}]")
            rows.append({"bench": "transformers", "variant": f"uniform {family}", "constraint": f"flops {limit}",
                         "plan": v["uniform"], "status": "ok" if not v["misses"] else "misses " + ", ".join(v["misses"]),
                         "metric_after": v["metric"], "speedup_tool": v["speedup"], "flops_after": v["flops"]})
        md.append(f"| uniform {family} (from search: all) | " + " | ".join(cells) + " |")
    q = b.int8
    md.append("| INT8 (dynamic QInt8, whole model) | " + " | ".join(
        [cell(q, "ok") if q else "not run"] * len(LIMITS)) + " |")
    if q:
        rows.append({"bench": "transformers", "variant": "INT8 (dynamic QInt8)", "status": "ok",
                     "metric_after": q["metric"], "speedup_ab": q["speedup"], "file_bytes_before": q["file_bytes"][0],
                     "file_bytes_after": q["file_bytes"][1]})
    md += ["", "Wall time of each optimize (s; the first run times the candidates cold, the rest reuse its cache):",
           "", "| method | " + " | ".join(f"FLOPs {l}" for l in LIMITS) + " |", "|---|" + "---|" * len(LIMITS)]
    for variant, _ in VARIANTS:
        md.append(f"| {variant} | " + " | ".join(
            f"{b.runs[(variant, l)]['wall_s']:.0f}" if (variant, l) in b.runs else "-" for l in LIMITS) + " |")
    md.append("")
    if b.notes or b.problems:
        md += ["Not measured in this run:", ""] + [f"- {n}" for n in b.notes] + [f"- error: {p}" for p in b.problems]
        md.append("")
    return "\n".join(md).rstrip() + "\n", rows


def run(budget_s: float = 1800.0, model: Path | None = None, json_path: Path | None = None) -> dict:
    """The Transformers section of RESULTS.md and its CSV rows, within `budget_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="denseflex-transformers-") as tmp, e2e.captured_warnings() as warned:
        bench = Bench(budget_s, Path(model or MODEL), Path(tmp))
        unavailable = None
        if not bench.model.exists() and bench.model == MODEL:     # as bench/e2e.py: export it if it can
            finder = e2e.Bench(budget_s, Path(tmp))
            finder.ensure_minilm()
            unavailable = finder.unavailable.get("minilm")
        elif not bench.model.exists():
            unavailable = f"{bench.model}: no such file"
        if unavailable:
            bench.notes.append(f"everything: {unavailable}")
        else:
            bench.main()
        markdown, rows = render(bench, time.monotonic() - bench.t0)
    shown = {t: c for t, c in warned.seen.items() if "is symbolic; using 1" not in t}
    if shown:
        markdown += "\nWarnings the package logged: " + "; ".join(f"\"{t}\" (x{c})" for t, c in sorted(shown.items())) + "\n"
    if json_path is not None:
        Path(json_path).write_text(json.dumps({
            "model": str(bench.model), "data": str(DATA), "budget_s": budget_s,
            "elapsed_s": time.monotonic() - bench.t0, "max_accuracy_drop": MAX_DROP,
            "timing": dataclasses.asdict(e2e.TIMING), "runs": list(bench.runs.values()),
            "uniform": {l: bench.uniform(l) for l in LIMITS}, "int8": bench.int8, "notes": bench.notes,
            "problems": bench.problems, "warnings": warned.seen}, indent=1, default=str))
    return {"markdown": markdown, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds for the whole run (default 1800)")
    parser.add_argument("--model", type=Path, default=MODEL, help=f"the MiniLM ONNX (default {MODEL.relative_to(ROOT)})")
    parser.add_argument("--out-md", type=Path, help="also write the markdown here (it is always printed)")
    parser.add_argument("--out-json", type=Path, default=Path(tempfile.gettempdir()) / "denseflex-transformers.json",
                        help="every number, as JSON (default: %(default)s)")
    args = parser.parse_args()
    t = time.monotonic()
    out = run(args.budget, args.model, args.out_json)
    print(out["markdown"])
    if args.out_md:
        args.out_md.write_text(out["markdown"])
    print(f"[transformers] {time.monotonic() - t:.0f} s; JSON in {args.out_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
