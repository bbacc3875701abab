"""Errors on models the tool cannot handle: one line, exit 2; a bug in the tool: one line, exit 1;
the traceback only with --debug."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from denseflex_onnx.plan import DENSE
from denseflex_onnx import api, cli
from tests.graphs import mlp, model, save


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def _unrunnable(path):
    """Valid ONNX (checker and shape inference accept it) that onnxruntime fails to run:
    a Reshape of 8 values to 3 x 5."""
    w = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "s"], ["y"])]
    m = model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([3, 5], np.int64), "s")])
    return save(m, path)


def _error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("error:")]


def test_a_model_onnxruntime_cannot_run_is_one_line_exit_2_and_writes_nothing(tmp_path):
    path = _unrunnable(tmp_path / "bad.onnx")
    run = _cli("optimize", path, "--flops", "-20%", "--no-cache", "-o", tmp_path / "o.onnx")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "[E:onnxruntime" not in run.stderr   # nor onnxruntime's own log
    lines = _error_lines(run.stderr)
    assert len(lines) == 1 and "onnxruntime cannot run the model" in lines[0] and "--input-shape" in lines[0]
    assert list(tmp_path.iterdir()) == [path]


def test_debug_shows_the_traceback_behind_the_line(tmp_path):
    path = _unrunnable(tmp_path / "bad.onnx")
    run = _cli("optimize", path, "--flops", "-20%", "--no-cache", "-o", tmp_path / "o.onnx", "--debug")
    assert run.returncode == 2
    assert "Traceback" in run.stderr and len(_error_lines(run.stderr)) == 1


def _raise_bug(*args, **kwargs):
    raise ZeroDivisionError("division by zero")


def test_a_bug_in_the_tool_exits_1_with_one_line_and_asks_for_a_report(tmp_path, monkeypatch):
    path = save(mlp(), tmp_path / "m.onnx")
    monkeypatch.setattr(api, "inspect", _raise_bug)
    result = CliRunner().invoke(cli.app, ["inspect", str(path)])
    assert result.exit_code == 1
    text = result.output
    assert "internal error: ZeroDivisionError: division by zero" in text and "--debug" in text
    assert "Traceback" not in text


def test_a_layer_s_failure_names_the_layer_and_the_way_around_it(tmp_path, monkeypatch):
    from denseflex_onnx import space
    path = save(mlp(), tmp_path / "m.onnx")
    original = space.Factors.error

    def failing(self, layer, choice, max_rank=None):
        if layer.name == "fc1":
            raise ValueError("bad factors")
        return original(self, layer, choice, max_rank)

    monkeypatch.setattr(space.Factors, "error", failing)
    result = CliRunner().invoke(cli.app, ["optimize", str(path), "--flops", "-20%", "--no-cache",
                                          "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 1
    assert "on layer fc1" in result.output and "--exclude fc1" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_a_layer_whose_scoring_runs_out_of_memory_is_kept_dense_and_named(tmp_path, monkeypatch, caplog):
    from denseflex_onnx import space
    path = save(mlp(), tmp_path / "m.onnx")
    original = space.Factors.error

    def short_of_memory(self, layer, choice, max_rank=None):
        if layer.name == "fc1":
            raise MemoryError()
        return original(self, layer, choice, max_rank)

    monkeypatch.setattr(space.Factors, "error", short_of_memory)
    with caplog.at_level("WARNING", logger="denseflex_onnx"):
        result = api.optimize(path, tmp_path / "o.onnx", flops="-20%", max_accuracy_drop=100, no_cache=True)
    assert any("fc1: its candidates could not be scored (MemoryError" in r.getMessage() for r in caplog.records)
    # fc1's own candidates (its pair's prune candidates are scored on fc2's statistics)
    fc1 = [row for row in result.report["candidates"] if row["layer"] == "fc1" and row["method"] not in ("dense", "prune")]
    assert fc1 and all(row["dropped"] for row in fc1)
    assert any(row["dropped"] == "scoring failed: MemoryError" for row in fc1)
    assert result.plan.layers.get("fc1", DENSE).method in ("dense", "prune") and result.plan.layers
