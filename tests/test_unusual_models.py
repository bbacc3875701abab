"""Unusual models are rewritten or skipped with a reason, never broken: fp16, several outputs,
external data, integer inputs without data, opsets at both ends of the supported range."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import denseflex_onnx
from denseflex_onnx.profile import Budget

import graphs

FAST = Budget(min_runs=3, max_runs=15, max_seconds=0.02)


def two_output_mlp(dtype=np.float32, opset=17):
    """X -> fc0 -> relu -> {fc1 -> A, fc2 -> B}: two outputs, the metric reads the one asked for."""
    rng = np.random.default_rng(0)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(graphs.decaying(rng, k, n).astype(dtype), f"W{i}")
             for i, (k, n) in enumerate([(48, 96), (96, 32), (96, 8)])]
    nodes = [helper.make_node("MatMul", ["X", "W0"], ["h"], name="fc0"), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W1"], ["A"], name="fc1"),
             helper.make_node("MatMul", ["a", "W2"], ["B"], name="fc2")]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("X", t, ["N", 48])],
                              [helper.make_tensor_value_info("A", t, ["N", 32]),
                               helper.make_tensor_value_info("B", t, ["N", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("dtype,opset", [(np.float32, 11), (np.float16, 17), (np.float32, 21)])
def test_optimize_fp16_and_opsets_several_outputs(tmp_path, dtype, opset):
    path = graphs.save(two_output_mlp(dtype, opset), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    result = denseflex_onnx.optimize(path, out, memory="-40%", max_accuracy_drop=5, output="B",
                                     cache_dir=tmp_path / "c", timing=FAST)
    written = onnx.load(str(out if result.feasible else tmp_path / "o.closest.onnx"))
    onnx.checker.check_model(written, full_check=True)
    assert [o.name for o in written.graph.output] == ["A", "B"]
    assert written.opset_import[0].version == opset
    assert all(i.data_type == helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) for i in written.graph.initializer)
    x = np.random.default_rng(1).standard_normal((3, 48)).astype(dtype)
    a, b = ort.InferenceSession(written.SerializeToString()).run(None, {"X": x})
    assert a.shape == (3, 32) and b.shape == (3, 8) and a.dtype == dtype


def test_unknown_output_name_is_a_user_error(tmp_path):
    path = graphs.save(two_output_mlp(), tmp_path / "m.onnx")
    r = subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", "optimize", str(path), "--output", "C",
                        "-o", str(tmp_path / "o.onnx"), "--no-cache"], capture_output=True, text=True)
    assert r.returncode == 2 and "--output C" in r.stderr and "A, B" in r.stderr


def test_apply_keeps_external_data_external(tmp_path):
    model = graphs.mlp((64, 160, 96, 10), seed=3)
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", "apply", str(path), "--all", "svd:0.5",
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.onnx.data").is_file()
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert ort.InferenceSession(str(out)).run(None, {"X": x})[0].shape == (2, 10)


def test_integer_ids_without_data_are_drawn_from_the_embedding_table(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 32)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["Y"], name="proj")]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", "S", 24])],
                              [numpy_helper.from_array(table, "E"),
                               numpy_helper.from_array(graphs.decaying(rng, 32, 24), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = graphs.save(model, tmp_path / "emb.onnx")
    result = denseflex_onnx.optimize(path, flops="-30%", max_accuracy_drop=10, input_shapes={"ids": (1, 16)},
                                     cache_dir=tmp_path / "c", timing=FAST)
    assert result.report["samples"]["synthetic"] is True
    assert result.report["metric"] == "cosine"
