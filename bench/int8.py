"""INT8 axis: per-layer INT8 in the design space, against onnxruntime's dynamic INT8 of the whole
model measured in the same run, for the MNIST MLP, the MNIST CNN and MiniLM-L6.

Per model, in this order (MLP, CNN, MiniLM):

1. INT8 alone: quantize_dynamic (QInt8) of the whole model; its speed from an interleaved
   A/B against the original, its metric with the tool's metric code (metrics.outputs/score) on the
   held-out samples (all but the first 128, which calibrate): accuracy for MNIST, 100 x mean
   cosine to the original's output for MiniLM.
2. The constraint, from step 1: the MLP --latency INT8's latency / 1.5 --max-accuracy-drop 1; the
   CNN --latency -30% --max-accuracy-drop 1; MiniLM --latency INT8's latency --max-accuracy-drop
   max(INT8's drop, 0.5). Latency limits are ratios of the original's (`0.1347x`).
3. optimize twice with that constraint and one profile cache: --int8 dynamic (mixed plans, run
   first, cold) and --int8 off (float-only plans, on the first run's cache). An infeasible run's
   closest plan is the one kept.
4. One interleaved A/B over the original, INT8 alone and the two written models (the speed ratios
   of the tables and the targets), and each of the four re-scored on the held-out samples.

The markdown holds one Pareto table per model, the targets (issue 15) judged on them, and the plot
bench/int8_pareto.png (latency vs metric of every plan both runs verified). A step is skipped
when the time left is less than a step like it takes, and one still running at the end of the
budget is stopped; the markdown says which.

    python bench/int8.py [--budget 1200] [--csv FILE]
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    # the repository root first (as bench/transformers.py), one BLAS thread before numpy loads
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import denseflex_onnx
from denseflex_onnx import data as data_mod, loading, metrics, profile
from denseflex_onnx.plan import INT8_SUFFIX
from denseflex_onnx.runtime import create_session
from onnxruntime.quantization import QuantType, quantize_dynamic

from bench import e2e

HERE = Path(__file__).resolve().parent
PNG = HERE / "int8_pareto.png"
ORDER = ["mlp", "cnn", "minilm"]
MODES = [("mixed", "dynamic"), ("fp32", "off")]      # (run, int8=): the mixed run first, on a cold cache
# MiniLM's target has two ways to be met; the second, the most accurate plan at INT8's latency, is
# what --objective accuracy asks for (the default objective, latency, spends the accuracy budget)
EXTRA = {"minilm": [("accurate", "dynamic")]}
OPTIONS = {"accurate": {"objective": "accuracy"}}
PER_CHANNEL = "INT8 alone, per channel"     # a baseline beside the issue's: the tool's layers are per channel
RUN_LABEL = {"mixed": "mixed plan (--int8 dynamic)", "fp32": "fp32-only plan (--int8 off)",
             "accurate": "mixed plan, --objective accuracy"}
MLP_FACTOR = 1.5             # the MLP's plan: this much faster than INT8 alone ...
MLP_MAX_DROP = 1.0           # ... within this many points of the original
CNN_LATENCY = "-30%"
CNN_MAX_DROP = 1.0
CNN_NOISE = 0.05             # the CNN's mixed plan may be this much slower than the fp32 one (A/B noise)
MINILM_FACTOR = 1.25         # MiniLM: this much faster than INT8 at its cosine ...
MINILM_POINTS = 1.0          # ... or this many cosine points above it at its latency
MINILM_MIN_DROP = 0.5
# seconds a step takes before one like it has run (2 cores); the fp32 run reuses the mixed run's cache
GUESS_S = {"int8:mlp": 10.0, "int8:cnn": 12.0, "int8:minilm": 40.0,
           "optimize:mlp:mixed": 60.0, "optimize:cnn:mixed": 60.0, "optimize:minilm:mixed": 360.0,
           "optimize:mlp:fp32": 30.0, "optimize:cnn:fp32": 30.0, "optimize:minilm:fp32": 200.0,
           "optimize:minilm:accurate": 200.0, "ab:mlp": 6.0, "ab:cnn": 10.0, "ab:minilm": 40.0}
RESERVE_S = 5.0              # kept back for rendering and clean-up


class Bench:
    def __init__(self, budget_s: float, tmp: Path):
        self.t0, self.budget, self.tmp = time.monotonic(), budget_s, tmp
        self.cache = tmp / "cache"          # one profile cache for the run: fresh, shared by both runs of a model
        self.took: dict[str, float] = {}
        self.models: dict[str, dict] = {}   # key -> {"int8", "constraint", "runs", "final"}
        self.notes: list[str] = []
        self.problems: list[str] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def need(self, kind: str) -> float:
        return self.took.get(kind, GUESS_S[kind])

    def attempt(self, name: str, kind: str, fn, *args, keep: float = 0.0):
        """fn(*args) if a step like it fits in the time left less `keep` (what later steps need);
        None when skipped, stopped or failed."""
        left = self.left() - RESERVE_S - keep
        need = self.need(kind)
        if left < need:
            self.notes.append(f"{name}: skipped, a step like it takes about {need:.0f} s and {max(left, 0):.0f} s "
                              f"were left")
            return None
        t = time.monotonic()
        out = e2e.guarded(name, fn, args, left, self.notes, self.problems, "int8")
        if out is None:
            return None
        self.took[kind] = time.monotonic() - t
        return out

    # -- steps

    def run_int8(self, key: str) -> dict:
        m = e2e.MODELS[key]
        loaded = loading.load(m.path, m.input_shapes)
        calib, held = data_mod.split(data_mod.load_data(m.data, loaded), e2e.CALIB)
        kind = metrics.default_metric(held)             # accuracy with labels, else cosine: the tool's default
        work = self.tmp / key
        work.mkdir(exist_ok=True)
        int8 = e2e.quantize(m.path, work / "int8.onnx")
        # what a user who sets per_channel=True gets (the tool quantizes its layers per channel)
        quantize_dynamic(str(m.path), str(work / "int8pc.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        inputs = profile.profiling_inputs(loaded, calib)
        base, quant = e2e.interleaved([m.path, int8], inputs)
        reference = metrics.outputs(create_session(str(m.path)), held, loaded, None)
        rec = {"loaded": loaded, "held": held, "inputs": inputs, "reference": reference, "kind": kind,
               "path": int8, "path_per_channel": work / "int8pc.onnx", "latency_ab_s": [base, quant], "speedup": base / quant,
               "original_metric": metrics.score(kind, reference, reference, held.labels)}
        self.models[key] = {"int8": rec, "runs": {}, "final": None}
        rec["metric"] = self.score(key, int8)
        rec["drop"] = rec["original_metric"] - rec["metric"]
        print(f"[int8] {m.label} INT8 alone: {rec['speedup']:.2f}x, {kind} {rec['metric']:.2f} "
              f"(original {rec['original_metric']:.2f})", file=sys.stderr, flush=True)
        return rec

    def score(self, key: str, path: Path) -> float:
        """The tool's metric of a written model on the held-out samples."""
        r = self.models[key]["int8"]
        result = metrics.outputs(create_session(str(path)), r["held"], r["loaded"], None)
        return metrics.score(r["kind"], result, r["reference"], r["held"].labels)

    def constraint(self, key: str) -> dict:
        q = self.models[key]["int8"]
        if key == "mlp":
            return {"latency": f"{1 / (MLP_FACTOR * q['speedup']):.4f}x", "max_accuracy_drop": MLP_MAX_DROP}
        if key == "cnn":
            return {"latency": CNN_LATENCY, "max_accuracy_drop": CNN_MAX_DROP}
        # rounded up: never tighter than INT8's own drop
        return {"latency": f"{1 / q['speedup']:.4f}x",
                "max_accuracy_drop": math.ceil(max(q["drop"], MINILM_MIN_DROP) * 1e4) / 1e4}

    def optimize(self, key: str, run: str, int8: str) -> dict:
        m = e2e.MODELS[key]
        out = Path(tempfile.mkdtemp(prefix=f"{key}-{run}-", dir=self.tmp)) / "out.onnx"
        constraint = self.models[key]["constraint"]
        t = time.monotonic()
        result = denseflex_onnx.optimize(m.path, out, data=m.data, input_shapes=m.input_shapes,
                                         cache_dir=self.cache, timing=e2e.TIMING, int8=int8, **constraint,
                                         **OPTIONS.get(run, {}))
        wall = time.monotonic() - t
        # the written model (out.onnx, or out.closest.onnx when infeasible; its .data if any) is kept
        # for the final A/B; the plan and reports go
        model = None
        for f in map(Path, result.files):
            if f.name.endswith(".onnx"):
                model = f
            elif not f.name.endswith(".onnx.data"):
                f.unlink(missing_ok=True)
        rep = result.report
        rec = {"status": result.status, "misses": list(result.misses), "wall_s": wall, "file": model,
               "baseline": rep["baseline"], "result": rep.get("result"), "int8_baseline": rep.get("int8_baseline"),
               "verifications": rep["verifications"], "plan": (rep.get("plan") or {}).get("layers", {}),
               "metric_name": rep["metric"]}
        self.models[key]["runs"][run] = rec
        r = rec["result"] or {}
        print(f"[int8] {m.label} {run}: {result.status}, tool A/B {r.get('speedup', math.nan):.2f}x, metric "
              f"{r.get('metric', math.nan):.2f}, plan {plan_summary(specs_of(rec['plan']))}, {wall:.0f} s",
              file=sys.stderr, flush=True)
        return rec

    def final_ab(self, key: str) -> dict:
        got = self.models[key]
        m = e2e.MODELS[key]
        variants = [("original", m.path), ("INT8 alone", got["int8"]["path"]),
                    (PER_CHANNEL, got["int8"]["path_per_channel"])]
        variants += [(run, got["runs"][run]["file"]) for run, _ in runs_of(key)
                     if run in got["runs"] and got["runs"][run]["file"] is not None]
        medians = e2e.interleaved([p for _, p in variants], got["int8"]["inputs"], e2e.AB_ROUNDS)
        final = {}
        for (name, path), median in zip(variants, medians):
            metric = got["int8"]["original_metric"] if name == "original" else self.score(key, path)
            final[name] = {"latency_s": median, "metric": metric, "file_bytes": e2e.file_bytes(path)}
        got["final"] = final
        return final

    # -- the run

    def main(self) -> None:
        for key in ORDER:
            m = e2e.MODELS[key]
            if key == "minilm" and not m.path.exists():
                if self.left() < self.need("int8:minilm") + self.need("optimize:minilm:mixed") + RESERVE_S:
                    self.notes.append(f"{m.label}: models/minilm.onnx is absent and there was no time to export it")
                    continue
                finder = e2e.Bench(self.left(), self.tmp)     # as bench/e2e.py: export it if it can
                finder.ensure_minilm()
                if "minilm" in finder.unavailable:
                    self.notes.append(f"{m.label}: {finder.unavailable['minilm']}")
                    continue
            ab = self.need(f"ab:{key}")
            # a model is started only if INT8 alone, the mixed run and the final A/B fit
            need = self.need(f"int8:{key}") + self.need(f"optimize:{key}:mixed") + ab
            left = self.left() - RESERVE_S
            if left < need:
                self.notes.append(f"{m.label}: skipped, INT8 alone, the mixed optimize and the A/B take about "
                                  f"{need:.0f} s and {max(left, 0):.0f} s were left")
                continue
            if self.attempt(f"{m.label} INT8 alone", f"int8:{key}", self.run_int8, key,
                            keep=self.need(f"optimize:{key}:mixed") + ab) is None:
                self.models.pop(key, None)      # stopped or failed half way: nothing of it is shown
                continue
            self.models[key]["constraint"] = self.constraint(key)
            for run, int8 in runs_of(key):
                kind = f"optimize:{key}:{run}"
                if run != "mixed" and f"optimize:{key}:mixed" in self.took:     # warm: at most the cold run's time
                    self.took.setdefault(kind, min(GUESS_S[kind], self.took[f"optimize:{key}:mixed"]))
                self.attempt(f"{m.label} {RUN_LABEL[run]}", kind, self.optimize, key, run, int8, keep=ab)
            if self.models[key]["runs"]:
                self.attempt(f"{m.label} final A/B", f"ab:{key}", self.final_ab, key)
            else:
                self.notes.append(f"{m.label} final A/B: skipped, neither optimize run finished")


def runs_of(key: str) -> list[tuple[str, str]]:
    return MODES + EXTRA.get(key, [])


# ------------------------------------------------------------------------------------ rendering

def specs_of(plan_layers: dict) -> dict[str, str]:
    """plan.json's layers as specs (svd:64+int8, dense+int8, prune:960...)."""
    out = {}
    for name, entry in plan_layers.items():
        try:
            spec = e2e._spec(entry)
        except Exception:           # a method the bench does not know how to spell: its name
            spec = entry["method"]
        out[name] = spec + (INT8_SUFFIX if entry.get("int8") and not spec.endswith(INT8_SUFFIX) else "")
    return out


def kind_of(spec: str) -> str:
    """svd:64+int8 -> svd+int8; dense+int8 -> dense+int8; prune:960 -> prune."""
    int8 = spec.endswith(INT8_SUFFIX)
    base = spec[:-len(INT8_SUFFIX)] if int8 else spec
    return base.split(":")[0] + (INT8_SUFFIX if int8 else "")


def plan_summary(specs: dict[str, str]) -> str:
    if not specs:
        return "all dense"
    counts: dict[str, int] = {}
    for s in specs.values():
        counts[kind_of(s)] = counts.get(kind_of(s), 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))


def has_int8(specs) -> bool:
    return any(s.endswith(INT8_SUFFIX) for s in specs)


def _ms(s):
    return e2e._us(s)


def run_line(key: str, run: str, rec: dict) -> str:
    r = rec["result"] or {}
    status = rec["status"] + (f" ({'; '.join(rec['misses'])})" if rec["misses"] else "")
    cache = "cold cache" if run == "mixed" else "the mixed run's cache"
    text = (f"{RUN_LABEL[run]}: {status}, {len(rec['verifications'])} plans verified, {rec['wall_s']:.0f} s "
            f"({cache})")
    if r:
        text += f"; the tool's own A/B {e2e._x(r['speedup'])}, metric {e2e._f(r['metric'])}"
    q = rec["int8_baseline"]
    if q:
        text += f"; its INT8 baseline {e2e._x(q['speedup'])}, metric {e2e._f(q['metric'])}"
    return text


def judge(key: str, got: dict) -> tuple[str, bool | None, float | None, float | None]:
    """(markdown line, met (None: not judged), value, limit) of the model's target."""
    label = e2e.MODELS[key].label
    final = got.get("final") if got else None
    goal = {"mlp": f"the MNIST MLP's mixed plan >= {MLP_FACTOR:g}x faster than INT8 alone within "
                   f"{MLP_MAX_DROP:g} point of the original's accuracy",
            "cnn": f"the MNIST CNN's mixed plan never slower than its fp32-only plan (no ConvInteger trap; "
                   f"{100 * CNN_NOISE:.0f}% allowed for A/B noise)",
            "minilm": f"MiniLM-L6's mixed plan >= {MINILM_FACTOR:g}x faster than INT8 alone at a cosine no lower "
                      f"than INT8's, or >= {MINILM_POINTS:g} cosine point above INT8's at no higher latency"}[key]
    needed = ["INT8 alone", "mixed"] + (["fp32"] if key == "cnn" else [])
    if not final or any(n not in final for n in needed):
        why = "the model did not run" if not got else "the final A/B did not measure " + ", ".join(
            n for n in needed if not final or n not in final)
        return f"- {goal}: not judged ({label}: {why}; see below).", None, None, None
    q, mx = final["INT8 alone"], final["mixed"]
    ratio = q["latency_s"] / mx["latency_s"]
    status = got["runs"]["mixed"]["status"]
    plan = f"mixed plan {status}" + (", its closest plan" if status != "ok" else "")
    if key == "mlp":
        drop = final["original"]["metric"] - mx["metric"]
        met = ratio >= MLP_FACTOR and drop <= MLP_MAX_DROP + 1e-9
        text = (f"{ratio:.2f}x the speed of INT8 alone ({_ms(mx['latency_s'])} vs {_ms(q['latency_s'])}), accuracy "
                f"{mx['metric']:.2f} vs the original's {final['original']['metric']:.2f} (drop {drop:.2f}); {plan}")
        value, limit = ratio, MLP_FACTOR
    elif key == "cnn":
        fp = final["fp32"]
        rel = mx["latency_s"] / fp["latency_s"]
        met = rel <= 1 + CNN_NOISE
        text = (f"mixed {_ms(mx['latency_s'])} vs fp32-only {_ms(fp['latency_s'])} ({rel:.2f}x its latency; "
                f"plans: mixed {plan_summary(specs_of(got['runs']['mixed']['plan']))}, fp32-only "
                f"{plan_summary(specs_of(got['runs']['fp32']['plan']))}); {plan}")
        value, limit = rel, 1 + CNN_NOISE
    else:       # the mixed plan faster at INT8's cosine, or either mixed plan more accurate at its latency
        faster = ratio >= MINILM_FACTOR and mx["metric"] >= q["metric"] - 1e-9
        texts, better = [], False
        for run in ("mixed", "accurate"):
            if run in final:
                p = final[run]
                better |= p["metric"] >= q["metric"] + MINILM_POINTS - 1e-9 and p["latency_s"] <= q["latency_s"]
                texts.append(f"{RUN_LABEL[run]}: {q['latency_s'] / p['latency_s']:.2f}x the speed of INT8 alone "
                             f"({_ms(p['latency_s'])} vs {_ms(q['latency_s'])}), cosine {p['metric']:.2f} vs INT8's "
                             f"{q['metric']:.2f} ({p['metric'] - q['metric']:+.2f})")
        met = faster or better
        how = "faster at INT8's cosine" if faster else "higher cosine at INT8's latency" if better else "neither"
        text = "; ".join(texts) + f": {how}; {plan}"
        value, limit = ratio, MINILM_FACTOR
    return f"- {goal}: **{'met' if met else 'missed'}**: {text}.", met, value, limit


def uniform_rows(key: str, got: dict, rows: list[dict]) -> list[str]:
    """The simplest baselines the mixed run verified in the same run (one rank fraction, one keep
    fraction, dense+int8 in every layer), on the tool's own A/B: its ratios against the original
    and against its own measurement of INT8 alone."""
    rec = got["runs"].get("mixed")
    q = rec and rec["int8_baseline"]
    shown = [v for v in (rec["verifications"] if rec else []) if v["uniform"]]
    if not shown or not q:
        return []
    md = ["", "The uniform plans the mixed run verified beside its search (the tool's own A/B; INT8 alone "
          f"there: {e2e._x(q['speedup'])}, {q['metric']:.2f}):", "",
          "| uniform plan | speedup vs original | vs INT8 alone | metric | weight bytes | missed |", "|---|---|---|---|---|---|"]
    for v in shown:
        md.append(f"| {v['uniform']} | {e2e._x(v['speedup'])} | {e2e._x(v['speedup'] / q['speedup'])} | "
                  f"{v['metric']:.2f} | {e2e._mb(v['bytes'])} | {', '.join(v['misses']) or '-'} |")
        rows.append({"bench": "int8", "model": key, "variant": f"uniform: {v['uniform']}",
                     "speedup_vs_original": v["speedup"], "speedup_vs_int8": v["speedup"] / q["speedup"],
                     "metric": v["metric"], "source": "the mixed run's verification"})
    return md


def constraint_text(key: str, got: dict) -> str:
    c, q = got["constraint"], got["int8"]
    why = {"mlp": f"INT8's latency / {MLP_FACTOR:g}", "cnn": "fixed",
           "minilm": f"INT8's latency; drop max(INT8's {q['drop']:.2f}, {MINILM_MIN_DROP:g})"}[key]
    return f"--latency {c['latency']} --max-accuracy-drop {c['max_accuracy_drop']:g} ({why})"


def render(b: Bench, elapsed: float) -> tuple[str, list[dict]]:
    rows: list[dict] = []
    md = ["## INT8 axis", "",
          f"Per-layer INT8 as an axis of the design space, against onnxruntime's quantize_dynamic (QInt8) of the "
          f"whole model measured in the same run. Per model: INT8 alone is quantized and timed against the original "
          f"(interleaved {e2e.AB_ROUNDS}-round A/B); from it the constraint: the MNIST MLP --latency INT8's latency / "
          f"{MLP_FACTOR:g} --max-accuracy-drop {MLP_MAX_DROP:g}, the MNIST CNN --latency {CNN_LATENCY} "
          f"--max-accuracy-drop {CNN_MAX_DROP:g}, MiniLM-L6 --latency INT8's latency --max-accuracy-drop "
          f"max(INT8's drop, {MINILM_MIN_DROP:g}) (latency limits as ratios of the original's). optimize runs twice "
          f"with it and one profile cache, with --data: --int8 dynamic (mixed plans; first, cold) and --int8 off "
          f"(fp32-only plans), and for MiniLM a third time, --int8 dynamic --objective accuracy (the most accurate "
          f"plan at INT8's latency: the second way its target can be met); an infeasible run's closest plan stands "
          f"in. Then one interleaved "
          f"{e2e.AB_ROUNDS}-round A/B over the original, INT8 alone (quantize_dynamic's defaults: one weight scale "
          f"per tensor, what the targets compare against), INT8 alone per channel (per_channel=True, as the tool "
          f"quantizes its INT8 layers) and the two written models gives every latency "
          f"and speed ratio below, and each is re-scored with the tool's metric code on the held-out samples (all "
          f"but the first {e2e.CALIB}): top-1 accuracy for MNIST, 100 x mean cosine to the original's output for "
          f"MiniLM. Weight bytes: the .onnx file (and its .data). Plan: layers per kind of spec (`+int8`: INT8 "
          f"weights). CPU, 1 onnxruntime thread, batch 1 (MiniLM 1 x 64 tokens). Ran {elapsed:.0f} s of a "
          f"{b.budget:.0f} s budget.", ""]
    for key in ORDER:
        got = b.models.get(key)
        if not got:
            continue
        m = e2e.MODELS[key]
        q = got["int8"]
        md += [f"### {m.label}", ""]
        if "constraint" in got:
            md.append(f"Constraint: `{constraint_text(key, got)}`. Metric: {e2e.metric_name(key)}; "
                      f"{q['held'].samples} held-out samples.")
            md.append("")
        ran = [run for run, _ in runs_of(key) if run in got["runs"]]
        md += [f"- {run_line(key, run, got['runs'][run])}." for run in ran] + ([""] if ran else [])
        final = got["final"]
        if not final:
            md += [f"No final A/B: INT8 alone from its own A/B: {e2e._x(q['speedup'])} the original's speed, "
                   f"{e2e.metric_name(key)}: {q['metric']:.2f} (original {q['original_metric']:.2f}).", ""]
            rows.append({"bench": "int8", "model": key, "variant": "INT8 alone", "speedup_vs_original": q["speedup"],
                         "metric_kind": q["kind"], "metric": q["metric"], "metric_drop": q["drop"],
                         "source": "int8 A/B"})
            continue
        md += ["| variant | latency | speedup vs original | vs INT8 alone | metric | weight bytes (file size) "
               "| plan |", "|---|---|---|---|---|---|---|"]
        base, int8_lat = final["original"]["latency_s"], final["INT8 alone"]["latency_s"]
        for name in ["original", "INT8 alone", PER_CHANNEL] + [run for run, _ in runs_of(key)]:
            f = final.get(name)
            rec = got["runs"].get(name)
            if name in RUN_LABEL:
                label = RUN_LABEL[name] + ("" if rec is None or rec["status"] == "ok" else ", infeasible: closest")
            else:
                label = name
            if f is None:
                md.append(f"| {label} | not run | | | | | |")
                continue
            specs = specs_of(rec["plan"]) if rec else {}
            plan = plan_summary(specs) if rec else {"original": "all dense", "INT8 alone": "quantize_dynamic, whole model",
                                                    PER_CHANNEL: "quantize_dynamic per_channel=True, whole model"}[name]
            md.append(f"| {label} | {_ms(f['latency_s'])} | {e2e._x(base / f['latency_s'])} | "
                      f"{e2e._x(int8_lat / f['latency_s'])} | {f['metric']:.2f} | {e2e._mb(f['file_bytes'])} | {plan} |")
            rows.append({"bench": "int8", "model": key, "variant": name, "status": rec["status"] if rec else "ok",
                         "constraint": json.dumps(got["constraint"]), "latency_s": f["latency_s"],
                         "speedup_vs_original": base / f["latency_s"], "speedup_vs_int8": int8_lat / f["latency_s"],
                         "metric_kind": q["kind"], "metric": f["metric"],
                         "metric_drop": final["original"]["metric"] - f["metric"], "file_bytes": f["file_bytes"],
                         "plan_summary": plan, "plan": json.dumps(specs) if rec else "",
                         "speedup_tool": (rec["result"] or {}).get("speedup") if rec else None,
                         "verifications": len(rec["verifications"]) if rec else None,
                         "wall_s": rec["wall_s"] if rec else None, "source": "final A/B"})
        md += uniform_rows(key, got, rows)
        md.append("")
    md += ["### Targets", ""]
    for key in ORDER:
        line, met, value, limit = judge(key, b.models.get(key))
        md.append(line)
        rows.append({"bench": "int8", "section": "target", "model": key, "met": met, "value": value, "limit": limit})
    md.append("")
    if b.models and plot(b, PNG):
        md += ["Every plan each run verified (its own A/B against the original, on the original's latency as the "
               "tool measured it); circled: the two written plans at their final-A/B speed and re-scored metric.",
               "", f"![INT8 Pareto]({PNG.name})", ""]
    if b.notes or b.problems:
        md += ["Not measured in this run:", ""] + [f"- {n}" for n in b.notes] + [f"- error: {p}" for p in b.problems]
        md.append("")
    return "\n".join(md).rstrip() + "\n", rows


def plot(b: Bench, path: Path) -> bool:
    """One panel per model that ran: latency (ms) vs metric. False (nothing written) if none did."""
    shown = [k for k in ORDER if k in b.models and b.models[k]["runs"]]
    if not shown:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(shown), figsize=(5.6 * len(shown), 4.6), squeeze=False)
    for ax, key in zip(axes[0], shown):
        got = b.models[key]
        q, final = got["int8"], got["final"] or {}
        any_run = next(iter(got["runs"].values()))
        base = any_run["baseline"]["latency_s"]       # the tool's timing of the original: every x is on it
        ms = base * 1e3
        ax.scatter([ms], [q["original_metric"]], color="black", s=50, zorder=3, label="original")
        int8_speed = (final["original"]["latency_s"] / final["INT8 alone"]["latency_s"]
                      if "INT8 alone" in final else q["speedup"])
        ax.scatter([ms / int8_speed], [q["metric"]], color="tab:orange", marker="x", s=70, zorder=3,
                   label="INT8 alone")
        if PER_CHANNEL in final:
            ax.scatter([ms * final[PER_CHANNEL]["latency_s"] / final["original"]["latency_s"]],
                       [final[PER_CHANNEL]["metric"]], color="tab:brown", marker="+", s=70, zorder=3, label=PER_CHANNEL)
        fp32 = got["runs"].get("fp32")
        if fp32:
            vs = fp32["verifications"]
            ax.scatter([v["latency_s"] * 1e3 for v in vs], [v["metric"] for v in vs], color="tab:blue", s=22,
                       alpha=0.7, label="fp32-only run's plans")
        mixed = [v for run in ("mixed", "accurate") if run in got["runs"] for v in got["runs"][run]["verifications"]]
        if mixed:
            for with_int8, colour, label in ((True, "tab:green", "mixed runs: plans with +int8"),
                                             (False, "lightskyblue", "mixed runs: float plans")):
                vs = [v for v in mixed if has_int8(v["plan"].values()) == with_int8]
                if vs:
                    ax.scatter([v["latency_s"] * 1e3 for v in vs], [v["metric"] for v in vs], color=colour, s=22,
                               alpha=0.8, label=label)
        for run, colour in (("fp32", "tab:blue"), ("mixed", "tab:red"), ("accurate", "tab:purple")):
            if run in final:
                f = final[run]
                ax.scatter([ms * f["latency_s"] / final["original"]["latency_s"]], [f["metric"]], s=180,
                           facecolors="none", edgecolors=colour, linewidths=2, zorder=4,
                           label=f"written {run} plan")
        ax.set_xscale("log")        # the CNN's INT8 alone is 20x its plans' latency
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel(e2e.metric_name(key))
        ax.set_title(e2e.MODELS[key].label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def run(budget_s: float = 1200.0) -> dict:
    """The INT8 axis section of RESULTS.md and its CSV rows, within `budget_s` seconds; writes
    bench/int8_pareto.png when a model ran."""
    with tempfile.TemporaryDirectory(prefix="denseflex-int8-") as tmp, e2e.blas_threads(1), \
            e2e.captured_warnings() as warned:
        bench = Bench(budget_s, Path(tmp))
        bench.main()
        markdown, rows = render(bench, time.monotonic() - bench.t0)
    shown = {t: c for t, c in warned.seen.items() if "is symbolic; using 1" not in t}
    if shown:
        markdown += ("\nWarnings the package logged: "
                     + "; ".join(f"\"{t}\" (x{c})" for t, c in sorted(shown.items())) + "\n")
    return {"markdown": markdown, "rows": rows}


if __name__ == "__main__":
    from bench.run import standalone
    standalone(run, __doc__, 1200.0)
