"""Interruptions, failing candidates and determinism: a compiler pass must never corrupt anything."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import denseflex_onnx
from denseflex_onnx.passes import PASSES
from denseflex_onnx.profile import Budget

import graphs

ROOT = Path(__file__).resolve().parents[1]
MLP, MLP_DATA = ROOT / "models/mnist_mlp.onnx", ROOT / "models/mnist_mlp_val.npz"
FAST = Budget(min_runs=3, max_runs=15, max_seconds=0.02)


def test_sigint_during_optimize_leaves_no_output_and_a_cache_a_rerun_resumes_from(tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "out.onnx"
    args = [sys.executable, "-m", "denseflex_onnx.cli", "optimize", str(MLP), "--data", str(MLP_DATA),
            "--latency", "-30%", "--cache-dir", str(cache), "-o", str(out)]
    # a job started with & by a non-interactive shell inherits SIGINT ignored, and Python then
    # never raises KeyboardInterrupt: give the child the default disposition whatever ran pytest
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cache.glob("*.json"))) < 5 and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "optimize ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]          # no partial output of any kind
    timed = list(cache.glob("*.json"))
    assert timed and not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))
    for path in timed:
        assert json.loads(path.read_text())["median"] > 0            # every cache entry is whole
    result = denseflex_onnx.optimize(MLP, data=MLP_DATA, latency="-30%", cache_dir=cache, timing=FAST)
    assert result.report["stages"]["cached"] >= len(timed)            # the rerun resumed from it


def test_a_candidate_whose_timing_fails_is_reported_and_the_search_goes_on(tmp_path, monkeypatch, caplog):
    """One method's rewrite breaks (our own code, patched): those candidates are dropped with a
    warning, the rest are timed and a plan is still found."""
    model = graphs.save(graphs.mlp((64, 160, 96, 10), seed=1), tmp_path / "mlp.onnx")

    def broken(graph, layer, factors):
        raise RuntimeError("simulated failure in the tt rewrite")

    monkeypatch.setattr(PASSES["tt"], "rewrite", broken)
    result = denseflex_onnx.optimize(model, memory="-30%", cache_dir=tmp_path / "c", timing=FAST)
    assert result.report["stages"]["timing_failed"] > 0
    assert "simulated failure" in caplog.text
    failed = [r for r in result.report["candidates"] if r["dropped"] == "timing failed"]
    assert failed and all(r["method"] == "tt" for r in failed)
    assert result.feasible and all(c.method != "tt" for c in result.plan.layers.values())


def test_same_inputs_seed_and_cache_give_the_same_plan_and_model(tmp_path):
    model = graphs.save(graphs.mlp((64, 160, 96, 10), seed=2), tmp_path / "mlp.onnx")
    cache = tmp_path / "cache"
    first = denseflex_onnx.optimize(model, tmp_path / "a.onnx", flops="-40%", cache_dir=cache, seed=3, timing=FAST)
    second = denseflex_onnx.optimize(model, tmp_path / "b.onnx", flops="-40%", cache_dir=cache, seed=3, timing=FAST)
    assert first.plan.to_json() == second.plan.to_json()
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        assert ta.name == tb.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb))
