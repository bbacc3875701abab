"""The `denseflex-onnx` command line (CLI.md is the contract)."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from . import __version__, api, report
from .constraints import format_bytes, format_flops, format_seconds
from .errors import UserError
from .model import first_line, parse_input_shapes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Low-rank factorization (SVD, Tensor-Train) of ONNX models, measured with onnxruntime.")
err = Console(stderr=True)
out = Console()
log = logging.getLogger("denseflex_onnx")

ShapeOpt = typer.Option(None, "--input-shape", help="NAME:1x128 or NAME:[1,128]; repeatable, or comma-separated: a:1x64,b:1x64")
QuietOpt = typer.Option(False, "--quiet", "-q", help="print only errors")
ForceOpt = typer.Option(False, "--force", help="overwrite existing output files")
DebugOpt = typer.Option(False, "--debug", help="show the traceback behind an error")
CacheSizeOpt = typer.Option(None, "--cache-size", help="cap on the cache folder, e.g. 500MB; least recently "
                            "used entries go first (default 2GB)")
JobsOpt = typer.Option(None, "--jobs", help="layers decomposed and probes measured at once (default: every "
                       "core; timing always runs alone)")
CacheDirOpt = typer.Option(None, "--cache-dir", help="the cache folder (default ~/.cache/denseflex-onnx/profiles)")
BudgetOpt = typer.Option(None, "--memory-budget", help="memory the calibration statistics may hold, e.g. 8GB "
                         "(default: half of the memory available)")
CalibrationOpt = typer.Option(None, "--calibration", help="independent|sequential: fit each layer on the original "
                              "model's inputs (default), or stage by stage on the rewritten model's")
Int8Opt = typer.Option(None, "--int8", help="off|dynamic|static: every candidate may also take INT8 weights "
                       "(onnxruntime's quantization, timed like the rest; default dynamic; static: QDQ "
                       "calibrated on --data)")
NoInt8Opt = typer.Option(False, "--no-int8", help="the same as --int8 off: a float-only design space")


def _int8_option(int8: str | None, no_int8: bool) -> str | None:
    if no_int8 and int8 not in (None, "off"):
        raise UserError(f"--no-int8 and --int8 {int8} contradict each other: give one")
    return "off" if no_int8 else int8


class RichProgress(api.Progress):
    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description, total):
        if not self.enabled or not err.is_terminal:
            yield lambda n=1: None
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


def _setup(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_time=False, show_path=False)], force=True)


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors(debug: bool = False):
    """Every error as one line: exit 2 for what the user or the model can change, 1 for our bug."""
    try:
        yield
    except UserError as exc:
        _trace(debug)
        _fail(str(exc))
    except KeyboardInterrupt:
        err.print("interrupted: nothing was written")
        raise typer.Exit(130)
    except MemoryError:
        _trace(debug)
        _fail(f"out of memory{_where()}: lower --memory-budget or --calib-samples"
              f"{_exclude_hint()}")
    except typer.Exit:
        raise
    except Exception as exc:
        _trace(debug)
        layer = getattr(exc, "denseflex_layer", None)
        if type(exc).__module__.startswith("onnxruntime"):
            _fail(f"onnxruntime cannot run the model{_where(layer)}: {first_line(exc)} (check --input-shape"
                  f"{_exclude_hint(layer)}; --debug shows where it failed)")
        _fail(f"internal error{_where(layer)}: {type(exc).__name__}: {first_line(exc)} -- a bug in "
              f"denseflex-onnx{_exclude_hint(layer)}; rerun with --debug for the traceback and report it", code=1)


def _where(layer: str | None = None) -> str:
    return f" on layer {layer}" if layer else ""


def _exclude_hint(layer: str | None = None) -> str:
    return f"; --exclude {layer} keeps that layer dense" if layer else ""


def _trace(debug: bool) -> None:
    if debug:
        err.print_exception()


def _version(value: bool):
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                              help="print the version")):
    """denseflex-onnx: make ONNX models smaller and faster by low-rank factorization, without retraining."""


@app.command()
def inspect(model: Path = typer.Argument(..., help="the .onnx file"),
            input_shape: Optional[List[str]] = ShapeOpt,
            json_out: bool = typer.Option(False, "--json", help="one JSON object on stdout"),
            quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """List the layers a pass could factorize, with their cost, and what is skipped and why."""
    _setup(quiet)
    with _user_errors(debug):
        info = api.inspect(model, parse_input_shapes(input_shape))
    if json_out:
        print(json.dumps(info))
        return
    if quiet:
        return
    table = Table(title=f"{model} (opset {info['opset']}, IR {info['ir_version']}, inputs {info['inputs']})")
    for col in ("layer", "op", "weight", "activation", "params", "MFLOPs", "% params", "% FLOPs"):
        table.add_column(col, justify="right" if col not in ("layer", "op") else "left")
    for l in info["layers"]:
        table.add_row(l["name"], l["op"], "x".join(map(str, l["weight_shape"])),
                      "x".join(map(str, l["activation_shape"])), f"{l['params']:,}", f"{l['flops'] / 1e6:.2f}",
                      f"{100 * l['params_share']:.1f}", f"{100 * l['flops_share']:.1f}")
    out.print(table)
    t = info["totals"]
    out.print(f"model totals: {t['params']:,} params, {t['flops'] / 1e6:.2f} MFLOPs; "
              f"{len(info['layers'])} factorizable layer(s)")
    if not info["layers"]:
        out.print("nothing to factorize in this model")
    for p in info.get("pairs", []):
        out.print(f"  pair {p['producer']} -> {p['consumer']}: {p['channels']} channels through "
                  f"{' '.join(p['between']) or 'nothing'} (--layer {p['producer']}=prune:K)", highlight=False)
    for s in info["skipped"]:
        out.print(f"  skipped {s['name']} ({s['op']}): {s['reason']}", highlight=False)


@app.command()
def apply(model: Path = typer.Argument(..., help="the .onnx file"),
          output: Path = typer.Option(..., "-o", "--out", help="the rewritten model"),
          plan: Optional[Path] = typer.Option(None, "--plan", help="a plan.json written by optimize"),
          layer: Optional[List[str]] = typer.Option(None, "--layer", help="NAME=SPEC, e.g. fc1=svd:64; repeatable; "
                                                    "with --all, overrides it for that layer"),
          all_spec: Optional[str] = typer.Option(None, "--all", help="one SPEC for every layer it fits, e.g. svd:0.25"),
          data: Optional[Path] = typer.Option(None, "--data", help=".npz: accuracy before/after, data-aware plans"),
          input_shape: Optional[List[str]] = ShapeOpt,
          factorization: Optional[str] = typer.Option(None, help="plain|scaled|whitened (default whitened "
                                                      "with --data)"),
          calibration: Optional[str] = CalibrationOpt,
          int8: Optional[str] = typer.Option(None, "--int8", help="dynamic|static: how the layers whose spec ends "
                                             "in +int8 are quantized (default dynamic; static calibrates on --data)"),
          memory_budget: Optional[str] = BudgetOpt,
          force: bool = ForceOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Rewrite layers by a plan or by method specs (svd:64, tt:0.25, conv_svd:0.5, conv_tt:16x32, dense, +int8)."""
    _setup(quiet)
    with _user_errors(debug):
        summary = api.apply(model, output, plan_path=plan, layer_specs=layer or None, all_spec=all_spec,
                            data=data, force=force, input_shapes=parse_input_shapes(input_shape),
                            memory_budget=memory_budget, factorization=factorization, calibration=calibration,
                            int8=int8)
    if quiet:
        return
    table = Table(title=f"{output}")
    for col in ("layer", "spec", "params", "FLOPs"):
        table.add_column(col)
    for row in summary["rewritten"]:
        table.add_row(row["layer"], row["spec"], f"{row['params'][0]:,} -> {row['params'][1]:,}",
                      f"{format_flops(row['flops'][0])} -> {format_flops(row['flops'][1])}")
    out.print(table)
    for note in summary["notes"]:
        out.print(f"  {note}", highlight=False)
    b, f = summary["model_bytes"], summary["model_flops"]
    out.print(f"weights {format_bytes(b[0])} -> {format_bytes(b[1])}; FLOPs {format_flops(f[0])} -> {format_flops(f[1])}")
    if "metric" in summary:
        m = summary["metric"]
        out.print(f"{m['kind']} on held-out data: {m['original']:.2f} -> {m['rewritten']:.2f}")
    out.print(f"wrote {', '.join(summary['files'])}")


@app.command()
def optimize(model: Path = typer.Argument(..., help="the .onnx file"),
             output: Path = typer.Option(..., "-o", "--out", help="the optimized model (out.onnx)"),
             latency: Optional[str] = typer.Option(None, help="5ms | 500us | 0.2s | -30% | 0.7x"),
             memory: Optional[str] = typer.Option(None, help="10MB | 12MiB | -50% | 0.5x (weight bytes)"),
             flops: Optional[str] = typer.Option(None, help="1.5G | 300M | -40% | 0.6x"),
             max_accuracy_drop: str = typer.Option("1", help="points of the metric, 0..100"),
             objective: str = typer.Option("latency", help="latency|memory|flops|accuracy"),
             metric: Optional[str] = typer.Option(None, help="accuracy|agreement|cosine"),
             output_name: Optional[str] = typer.Option(None, "--output", help="the model output the metric reads"),
             data: Optional[Path] = typer.Option(None, "--data", help=".npz: arrays named after the inputs (+ labels)"),
             provider: str = typer.Option("cpu", help="cpu|cuda|tensorrt|<full EP name>"),
             threads: int = typer.Option(1, help="intra-op threads for timing"),
             jobs: Optional[int] = JobsOpt,
             factorization: Optional[str] = typer.Option(None, help="plain|scaled|whitened (default whitened with --data)"),
             calib_samples: int = typer.Option(128, help="samples that calibrate; the rest evaluate"),
             sensitivity: Optional[bool] = typer.Option(
                 None, "--sensitivity/--no-sensitivity",
                 help="weight each layer's error by its one-layer drop in output fidelity (64 calibration "
                      "samples; default on with --data)"),
             time_budget: Optional[str] = typer.Option(None, help="stop timing new candidates after this, e.g. 10m"),
             cache_dir: Optional[Path] = typer.Option(None, help="cache folder: timings, and results/ (default "
                                                                 "~/.cache/denseflex-onnx/profiles)"),
             no_cache: bool = typer.Option(False, "--no-cache", help="time and compute everything afresh, store nothing"),
             cache_size: Optional[str] = CacheSizeOpt,
             seed: int = typer.Option(0, help="seed for random inputs"),
             layer: Optional[List[str]] = typer.Option(None, "--layer", help="NAME=SPEC forces a layer's choice"),
             exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="keep this layer dense"),
             input_shape: Optional[List[str]] = ShapeOpt,
             top_k: int = typer.Option(0, "--top-k", help="also write the next N plans"),
             max_verifications: int = typer.Option(4, "--max-verifications",
                                                   help="plans of the search built and measured end to end "
                                                        "(the uniform baselines come on top)"),
             calibration: Optional[str] = CalibrationOpt,
             int8: Optional[str] = Int8Opt, no_int8: bool = NoInt8Opt,
             force: bool = ForceOpt,
             memory_budget: Optional[str] = BudgetOpt,
             json_out: bool = typer.Option(False, "--json", help="one JSON object on stdout"),
             quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Find and write the factorized model that meets the constraints."""
    _setup(quiet)
    with _user_errors(debug):
        result = api.optimize(model, output, latency=latency, memory=memory, flops=flops,
                              max_accuracy_drop=max_accuracy_drop, objective=objective, metric=metric,
                              output=output_name, data=data, provider=provider, threads=threads,
                              factorization=factorization, calib_samples=calib_samples, sensitivity=sensitivity,
                              time_budget=time_budget, cache_dir=cache_dir, no_cache=no_cache, seed=seed,
                              layer_specs=layer, exclude=exclude, input_shapes=parse_input_shapes(input_shape),
                              top_k=top_k, force=force, progress=RichProgress(not quiet and not json_out),
                              memory_budget=memory_budget, max_verifications=max_verifications,
                              calibration=calibration, cache_size=cache_size, jobs=jobs,
                              int8=_int8_option(int8, no_int8))
    if json_out:
        summary = {k: result.report[k] for k in ("status", "baseline", "result", "int8_baseline", "stages", "plan", "misses")
                   if k in result.report}
        summary["files"] = [str(f) for f in result.files]
        print(json.dumps(summary, default=str))
    elif not quiet:
        _print_result(result)
    if not result.feasible:
        _fail("constraints not met; wrote the closest plan to "
              f"{[str(f) for f in result.files if str(f).endswith('.closest.onnx')][0]}: " + "; ".join(result.misses))


def _print_result(result: api.Result) -> None:
    r = result.report
    b, c = r["baseline"], r.get("result")
    table = Table(title=f"{r['model']} on {r['provider']} ({r['threads']} thread(s)), {r['metric']}")
    for col in ("", "latency", "params", "weights", "FLOPs", r["metric"]):
        table.add_column(col, justify="right")
    table.add_row("original", format_seconds(b["latency_s"]), f"{b['params']:,}", format_bytes(b["bytes"]),
                  format_flops(b["flops"]), f"{b['metric']:.2f}")
    if c:
        table.add_row("chosen", f"{format_seconds(c['latency_s'])} ({c['speedup']:.2f}x)", f"{c['params']:,}",
                      format_bytes(c["bytes"]), format_flops(c["flops"]), f"{c['metric']:.2f}")
    q = r.get("int8_baseline")
    if q:
        table.add_row(report.INT8_BASELINE, f"{format_seconds(q['latency_s'])} ({q['speedup']:.2f}x)", "",
                      format_bytes(q["bytes"]), format_flops(q["flops"]), f"{q['metric']:.2f}")
    out.print(table)
    chosen = [row for row in r["candidates"] if row["chosen"]]
    layers = Table(title="per-layer choices")
    for col in ("layer", "choice", "params", "layer error"):
        layers.add_column(col)
    for row in chosen:
        layers.add_row(row["layer"], row["spec"], f"{row['params']:,}", "" if row["error"] is None else f"{row['error']:.4f}")
    out.print(layers)
    s = r["stages"]
    out.print(f"design space: {s['grid']} candidates -> {s['after_saves_nothing']} (save something) -> "
              f"{s['after_dominated']} (not dominated) -> {s.get('after_timing', '-')} (after timing); "
              f"{s['timed']} timed, {s['cached']} cached, {100 * s['never_timed_share']:.0f}% of the grid never timed")
    out.print("wrote " + ", ".join(str(f) for f in result.files), highlight=False)


@app.command()
def explore(model: Path = typer.Argument(..., help="the .onnx file"),
            prefix: Path = typer.Option(..., "-o", "--out", help="prefix of the report files"),
            latency: Optional[str] = typer.Option(None), memory: Optional[str] = typer.Option(None),
            flops: Optional[str] = typer.Option(None), max_accuracy_drop: str = typer.Option("1"),
            objective: str = typer.Option("latency"), metric: Optional[str] = typer.Option(None),
            output_name: Optional[str] = typer.Option(None, "--output"),
            data: Optional[Path] = typer.Option(None, "--data"), provider: str = typer.Option("cpu"),
            threads: int = typer.Option(1), jobs: Optional[int] = JobsOpt,
            factorization: Optional[str] = typer.Option(None), calib_samples: int = typer.Option(128),
            sensitivity: Optional[bool] = typer.Option(None, "--sensitivity/--no-sensitivity"),
            time_budget: Optional[str] = typer.Option(None), cache_dir: Optional[Path] = typer.Option(None),
            no_cache: bool = typer.Option(False, "--no-cache"), cache_size: Optional[str] = CacheSizeOpt,
            seed: int = typer.Option(0),
            layer: Optional[List[str]] = typer.Option(None, "--layer"),
            exclude: Optional[List[str]] = typer.Option(None, "--exclude"),
            input_shape: Optional[List[str]] = ShapeOpt, memory_budget: Optional[str] = BudgetOpt,
            calibration: Optional[str] = CalibrationOpt,
            int8: Optional[str] = Int8Opt, no_int8: bool = NoInt8Opt,
            force: bool = ForceOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Explore the design space and write reports (PREFIX.report.json/.csv/.md, PREFIX.pareto.png); no model."""
    _setup(quiet)
    with _user_errors(debug):
        result = api.explore(model, prefix, force=force, progress=RichProgress(not quiet), latency=latency,
                             memory=memory, flops=flops, max_accuracy_drop=max_accuracy_drop, objective=objective,
                             metric=metric, output=output_name, data=data, provider=provider, threads=threads,
                             factorization=factorization, calib_samples=calib_samples, sensitivity=sensitivity,
                             time_budget=time_budget, cache_dir=cache_dir, no_cache=no_cache, seed=seed,
                             layer_specs=layer, exclude=exclude, input_shapes=parse_input_shapes(input_shape),
                             memory_budget=memory_budget, calibration=calibration, cache_size=cache_size,
                             jobs=jobs, int8=_int8_option(int8, no_int8))
    if not quiet:
        s = result.report["stages"]
        out.print(f"design space: {s['grid']} -> {s['after_saves_nothing']} -> {s['after_dominated']} -> "
                  f"{s.get('after_timing')}; {100 * s['never_timed_share']:.0f}% never timed")
        if "estimate" in result.report:
            e, b = result.report["estimate"], result.report["baseline"]
            out.print(f"estimated plan: latency {format_seconds(e['latency_s'])} (original {format_seconds(b['latency_s'])}), "
                      f"weights {format_bytes(e['bytes'])}, FLOPs {format_flops(e['flops'])} (not verified)")
        out.print("wrote " + ", ".join(str(f) for f in result.files), highlight=False)
    if result.status == "infeasible":
        _fail("no plan meets the constraints by the layer estimates")


@app.command()
def profile(model: Path = typer.Argument(..., help="the .onnx file"),
            provider: str = typer.Option("cpu", help="cpu|cuda|tensorrt|<full EP name>"),
            threads: int = typer.Option(1), input_shape: Optional[List[str]] = ShapeOpt,
            json_out: bool = typer.Option(False, "--json"), quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Median and p90 latency of a model at the given input shapes."""
    _setup(quiet)
    with _user_errors(debug):
        timing = api.profile_model(model, provider=provider, threads=threads,
                                   input_shapes=parse_input_shapes(input_shape))
    if json_out:
        print(json.dumps(timing))
    elif not quiet:
        out.print(f"{model}: median {format_seconds(timing['median_s'])}, p90 {format_seconds(timing['p90_s'])} "
                  f"({timing['runs']} runs on {timing['provider']}, {timing['threads']} thread(s), inputs "
                  f"{timing['input_shapes']})")


cache_app = typer.Typer(no_args_is_help=True, help="The cache of timings and results that optimize and explore keep.")
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(cache_dir: Optional[Path] = CacheDirOpt, json_out: bool = typer.Option(False, "--json"),
               debug: bool = DebugOpt):
    """Where the cache is and what it holds."""
    with _user_errors(debug):
        info = api.cache_info(cache_dir)
    if json_out:
        print(json.dumps(info))
        return
    out.print(f"{info['folder']}: {info['timings']} timings, {info['results']} results, "
              f"{format_bytes(info['bytes'])}", highlight=False)


@cache_app.command("clear")
def cache_clear(cache_dir: Optional[Path] = CacheDirOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt):
    """Remove everything in the cache (it is rebuilt as runs need it)."""
    with _user_errors(debug):
        removed = api.cache_clear(cache_dir)
    if not quiet:
        out.print(f"removed {removed} file(s)")


def main() -> None:
    """Console entry point. Errors are one line (see _user_errors): exit 2 for what the user or
    the model can change, 1 for a bug in the tool (its traceback behind --debug)."""
    app()


if __name__ == "__main__":
    main()
