"""Zoo: the full optimize on real models that PyPI wheels ship, and on a synthetic pitch tracker.

The models are those of tests/zoo_models.py (magika's file-type classifier, PP-OCR's text
detector, direction classifier and recognizer, silero's VAD; installed with `make test` from
tests/zoo-requirements.txt) and a small CREPE-like pitch tracker with random weights (input
[1, 1, 1024, 1]; six Conv + Relu + MaxPool, Flatten, Gemm 256 x 360). Each gets realistic data
built here (real files for magika, rendered text for OCR, speech-like audio for the VAD and the
pitch tracker): SAMPLES samples, the first 128 (the default --calib-samples) calibrate and the rest
judge. Then, as a user runs it,

    denseflex-onnx optimize MODEL --data D.npz --latency -10% -o out.onnx [--input-shape ...]

runs in its own process with a fresh profile cache, one onnxruntime thread and one BLAS thread.
Measured: the process's wall time and its peak memory (its own VmHWM from /proc/self/status at
exit; ru_maxrss is not used, since Linux carries a parent's over fork/exec), and from
out.report.json: the status, the latency ratio (chosen / original, A/B interleaved), the fidelity
(the metric: 100 x mean cosine to the original's outputs) and the plan. `inspect --json` gives the
layers found and those skipped; "factorized" is the plan's layers. A run that fails says how.

    python bench/zoo.py [--budget 1800] [--only pitch magika ...] [--no-write] [--csv FILE]

writes the "## Zoo" section of bench/RESULTS.md (replacing the one there, or appended) and its
rows of bench/results.csv; `run(budget_s)` gives the same for bench/run.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import zoo_models  # noqa: E402

SAMPLES = 192                       # 128 calibrate (the default), 64 judge
CONSTRAINT = ["--latency", "-10%"]
MAX_RUN_S = 900.0                   # one optimize at most
RESERVE_S = 5.0
ORDER = ["pitch", "ocr_cls", "vad", "ocr_det", "magika", "ocr_rec"]
PITCH = {"label": "small pitch tracker (synthetic, random weights)", "kind": "CREPE-like 1-D CNN + Gemm"}

# The child: the CLI as a user runs it; at exit, however it exits, its own peak RSS (VmHWM) to a file.
CHILD = r'''
import json, runpy, sys
out, sys.argv = sys.argv[1], ["denseflex-onnx", *sys.argv[2:]]
def vmhwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
try:
    runpy.run_module("denseflex_onnx.cli", run_name="__main__", alter_sys=True)
finally:
    with open(out, "w") as f:
        json.dump({"vmhwm_bytes": vmhwm()}, f)
'''


def env() -> dict:
    e = dict(os.environ, COLUMNS="400")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        e[var] = "1"
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return e


def last_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    return lines[-1][:300] if lines else ""


def polled_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Zoo:
    def __init__(self, budget_s: float, workdir: Path, only: list[str] | None = None):
        self.t0 = time.monotonic()
        self.budget = budget_s
        self.tmp = workdir
        self.only = only
        self.records: list[dict] = []
        self.notes: list[str] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def models(self):
        for key in ORDER:
            if self.only and key not in self.only:
                continue
            if key == "pitch":
                yield key, PITCH["label"], PITCH["kind"], None, {}, zoo_models.pitch_data
            else:
                m = zoo_models.MODELS[key]
                yield key, m.label, m.kind, m, m.shapes, m.make_data

    def prepare(self, key, model, make_data) -> tuple[Path, Path]:
        folder = self.tmp / key
        folder.mkdir()
        if model is None:
            import onnx
            path = folder / "pitch_tracker.onnx"
            onnx.save(zoo_models.pitch_tracker(seed=0), str(path))
        else:
            path = model.path()
        import numpy as np
        data = folder / "data.npz"
        np.savez(data, **make_data(SAMPLES, 0))
        return path, data

    def cli(self, args: list[str], timeout: float, hwm_file: Path | None = None):
        """(returncode or None on time-out, stdout, stderr, wall s, peak bytes or None)."""
        cmd = [sys.executable, "-c", CHILD, str(hwm_file), *args] if hwm_file else \
            [sys.executable, "-m", "denseflex_onnx.cli", *args]
        t = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env(),
                                start_new_session=True)
        polled: list[int] = []
        try:
            out, err = _communicate(proc, timeout, polled)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)         # the child and any workers it started
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            rc = None
        wall = time.monotonic() - t
        peak = max(polled) if polled else None
        if hwm_file and hwm_file.is_file():          # the child's own figure, at its exit
            try:
                peak = json.loads(hwm_file.read_text())["vmhwm_bytes"]
            except (ValueError, KeyError):
                pass
        return rc, out, err, wall, peak

    def run_one(self, key, label, kind, model, shapes, make_data) -> None:
        rec = {"key": key, "label": label, "kind": kind}
        self.records.append(rec)
        try:
            path, data = self.prepare(key, model, make_data)
        except zoo_models.ZooMissing as exc:
            rec["status"] = f"not run: {exc}"
            return
        rec["weights_file_bytes"] = path.stat().st_size
        shape_args = model.shape_args() if model is not None else []
        # what inspect finds
        rc, out, err, _, _ = self.cli(["inspect", str(path), *shape_args, "--json"], timeout=120)
        if rc == 0:
            info = json.loads(out)
            rec["layers_found"] = len(info["layers"])
            rec["layers_skipped"] = len(info["skipped"])
            reasons: dict[str, int] = {}
            for s in info["skipped"]:
                reason = s["reason"].split(" (")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
            rec["skipped_reasons"] = reasons
        else:
            rec["inspect_error"] = f"exit {rc}: {last_line(err)}"
        # the full optimize
        left = self.left() - RESERVE_S
        if left < 30:
            rec["status"] = "not run: the time budget was spent"
            return
        folder = self.tmp / key
        out_model = folder / "out.onnx"
        args = ["optimize", str(path), "--data", str(data), *CONSTRAINT, "--cache-dir", str(folder / "cache"),
                *shape_args, "-o", str(out_model), "--json"]
        rec["command"] = "denseflex-onnx " + " ".join(Path(a).name if a.startswith("/") else a for a in args)
        rc, out, err, wall, peak = self.cli(args, timeout=min(left, MAX_RUN_S), hwm_file=folder / "hwm.json")
        rec.update(rc=rc, wall_s=wall, peak_memory_bytes=peak)
        if rc is None:
            rec["status"] = f"stopped after {wall:.0f} s (time limit)"
            return
        report_path = folder / "out.report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else None
        if rc not in (0, 2) or "Traceback" in err:
            rec["status"] = f"crash (exit {rc})"
            rec["error"] = last_line(err)
        elif report is None:
            rec["status"] = "refused"
            rec["error"] = last_line(err)
        else:
            rec["status"] = report["status"]
            if rc == 2:
                rec["error"] = last_line(err)
        if report is not None:
            base, res = report["baseline"], report.get("result")
            rec.update(baseline_latency_s=base["latency_s"], baseline_metric=base["metric"], baseline_bytes=base["bytes"],
                       baseline_flops=base["flops"], metric=report["metric"],
                       factorized=len((report.get("plan") or {}).get("layers", {})),
                       plan={n: _spec(e) for n, e in sorted((report.get("plan") or {}).get("layers", {}).items())},
                       verifications=len(report.get("verifications", [])),
                       timed=report["stages"].get("timed"), grid=report["stages"].get("grid"),
                       reported_peak_memory_bytes=report.get("peak_memory_bytes"), misses=report.get("misses") or [])
            if res:
                ab = res.get("latency_ab_s") or [None, None]
                rec.update(speedup=res["speedup"], latency_ratio=(1.0 / res["speedup"]) if res["speedup"] else None,
                           latency_s=res["latency_s"], metric_value=res["metric"], metric_drop=res["metric_drop"],
                           bytes=res["bytes"], flops=res["flops"], ab_original_s=ab[0], ab_chosen_s=ab[1])
        if rc == 0:
            rec["verified"] = verify(path, out_model, data, shapes)
        if rec.get("layers_found"):
            rec.update(baselines(path, data, shapes, info["layers"], folder))

    def main(self) -> None:
        for key, label, kind, model, shapes, make_data in self.models():
            print(f"[zoo] {key}: {self.left():.0f} s left", file=sys.stderr, flush=True)
            self.run_one(key, label, kind, model, shapes, make_data)
            r = self.records[-1]
            print(f"[zoo] {key}: {r.get('status')} in {r.get('wall_s', 0):.0f} s"
                  + (f": {r['error']}" if r.get("error") else ""), file=sys.stderr, flush=True)


def _communicate(proc: subprocess.Popen, timeout: float, polled: list[int]):
    """proc.communicate(timeout), sampling the child's VmHWM every half second into `polled` (the
    fallback for a child killed before it writes its own)."""
    import threading

    def sample():
        while proc.poll() is None:
            v = polled_hwm(proc.pid)
            if v is not None:
                polled.append(v)
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        return proc.communicate(timeout=timeout)
    finally:
        thread.join(timeout=1.0)


def _spec(entry: dict) -> str:
    c, suffix = entry.get("config", {}), "+int8" if entry.get("int8") else ""
    if "rank" in c:
        return f"{entry['method']}:{c['rank']}{suffix}"
    if "ranks" in c:
        return f"{entry['method']}:" + "x".join(str(r) for r in c["ranks"]) + suffix
    if "keep" in c:
        return f"{entry['method']}:{c['keep']}{suffix}"
    return entry.get("method", "?") + suffix


def baselines(path: Path, data: Path, shapes: dict, layers: list[dict], folder: Path) -> dict:
    """The simplest answers beside the search's, in the same run: half rank in every layer
    (svd:0.5 / conv_svd:0.5, fitted whitened on the same calibration samples) and
    onnxruntime's dynamic INT8 of the whole model; their latency against the original's
    (interleaved rounds) and fidelity on the same held-out samples."""
    import statistics

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from denseflex_onnx import api, data as data_mod, loading, metrics, profile
    from denseflex_onnx.runtime import create_session

    out: dict = {}
    loaded = loading.load(path, shapes)
    calib, evaluation = data_mod.split(data_mod.load_data(data, loaded), 128)
    reference = metrics.outputs(create_session(loaded.proto), evaluation, loaded, None)
    models = {"original": path}
    specs = [f"{l['name']}={'conv_svd' if l['op'] == 'Conv' else 'svd'}:0.5" for l in layers
             if min(l["weight_shape"][0], math.prod(l["weight_shape"][1:])
                    if l["op"] == "Conv" else l["weight_shape"][1]) >= 2]
    try:
        api.apply(path, folder / "uniform.onnx", layer_specs=specs, data=data, input_shapes=shapes, force=True)
        models["uniform"] = folder / "uniform.onnx"
    except Exception as exc:        # noqa: BLE001 -- reported, not raised
        out["uniform_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    try:
        quantize_dynamic(str(path), str(folder / "int8.onnx"), weight_type=QuantType.QInt8)
        models["int8"] = folder / "int8.onnx"
    except Exception as exc:        # noqa: BLE001
        out["int8_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    sessions = {k: create_session(str(p)) for k, p in models.items()}
    inputs = profile.profiling_inputs(loaded, calib)
    budget = profile.Budget()
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(3):
        for k in (list(sessions) if r % 2 == 0 else reversed(list(sessions))):
            times[k].append(profile.time_session(sessions[k], inputs, "CPUExecutionProvider", budget).median)
    base = statistics.median(times["original"])
    for k in models:
        if k == "original":
            continue
        out[f"{k}_latency_ratio"] = statistics.median(times[k]) / base
        result = metrics.outputs(sessions[k], evaluation, loaded, None)
        out[f"{k}_metric"] = metrics.score("cosine", result, reference, None)
    return out


def verify(original: Path, written: Path, data: Path, shapes: dict) -> str:
    """The written model loads in onnxruntime, keeps the input and output names and gives finite
    outputs of the original's shapes on one sample."""
    import numpy as np
    import onnxruntime as ort

    try:
        a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (original, written))
        if [i.name for i in a.get_inputs()] != [i.name for i in b.get_inputs()] or \
                [o.name for o in a.get_outputs()] != [o.name for o in b.get_outputs()]:
            return "names differ"
        arrays = dict(np.load(data))
        feed = {}
        for inp in a.get_inputs():
            x = arrays[inp.name]
            shape = tuple(shapes.get(inp.name, inp.shape))
            feed[inp.name] = x if x.shape == shape else x[:1]
        ya, yb = a.run(None, feed), b.run(None, feed)
        if any(p.shape != q.shape for p, q in zip(ya, yb)):
            return "output shapes differ"
        if not all(np.isfinite(q).all() for q in yb):
            return "non-finite outputs"
        return "yes"
    except Exception as exc:        # noqa: BLE001 -- reported, not raised
        return f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


# ------------------------------------------------------------------------------------ rendering

def _baseline(r: dict, key: str) -> str:
    if r.get(f"{key}_error"):
        return f"fails: {r[f'{key}_error']}"
    if r.get(f"{key}_latency_ratio") is None:
        return "-"
    return f"{r[f'{key}_latency_ratio']:.2f}, {r[f'{key}_metric']:.2f}"


def _s(v):
    return "-" if v is None else f"{v:.0f} s"


def _mb(v):
    return "-" if v is None else f"{v / 1e6:.2f} MB" if v < 1e7 else f"{v / 1e6:,.0f} MB"


def _us(v):
    return "-" if v is None else f"{v * 1e6:,.0f} us" if v < 1e-2 else f"{v * 1e3:,.1f} ms"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "denseflex_onnx",
                                "passes"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" (uncommitted changes)" if dirty else "")


def render(z: Zoo, elapsed: float, load: tuple) -> tuple[str, list[dict]]:
    md = ["## Zoo", ""]
    md.append(f"Commit {commit()}. `denseflex-onnx optimize MODEL --data D --latency -10%` (max accuracy drop 1, the default 128 "
              f"calibration samples and {SAMPLES - 128} judged, cosine to the original's outputs) on real models that "
              f"PyPI wheels ship (tests/zoo-requirements.txt) and a synthetic pitch tracker, each run in its own "
              f"process with a fresh profile cache, 1 onnxruntime thread, 1 BLAS thread; {os.cpu_count()} cores, load "
              f"average {load[0]:.2f} at the start, {load[1]:.2f} at the end. Peak memory = the process's VmHWM at "
              f"exit. Latency ratio = chosen / original, A/B interleaved in the run (below 0.90 meets the target). "
              f"Baselines in the same run: half rank in every layer (svd:0.5 / conv_svd:0.5 through `apply --data`, "
              f"whitened) and onnxruntime's quantize_dynamic (QInt8) of the whole model, timed in interleaved "
              f"rounds with the original, fidelity on the same held-out samples. "
              f"Ran {elapsed:.0f} s of a {z.budget:.0f} s budget.")
    md += ["", "| model | kind | layers found (skipped) | factorized | status | latency ratio | fidelity | "
               "uniform half rank: ratio, fidelity | INT8 alone: ratio, fidelity | weights | "
               "wall time | peak memory | output verified |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for r in z.records:
        found = "-" if "layers_found" not in r else f"{r['layers_found']} ({r['layers_skipped']})"
        ratio = "-" if r.get("latency_ratio") is None else f"{r['latency_ratio']:.2f}"
        if r.get("latency_ratio") is not None and r.get("ab_original_s") is not None:
            ratio += f" ({_us(r['ab_original_s'])} -> {_us(r['ab_chosen_s'])})"
        fid = "-" if r.get("metric_value") is None else f"{r['baseline_metric']:.2f} -> {r['metric_value']:.2f}"
        weights = "-" if r.get("baseline_bytes") is None else \
            f"{_mb(r['baseline_bytes'])} -> {_mb(r['bytes'])}" if r.get("bytes") is not None else _mb(r["baseline_bytes"])
        status = r.get("status", "-")
        if status == "infeasible":
            status = "**infeasible** (closest shown)"
        elif status.startswith("crash") or status == "refused":
            status = f"**{status}**"
        md.append(f"| {r['label']} | {r['kind']} | {found} | {r.get('factorized', '-')} | {status} | {ratio} | {fid} | "
                  f"{_baseline(r, 'uniform')} | {_baseline(r, 'int8')} | {weights} | {_s(r.get('wall_s'))} | {_mb(r.get('peak_memory_bytes'))} | {r.get('verified', '-')} |")
        rows.append({"bench": "zoo", "model": r["key"], "label": r["label"], "status": r.get("status"),
                     "exit_code": r.get("rc"), "layers_found": r.get("layers_found"),
                     "layers_skipped": r.get("layers_skipped"), "factorized": r.get("factorized"),
                     "latency_ratio": r.get("latency_ratio"), "speedup": r.get("speedup"),
                     "baseline_latency_s": r.get("baseline_latency_s"), "latency_s": r.get("latency_s"),
                     "baseline_metric": r.get("baseline_metric"), "metric_value": r.get("metric_value"),
                     "metric_drop": r.get("metric_drop"), "baseline_bytes": r.get("baseline_bytes"),
                     "bytes_after": r.get("bytes"), "baseline_flops": r.get("baseline_flops"),
                     "flops_after": r.get("flops"), "wall_s": r.get("wall_s"),
                     "peak_memory_bytes": r.get("peak_memory_bytes"),
                     "reported_peak_memory_bytes": r.get("reported_peak_memory_bytes"),
                     "verifications": r.get("verifications"), "timed": r.get("timed"), "grid": r.get("grid"),
                     "verified": r.get("verified"), "error": r.get("error") or r.get("inspect_error"),
                     "plan": json.dumps(r.get("plan", {})),
                     **{f"{k}_{m}": r.get(f"{k}_{m}") for k in ("uniform", "int8") for m in ("latency_ratio", "metric")}})
    md.append("")
    met = [r["label"] for r in z.records if r.get("status") == "ok"]
    tried = [r for r in z.records if r.get("rc") is not None]
    notes = [f"Met --latency -10% within 1 point: {len(met)} of {len(tried)} run ({', '.join(met) or 'none'})."]
    for r in z.records:
        if r.get("status") == "infeasible":
            notes.append(f"{r['label']}: missed: {'; '.join(r.get('misses') or []) or r.get('error')}")
        elif r.get("error"):
            notes.append(f"{r['label']}: exit {r.get('rc')}: `{r['error']}`")
        if r.get("inspect_error"):
            notes.append(f"{r['label']}: inspect failed: `{r['inspect_error']}`")
        if r.get("skipped_reasons"):
            notes.append(f"{r['label']}: skipped by inspect: "
                         + ", ".join(f"{n} x {why}" for why, n in sorted(r["skipped_reasons"].items(), key=lambda kv: -kv[1])))
        if r.get("plan"):
            plan = list(r["plan"].items())
            text = ", ".join(f"{n}={s}" for n, s in plan[:5]) + (f" and {len(plan) - 5} more" if len(plan) > 5 else "")
            notes.append(f"{r['label']}: plan {text}; {r.get('verifications')} verification(s), {r.get('timed')} "
                         f"candidates timed of a grid of {r.get('grid')}.")
        if r.get("reported_peak_memory_bytes") is not None:
            notes.append(f"{r['label']}: the report's own peak_memory_bytes: {_mb(r['reported_peak_memory_bytes'])}.")
        if str(r.get("status", "")).startswith("not run"):
            notes.append(f"{r['label']}: {r['status']}")
    commands = [f"`{r['command']}`" for r in z.records if r.get("command")]
    if commands:
        notes.append("Commands (paths shortened): " + "; ".join(commands[:2]) + ("; ..." if len(commands) > 2 else "."))
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(md).rstrip() + "\n", rows


def run(budget_s: float = 1800.0, only: list[str] | None = None) -> dict:
    """The Zoo section of RESULTS.md and its CSV rows, within `budget_s` seconds."""
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    with tempfile.TemporaryDirectory(prefix="denseflex-zoo-") as tmp:
        z = Zoo(budget_s, Path(tmp), only)
        z.main()
        elapsed = time.monotonic() - z.t0
        load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
        markdown, rows = render(z, elapsed, (load_start, load_end))
    return {"markdown": markdown, "rows": rows, "elapsed_s": elapsed}


# ------------------------------------------------------------------------------------ RESULTS.md and results.csv

def replace_section(text: str, section: str, heading: str = "## Zoo") -> str:
    """`text` with its `heading` section (up to the next "## " heading) replaced by `section`, or
    with `section` appended."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.strip() == heading), None)
    if start is None:
        return text.rstrip() + "\n\n" + section.rstrip() + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[:start] + section.rstrip().splitlines() + ([""] + lines[end:] if end < len(lines) else [])) \
        .rstrip() + "\n"


def write_results(out: dict, md_path: Path, csv_path: Path) -> None:
    from bench.run import write_csv

    section = out["markdown"].rstrip() + f"\n\n_zoo: {out['elapsed_s']:.0f} s (python bench/zoo.py)._\n"
    md_path.write_text(replace_section(md_path.read_text() if md_path.is_file() else "", section))
    rows = []
    if csv_path.is_file():
        with csv_path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("bench") != "zoo"]
    write_csv(rows + out["rows"], csv_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds for the whole run (default 1800)")
    parser.add_argument("--only", nargs="*", choices=ORDER, help="run only these models")
    parser.add_argument("--no-write", action="store_true", help="print the section; leave RESULTS.md and results.csv")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from bench.run import write_csv

    out = run(args.budget, args.only)
    print(out["markdown"])
    if args.csv:
        write_csv(out["rows"], args.csv)
    if not args.no_write:
        here = Path(__file__).resolve().parent
        write_results(out, here / "RESULTS.md", here / "results.csv")
        print(f"[zoo] wrote the Zoo section of {here / 'RESULTS.md'} and its rows of {here / 'results.csv'}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
