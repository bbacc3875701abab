"""Bad inputs, as a user meets them on the command line: every one is refused the same way.

Each case runs `denseflex-onnx` in a subprocess inside its own folder, holding its own copies of the
inputs, and must end with: exit code 2; at most 3 lines on stderr, no traceback; the last (error) line
naming what is wrong; no new file in the folder (except what CLI.md says, e.g. the closest plan when
constraints cannot be met); every file that was there before byte for byte unchanged (the input model,
the data, a plan, an existing output that was not --force'd).

A fresh interpreter costs about a second of imports, so the module fixture `runs` starts every case
side by side and the tests read the results by case id. Most cases fail before any timing; the one
that times (impossible constraints) uses --no-cache, as do all optimize/explore cases.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphs
import graphs_extra as gx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "model.onnx"           # graphs.mlp((64, 96, 48, 10)): input X [N, 64], Gemm fc0, fc1, fc2, output Y
CLOSEST = {"out.closest.onnx", "out.closest.plan.json", "out.report.json", "out.report.csv",
           "out.report.md", "out.pareto.png"}
CUDA_INSTALLED = "CUDAExecutionProvider" in ort.get_available_providers()


# ------------------------------------------------------------------------------------------ inputs

def _mlp(folder: Path) -> None:
    graphs.save(graphs.mlp((64, 96, 48, 10)), folder / MODEL)


def _relu(folder: Path) -> None:
    graphs.save(gx.relu_only(), folder / MODEL)


def _dynamic(folder: Path) -> None:
    """A MatMul on X [N, S, 64]: S is symbolic and not the leading dim."""
    graphs.save(graphs.matmul(k=64, n=32, lead=("N", "S")), folder / MODEL)


def _npz(folder: Path, name: str = "data.npz", samples: int = 20, **arrays) -> None:
    r = np.random.default_rng(0)
    arrays.setdefault("X", r.standard_normal((samples, 64)).astype(np.float32))
    np.savez(folder / name, **{k: v for k, v in arrays.items() if v is not None})


def _plan(folder: Path, layers: dict, factorization: str = "plain", name: str = "plan.json") -> None:
    (folder / name).write_text(json.dumps({"format": "denseflex-plan/1", "model_sha256": "",
                                           "factorization": factorization, "layers": layers}))


def _then(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        for step in steps:
            step(folder)
    return setup


def _write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)
    return setup


def _truncated(folder: Path) -> None:
    _mlp(folder)
    whole = (folder / MODEL).read_bytes()
    (folder / MODEL).write_bytes(whole[: len(whole) // 2])


def _read_only_folder(folder: Path) -> None:
    _mlp(folder)
    (folder / "ro").mkdir()
    (folder / "ro").chmod(0o500)


def _still_writable(folder: Path) -> str | None:
    if os.access(folder / "ro", os.W_OK):
        return "a 0o500 folder is still writable for this user (root); output-under-a-file covers it"
    return None


# ------------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    id: str
    setup: Callable[[Path], None]
    args: list[str]
    names: list[str]                          # phrases the error line must hold
    new_files: set[str] = field(default_factory=set)   # exactly these may (and must) appear
    skip: str | None = None
    skip_if: Callable[[Path], str | None] | None = None  # asked after setup, with the case folder


def _opt(*args) -> list[str]:
    return ["optimize", MODEL, "-o", "out.onnx", "--no-cache", *args]


def _apply(*args) -> list[str]:
    return ["apply", MODEL, "-o", "out.onnx", *args]


def _explore(*args) -> list[str]:
    return ["explore", MODEL, "-o", "rep", "--no-cache", *args]


CASES = [
    # --- the model file itself
    Case("missing-optimize", lambda f: None, _opt(), [MODEL, "no such file"]),
    Case("folder-apply", lambda f: (f / MODEL).mkdir(), _apply("--all", "svd:0.5"), [MODEL, "folder"]),
    Case("empty-explore", _write(MODEL, b""), _explore(), [MODEL, "empty"]),
    Case("text-profile", _write(MODEL, "this is not a model\n" * 3), ["profile", MODEL],
         [MODEL, "not an ONNX model"]),
    Case("truncated-optimize", _truncated, _opt(), [MODEL, "truncated"]),
    # --- nothing to factorize (inspect exits 0 on it: test_inspect_nothing_to_factorize)
    Case("nothing-apply", _relu, _apply("--all", "svd:0.5"), [MODEL, "nothing to factorize"]),
    Case("nothing-optimize", _relu, _opt(), [MODEL, "nothing to factorize"]),
    Case("nothing-explore", _relu, _explore(), [MODEL, "nothing to factorize"]),
    # --- shapes
    Case("dynamic-dim-optimize", _dynamic, _opt(), ["input X", "dim 1", "S", "--input-shape X:"]),
    Case("dynamic-dim-profile", _dynamic, ["profile", MODEL], ["input X", "dim 1", "S", "--input-shape X:"]),
    Case("shape-not-a-number", _mlp, _opt("--input-shape", "x:1xfoo"), ["--input-shape", "x:1xfoo", "NAME:1x128"]),
    Case("shape-no-dims", _mlp, ["profile", MODEL, "--input-shape", "x"], ["--input-shape", "'x'", "NAME:1x128"]),
    Case("shape-open-bracket", _mlp, _apply("--all", "svd:0.5", "--input-shape", "x:[1,"),
         ["--input-shape", "x:[1,", "NAME:1x128"]),
    Case("shape-unknown-input", _mlp, ["inspect", MODEL, "--input-shape", "Z:1x64"], ["--input-shape", "Z", "X"]),
    # --- constraints
    Case("impossible-latency", _mlp, _opt("--latency", "1us", "--input-shape", "X:1x64"),
         ["constraints not met", "out.closest.onnx", "latency"], new_files=CLOSEST),
    Case("latency-parsecs", _mlp, _opt("--latency", "5 parsecs"), ["--latency", "5 parsecs", "not understood"]),
    Case("memory-XB", _mlp, _opt("--memory", "10XB"), ["--memory", "10XB", "not understood"]),
    Case("flops-abc", _mlp, _opt("--flops", "abc"), ["--flops", "abc", "not understood"]),
    Case("accuracy-drop-150", _mlp, _opt("--max-accuracy-drop", "150"),
         ["--max-accuracy-drop", "150", "between 0 and 100"]),
    Case("accuracy-drop-negative", _mlp, _opt("--max-accuracy-drop", "-1"),
         ["--max-accuracy-drop", "-1", "between 0 and 100"]),
    Case("objective-nonsense", _mlp, _opt("--objective", "nonsense"), ["--objective", "nonsense", "latency"]),
    Case("threads-zero", _mlp, _opt("--threads", "0"), ["--threads", "0", "at least 1"]),
    Case("time-budget-soon", _mlp, _opt("--time-budget", "soon"), ["--time-budget", "soon", "10m"]),
    Case("metric-accuracy-no-labels", _then(_mlp, _npz), _opt("--metric", "accuracy", "--data", "data.npz"),
         ["--metric accuracy", "labels"]),
    Case("metric-unknown", _mlp, _opt("--metric", "f1"), ["--metric", "f1", "agreement"]),
    # --- providers
    Case("provider-unknown", _mlp, _opt("--provider", "nosuch"), ["nosuch", "installed", "CPUExecutionProvider"]),
    Case("provider-not-installed", _mlp, ["profile", MODEL, "--provider", "cuda"],
         ["CUDAExecutionProvider", "not installed", "installed: ", "CPUExecutionProvider"],
         skip="CUDAExecutionProvider is installed here" if CUDA_INSTALLED else None),
    # --- output paths
    Case("output-is-input-apply", _mlp, ["apply", MODEL, "-o", MODEL, "--all", "svd:0.5"], [MODEL, "input model"]),
    Case("output-is-input-optimize", _mlp, ["optimize", MODEL, "-o", f"./{MODEL}", "--no-cache"],
         [MODEL, "input model"]),
    Case("output-exists", _then(_mlp, _write("out.onnx", b"keep me")), _opt(), ["out.onnx exists", "--force"]),
    Case("output-report-exists", _then(_mlp, _write("out.report.json", "{}")), _opt(),
         ["out.report.json exists", "--force"]),
    Case("explore-report-exists", _then(_mlp, _write("rep.report.md", "# mine")), _explore(),
         ["rep.report.md exists", "--force"]),
    Case("output-under-a-file", _then(_mlp, _write("notes.txt", "notes\n")),
         ["optimize", MODEL, "-o", "notes.txt/out.onnx", "--no-cache"], ["notes.txt"]),
    Case("output-folder-read-only", _read_only_folder,
         ["apply", MODEL, "-o", "ro/out.onnx", "--all", "svd:0.5"], ["ro", "not writable"],
         skip_if=_still_writable),
    # --- plans
    Case("plan-unknown-layers", _then(_mlp, lambda f: _plan(f, {"nosuch": {"method": "svd", "config": {"rank": 4}}})),
         _apply("--plan", "plan.json"), ["plan.json", "nosuch", "does not have"]),
    Case("plan-not-json", _then(_mlp, _write("plan.json", "fc0 = svd:4\n")), _apply("--plan", "plan.json"),
         ["plan.json", "not a JSON plan"]),
    Case("plan-data-aware-without-data",
         _then(_mlp, lambda f: _plan(f, {"fc0": {"method": "svd", "config": {"rank": 8}}}, "whitened")),
         _apply("--plan", "plan.json"), ["plan.json", "whitened", "--data"]),
    # --- data
    Case("data-missing-input", _then(_mlp, lambda f: _npz(f, X=None, Z=np.zeros((20, 64), np.float32))),
         _opt("--data", "data.npz"), ["data.npz", "no array for input X"]),
    Case("data-wrong-shape", _then(_mlp, lambda f: _npz(f, X=np.zeros((20, 63), np.float32))),
         _apply("--all", "svd:0.5", "--data", "data.npz"), ["data.npz", "array X", "[20, 63]", "64"]),
    Case("data-wrong-dtype", _then(_mlp, lambda f: _npz(f, X=np.arange(20 * 64).reshape(20, 64))),
         _opt("--data", "data.npz"), ["data.npz", "array X", "int64", "float32"]),
    Case("data-labels-length", _then(_mlp, lambda f: _npz(f, labels=np.zeros(5, np.int64))),
         _apply("--all", "svd:0.5", "--data", "data.npz"), ["data.npz", "labels", "[5]", "[20]"]),
    Case("data-not-npz", _then(_mlp, _write("data.npz", "x,y\n1,2\n")), _opt("--data", "data.npz"),
         ["--data data.npz", "not an .npz file"]),
    # --- specs and layer names
    Case("rank-too-large", _mlp, _apply("--layer", "fc0=svd:9999"), ["fc0", "9999", "full rank 64"]),
    Case("layer-unknown", _mlp, _apply("--layer", "nosuch=svd:4"), ["--layer nosuch", "no such layer"]),
    Case("exclude-unknown", _mlp, _opt("--exclude", "nosuch"), ["--exclude nosuch", "no such layer"]),
    # --- found while writing this corpus (CLI.md: exit 1 only for a bug; bad numbers are user errors)
    Case("seed-negative", _mlp, _opt("--seed", "-1", "--input-shape", "X:1x64"), ["--seed", "-1"]),
    Case("calib-samples-zero", _then(_mlp, _npz), _opt("--calib-samples", "0", "--data", "data.npz"),
         ["--calib-samples", "0"]),
    Case("profile-threads-zero", _mlp, ["profile", MODEL, "--threads", "0", "--input-shape", "X:1x64"],
         ["--threads", "0", "at least 1"]),
]


# ------------------------------------------------------------------------------------------ runner

def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under the folder (hidden temp files included)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Run:
    case: Case
    folder: Path
    before: dict[str, str]
    after: dict[str, str]
    result: subprocess.CompletedProcess


def _launch(case: Case, folder: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", *case.args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=180)


def _selected(request) -> set[str]:
    """The case ids this session will read (so that `-k one-case` starts one subprocess, not all)."""
    ids = set()
    for item in request.session.items:
        if item.module is not request.module:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "case" in params:
            ids.add(params["case"].id)
        elif item.originalname == "test_impossible_constraints_contract":
            ids.add("impossible-latency")
        elif item.originalname == "test_corpus_size":
            ids |= {c.id for c in CASES}
    return ids


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[str, Run | str]:
    """Case id -> its Run, or the reason it was skipped."""
    base = tmp_path_factory.mktemp("bad_inputs")
    folders, before, skipped = {}, {}, {}
    wanted = _selected(request)
    for case in CASES:
        if case.skip or case.id not in wanted:
            continue
        folders[case.id] = base / case.id
        folders[case.id].mkdir()
        case.setup(folders[case.id])
        before[case.id] = _snapshot(folders[case.id])
        if case.skip_if and (reason := case.skip_if(folders[case.id])):
            skipped[case.id] = reason
    todo = [c for c in CASES if c.id in folders and c.id not in skipped]
    # the slow (timing) cases first, so they overlap with the many fast ones
    todo.sort(key=lambda c: c.id not in ("impossible-latency", "calib-samples-zero", "seed-negative"))
    with ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 2))) as pool:
        futures = {c.id: pool.submit(_launch, c, folders[c.id]) for c in todo}
        results = {cid: f.result() for cid, f in futures.items()}
    yield {**skipped,
           **{c.id: Run(c, folders[c.id], before[c.id], _snapshot(folders[c.id]), results[c.id]) for c in todo}}
    for folder in folders.values():             # let pytest clean up the read-only folder
        ro = folder / "ro"
        if ro.exists():
            ro.chmod(stat.S_IRWXU)


def _lines(text: str) -> list[str]:
    return [l.rstrip() for l in text.splitlines() if l.strip()]


def _where(run: Run) -> str:
    r = run.result
    return f"\n$ cd {run.folder} && denseflex-onnx {' '.join(run.case.args)}\nrc={r.returncode}\n" \
           f"--- stderr\n{r.stderr}--- stdout (tail)\n{r.stdout[-1500:]}"


# ------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused(runs, case: Case):
    if case.skip:
        pytest.skip(case.skip)
    run = runs[case.id]
    if isinstance(run, str):
        pytest.skip(run)
    r = run.result
    assert r.returncode == 2, f"expected exit 2{_where(run)}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, _where(run)
    err = _lines(r.stderr)
    assert 1 <= len(err) <= 3, f"expected 1 to 3 stderr lines, got {len(err)}{_where(run)}"
    last = err[-1]
    assert last.startswith("error:"), f"the last stderr line is not the error{_where(run)}"
    for phrase in case.names:
        assert phrase in last, f"{phrase!r} not in the error line{_where(run)}"
    # no file created (but what the contract names), none changed (input model, data, plan, old outputs)
    created = set(run.after) - set(run.before)
    assert created == case.new_files, f"files created: {sorted(created)}{_where(run)}"
    assert not set(run.before) - set(run.after), f"files removed: {sorted(set(run.before) - set(run.after))}"
    changed = [p for p in run.before if run.after.get(p) != run.before[p]]
    assert not changed, f"files changed: {changed}{_where(run)}"


def test_impossible_constraints_contract(runs):
    """--latency 1us: nothing at out.onnx, the closest plan and its reports, and by how much on the last line."""
    run = runs["impossible-latency"]
    assert run.result.returncode == 2, _where(run)
    assert "out.onnx" not in run.after
    report = json.loads((run.folder / "out.report.json").read_text())
    assert report["status"] == "infeasible"
    plan = json.loads((run.folder / "out.closest.plan.json").read_text())
    assert plan["format"] == "denseflex-plan/1"
    last = _lines(run.result.stderr)[-1]
    assert re.search(r"latency \d+(\.\d+)? (s|ms|us) > 1 us \(\+\d+%\)$", last), _where(run)


def test_inspect_nothing_to_factorize(tmp_path):
    """`inspect` is not refused on a model with nothing to factorize: exit 0, and it says so."""
    _relu(tmp_path)
    before = _snapshot(tmp_path)
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "denseflex_onnx.cli", "inspect", MODEL]
    text = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    as_json = subprocess.run([*cmd, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert "nothing to factorize" in text.stdout
    assert "Traceback" not in text.stderr
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    assert info["layers"] == [] and info["totals"]["params"] == 0
    assert _snapshot(tmp_path) == before


def _model_bytes(run: Run) -> bytes | None:
    path = run.folder / MODEL
    return path.read_bytes() if path.is_file() else None


def _parses(data: bytes) -> onnx.ModelProto | None:
    """The model if the bytes are a complete ONNX model the checker accepts, else None."""
    try:
        proto = onnx.load_model_from_string(data)
        onnx.checker.check_model(proto)
    except Exception:               # DecodeError, ValidationError: not a usable model
        return None
    return proto if proto.graph.node else None


def _ops(graph: onnx.GraphProto) -> set[str]:
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            for g in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                ops |= _ops(g)
    return ops


def _provider_names(args: list[str]) -> list[str]:
    short = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    return [short.get(args[i + 1], args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--provider"]


def _not_onnx(run: Run) -> bool:
    data = _model_bytes(run)
    return bool(data) and _parses(data) is None and not graphs.mlp((64, 96, 48, 10)).SerializeToString().startswith(data)


def _truncated_model(run: Run) -> bool:
    data, whole = _model_bytes(run), graphs.mlp((64, 96, 48, 10)).SerializeToString()
    return bool(data) and len(data) < len(whole) and whole.startswith(data) and _parses(data) is None


def _nothing_to_factorize(run: Run) -> bool:
    proto = _parses(_model_bytes(run) or b"")
    return proto is not None and not _ops(proto.graph) & {"Gemm", "MatMul", "Conv"} \
        and run.case.args[0] in ("apply", "optimize", "explore")


def _dynamic_without_hint(run: Run) -> bool:
    proto = _parses(_model_bytes(run) or b"")
    if proto is None or "--input-shape" in run.case.args:
        return False
    dims = [d for i in proto.graph.input for d in list(i.type.tensor_type.shape.dim)[1:]]
    return any(d.dim_param or not d.HasField("dim_value") for d in dims)


def _impossible(run: Run) -> bool:
    report = run.folder / "out.report.json"
    return (any(a in run.case.args for a in ("--latency", "--memory", "--flops")) and report.is_file()
            and json.loads(report.read_text()).get("status") == "infeasible" and "out.onnx" not in run.after
            and "out.closest.onnx" in run.after)


def _provider_missing(run: Run) -> bool:
    names = _provider_names(run.case.args)
    return bool(names) and all(n not in ort.get_available_providers() for n in names)


# each kind of bad input the project's standards name: how to tell a case really is one, and what
# its error line must then say
KINDS = {
    "a file that is not ONNX": (_not_onnx, "not an ONNX model"),
    "a truncated model": (_truncated_model, "truncated"),
    "nothing to factorize": (_nothing_to_factorize, "nothing to factorize"),
    "a dynamic dim with no --input-shape": (_dynamic_without_hint, "--input-shape"),
    "constraints that cannot be met": (_impossible, "constraints not met"),
    "a provider that is not installed": (_provider_missing, "installed"),
}


def test_corpus_size(runs):
    """The corpus, as it ran: every case not skipped was started and refused (exit 2, one error line,
    no traceback), and each kind of bad input in KINDS is there, judged on the case's own input
    files and arguments (not its id), with the error line that kind calls for."""
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique (runs is keyed by them)"
    ran = {}
    for case in CASES:
        if case.skip:
            assert case.id not in runs, case.id
            continue
        run = runs.get(case.id)
        assert run is not None, f"case {case.id} never ran"
        if isinstance(run, str):                 # skipped after setup by its own skip_if, with the reason
            assert case.skip_if is not None, (case.id, run)
            continue
        r = run.result
        assert r.returncode == 2, _where(run)
        assert "Traceback" not in r.stderr + r.stdout, _where(run)
        err = _lines(r.stderr)
        errors = [line for line in err if line.startswith("error:")]
        assert len(errors) == 1 and err[-1] == errors[0] and len(err) <= 3, _where(run)
        ran[case.id] = run
    for kind, (really, phrase) in KINDS.items():
        cases = [cid for cid, run in ran.items() if really(run)]
        assert cases, f"no case in the corpus is {kind}"
        for cid in cases:
            last = _lines(ran[cid].result.stderr)[-1]
            assert phrase in last, f"{cid} ({kind}): {phrase!r} not in {last!r}"
    # the three commands that refuse a model with nothing to factorize are all covered
    nothing = {ran[cid].case.args[0] for cid in ran if _nothing_to_factorize(ran[cid])}
    assert nothing == {"apply", "optimize", "explore"}, nothing
