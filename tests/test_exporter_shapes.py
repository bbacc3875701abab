"""Shapes as real exporters write them (issue 13.6): every model onnxruntime runs, the tool runs.

Three small graphs, each with one fault seen in a shipped model:
- a batch dim written as dim_value -1 (or 0), as Paddle exports (an OCR direction classifier);
- layers inside If branches whose activation shapes onnx's inference cannot resolve there
  (data propagation stops at a body: a silero-style voice-activity detector);
- a declared output rank that differs from what the graph computes (an LSTM captcha reader:
  onnxruntime only warns on a plain run, but fails a reused IOBinding).
Each goes end to end: inspect finds the layers, `apply --all` at full rank keeps the outputs,
a short optimize ends as a user would see it (0 or 2, no traceback).
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

import denseflex_onnx
from denseflex_onnx.errors import UserError
from denseflex_onnx.loading import load
from denseflex_onnx.model import infer_shapes
from denseflex_onnx.profile import Budget, time_session
from denseflex_onnx.runtime import create_session

FAST = Budget(min_runs=3, max_runs=15, max_seconds=0.02)
FLOAT = TensorProto.FLOAT


def cli(*args):
    return subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def value(name, shape, elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def const(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def build(nodes, inputs, outputs, inits=(), value_info=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "exported", inputs, outputs, list(inits), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)         # not full_check: these graphs carry the exporters' faults
    return model


def save(model, path):
    onnx.save(model, str(path))
    return path


def run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


# ------------------------------------------------------------------------------------------ graphs

def paddle_style(batch_dim=-1, seed=0) -> onnx.ModelProto:
    """x [-1, 3, 8, 8] -> Conv 3x3 -> Relu -> Flatten -> Gemm -> y [-1, 10]; value_info with -1 too."""
    r = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("Flatten", ["a"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], name="fc", transB=1)]
    inits = [init("Wc", r.standard_normal((8, 3, 3, 3)).astype(np.float32)),
             init("Bc", r.standard_normal(8).astype(np.float32)),
             init("Wf", (r.standard_normal((10, 512)) / 20).astype(np.float32)),
             init("Bf", r.standard_normal(10).astype(np.float32))]
    return build(nodes, [value("x", [batch_dim, 3, 8, 8])], [value("y", [batch_dim, 10])], inits,
                 value_info=[value("c", [batch_dim, 8, 8, 8]), value("f", [batch_dim, 512])])


def if_bodies(k=12, n=10, seed=0) -> onnx.ModelProto:
    """An If on the sign of sum(X): its then branch holds a MatMul on an outer weight, its else
    branch a Gemm on weights of its own; each reads Pad(X) with pads computed in the branch,
    which onnx's inference leaves without dims, so the layers' shapes must be measured."""
    r = np.random.default_rng(seed)

    def padded(tag):
        return [const(f"{tag}_p0", np.zeros(2, np.int64)), const(f"{tag}_p1", np.zeros(2, np.int64)),
                helper.make_node("Concat", [f"{tag}_p0", f"{tag}_p1"], [f"{tag}_pads"], axis=0),
                helper.make_node("Pad", ["X", f"{tag}_pads"], [f"{tag}_x"])]

    then_g = helper.make_graph(padded("t") + [helper.make_node("MatMul", ["t_x", "W"], ["t_y"], name="mm")],
                               "then", [], [value("t_y", ["N", n])])
    else_g = helper.make_graph(padded("e") + [helper.make_node("Gemm", ["e_x", "V", "C"], ["e_y"], name="fc")],
                               "else", [], [value("e_y", ["N", n])],
                               [init("V", r.standard_normal((k, n)).astype(np.float32)),
                                init("C", r.standard_normal(n).astype(np.float32))])
    nodes = [helper.make_node("ReduceSum", ["X"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return build(nodes, [value("X", ["N", k])], [value("Y", ["N", n])],
                 [init("W", r.standard_normal((k, n)).astype(np.float32)), init("zero", np.array(0, np.float32))])


def loop_body(k=12, seed=0) -> onnx.ModelProto:
    """A Loop whose body applies a square MatMul to Pad(carried state), three times: its shapes
    are measured at the first iteration."""
    r = np.random.default_rng(seed)
    body = helper.make_graph(
        [const("p0", np.zeros(2, np.int64)), const("p1", np.zeros(2, np.int64)),
         helper.make_node("Concat", ["p0", "p1"], ["pads"], axis=0),
         helper.make_node("Pad", ["h_in", "pads"], ["hp"]),
         helper.make_node("MatMul", ["hp", "W"], ["h_out"], name="mm"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [value("i", [], TensorProto.INT64), value("cond_in", [], TensorProto.BOOL), value("h_in", None)],
        [value("cond_out", [], TensorProto.BOOL), value("h_out", None)])
    nodes = [helper.make_node("Loop", ["trip", "", "X"], ["H"], name="loop", body=body)]
    return build(nodes, [value("X", ["N", k])], [value("H", ["N", k])],
                 [init("W", (r.standard_normal((k, k)) / 4).astype(np.float32)), init("trip", np.array(3, np.int64))])


def scan_body(k=12, seed=0) -> onnx.ModelProto:
    """A Scan over X [T, 2, K] whose body applies a MatMul to Pad(slice): measured on the first slice."""
    r = np.random.default_rng(seed)
    body = helper.make_graph(
        [const("p0", np.zeros(2, np.int64)), const("p1", np.zeros(2, np.int64)),
         helper.make_node("Concat", ["p0", "p1"], ["pads"], axis=0),
         helper.make_node("Pad", ["x_t", "pads"], ["xp"]),
         helper.make_node("MatMul", ["xp", "W"], ["y_t"], name="mm"),
         helper.make_node("Identity", ["s_in"], ["s_out"])],
        "body", [value("s_in", [1]), value("x_t", None)], [value("s_out", [1]), value("y_t", None)])
    nodes = [helper.make_node("Scan", ["s0", "X"], ["s", "Y"], name="scan", body=body, num_scan_inputs=1)]
    return build(nodes, [value("X", ["T", 2, k])], [value("s", [1]), value("Y", ["T", 2, k])],
                 [init("W", r.standard_normal((k, k)).astype(np.float32)), init("s0", np.zeros(1, np.float32))])


def lstm_reader(i=8, h=5, n=7, seed=0) -> onnx.ModelProto:
    """x [T, 1, I] -> bidirectional LSTM -> [T*B, 2H] -> Gemm -> [T, B, N], built as ddddocr's
    reader is (opset 12, reshapes to shapes computed from Shape at run time), with the output
    declared [1, seqlen]: rank 2 where the graph computes rank 3. onnxruntime cannot infer that
    output at load (the target shape is data), so it keeps the declared rank."""
    r = np.random.default_rng(seed)

    def dim(src, k, out):
        return [const(f"{out}_k", np.array(k, np.int64)), helper.make_node("Gather", [src, f"{out}_k"], [out], axis=0)]

    def unsqueeze(a, b):
        return helper.make_node("Unsqueeze", [a], [b], axes=[0])

    nodes = [helper.make_node("LSTM", ["x", "Wl", "Rl", "Bl"], ["Y", "", ""], hidden_size=h,
                              direction="bidirectional"),
             helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]),
             const("keep", np.array([0, 0, -1], np.int64)),
             helper.make_node("Reshape", ["Yt", "keep"], ["Yk"]),              # [T, B, 2H]
             helper.make_node("Shape", ["Yk"], ["ks"]),
             *dim("ks", 0, "t"), *dim("ks", 1, "b"), *dim("ks", 2, "f"),
             helper.make_node("Mul", ["t", "b"], ["tb"]),
             unsqueeze("tb", "tb1"), unsqueeze("f", "f1"), unsqueeze("t", "t1"), unsqueeze("b", "b1"),
             helper.make_node("Concat", ["tb1", "f1"], ["flat"], axis=0),
             helper.make_node("Reshape", ["Yk", "flat"], ["Yf"]),              # [T*B, 2H]
             helper.make_node("Gemm", ["Yf", "Wg", "Bg"], ["logits"], name="classifier", transB=1),
             const("tail", np.array([n], np.int64)),
             helper.make_node("Concat", ["t1", "b1", "tail"], ["seq"], axis=0),
             helper.make_node("Reshape", ["logits", "seq"], ["y"])]            # [T, B, N]
    inits = [init("Wl", (r.standard_normal((2, 4 * h, i)) / 3).astype(np.float32)),
             init("Rl", (r.standard_normal((2, 4 * h, h)) / 3).astype(np.float32)),
             init("Bl", r.standard_normal((2, 8 * h)).astype(np.float32)),
             init("Wg", r.standard_normal((n, 2 * h)).astype(np.float32)),
             init("Bg", r.standard_normal(n).astype(np.float32))]
    return build(nodes, [value("x", ["T", 1, i])], [value("y", [1, "seqlen"])], inits, opset=12)


# ------------------------------------------------------------------------------------------ helpers

def inspect_json(path, *args) -> dict:
    r = cli("inspect", path, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def apply_full_rank(tmp_path, path, spec, feeds, *args):
    """`apply --all SPEC` at full rank: exit 0 and the outputs of the original within 1e-4."""
    out = tmp_path / f"full_{spec.split(':')[0]}.onnx"
    r = cli("apply", path, "--all", spec, "-o", out, *args)
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(onnx.load(str(out)))
    for feed in feeds:
        for got, want in zip(run(out, feed), run(path, feed)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    return out


def short_optimize(tmp_path, path, **options):
    """A short optimize through the API: a result (exit 0 or 2) or a UserError (exit 2), no bug."""
    try:
        result = denseflex_onnx.optimize(path, tmp_path / "opt.onnx", flops="-10%", max_accuracy_drop=100,
                                         no_cache=True, timing=FAST, time_budget="20s", **options)
    except UserError as exc:        # the CLI's exit 2
        return str(exc)
    assert result.status in ("ok", "infeasible")
    written = tmp_path / ("opt.onnx" if result.status == "ok" else "opt.closest.onnx")
    onnx.checker.check_model(onnx.load(str(written)))
    return result


# ------------------------------------------------------------------------------------------ -1 dims

@pytest.mark.parametrize("batch_dim", [-1, 0])
def test_nonpositive_batch_dim_is_symbolic(tmp_path, batch_dim, caplog):
    path = save(paddle_style(batch_dim), tmp_path / "cls.onnx")
    given = inspect_json(path, "--input-shape", "x:4x3x8x8")       # refused before: "fixed at -1"
    assert given["inputs"] == {"x": [4, 3, 8, 8]}
    layers = {l["name"]: l for l in given["layers"]}
    assert set(layers) == {"conv", "fc"}
    assert layers["fc"]["activation_shape"] == [4, 512] and layers["conv"]["activation_shape"] == [4, 3, 8, 8]
    loaded = load(path)                              # no flag: the leading dim defaults to 1, with a warning
    assert loaded.input_shapes == {"x": (1, 3, 8, 8)}
    assert "dim 0" in caplog.text and "using 1" in caplog.text
    assert loaded.shapes["f"] == (1, 512) and loaded.shapes["y"] == (1, 10)


def test_nonpositive_inner_dim_needs_the_flag(tmp_path):
    model = paddle_style()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -1
    path = save(model, tmp_path / "cls.onnx")
    r = cli("inspect", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "dim 2 (-1)" in r.stderr and "--input-shape x:" in r.stderr
    assert inspect_json(path, "--input-shape", "x:1x3x8x8")["inputs"] == {"x": [1, 3, 8, 8]}


def test_minus_one_batch_end_to_end(tmp_path):
    path = save(paddle_style(), tmp_path / "cls.onnx")
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    for spec in ("svd:1.0", "conv_svd:1.0"):
        out = apply_full_rank(tmp_path, path, spec, [{"x": x}], "--input-shape", "x:2x3x8x8")
        dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_value == -1                 # the interface is kept as the file wrote it
    short_optimize(tmp_path, path, input_shapes={"x": (2, 3, 8, 8)})


def test_minus_one_batch_with_data(tmp_path):
    """--data on a -1 batch: chunks of 64 (a symbolic batch), not of -1."""
    path = save(paddle_style(), tmp_path / "cls.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(2).standard_normal((24, 3, 8, 8)).astype(np.float32))
    short_optimize(tmp_path, path, data=tmp_path / "d.npz", calib_samples=8)


# ------------------------------------------------------------------------------------------ If bodies

def test_if_body_shapes_unknown_to_inference():
    """The fixture has the fault: onnx's inference leaves the branch activations without dims."""
    inferred = infer_shapes(if_bodies(), {"X": (2, 12)})
    assert "X" in inferred and "t_x" not in inferred and "e_x" not in inferred


def test_layers_inside_if_branches_end_to_end(tmp_path):
    path = save(if_bodies(), tmp_path / "vad.onnx")
    info = inspect_json(path, "--input-shape", "X:2x12")
    layers = {l["name"]: l for l in info["layers"]}
    assert set(layers) == {"branch/then_branch/mm", "branch/else_branch/fc"}, info["skipped"]
    assert all(l["activation_shape"] == [2, 12] for l in layers.values())
    x = np.random.default_rng(3).standard_normal((5, 12)).astype(np.float32)
    feeds = [{"X": np.abs(x)}, {"X": -np.abs(x)}]         # both branches
    out = apply_full_rank(tmp_path, path, "svd:1.0", feeds)
    rewritten = onnx.load(str(out))
    assert [n.op_type for n in rewritten.graph.node] == ["ReduceSum", "Greater", "If"]   # in place
    branches = [a.g for a in rewritten.graph.node[2].attribute]
    assert all(any("svd" in n.name for n in g.node) for g in branches)
    assert "V" not in {i.name for g in branches for i in g.initializer}                  # old weight gone
    short_optimize(tmp_path, path, input_shapes={"X": (2, 12)})


def test_layer_inside_loop_body_measured_at_its_first_iteration(tmp_path):
    path = save(loop_body(), tmp_path / "loop.onnx")
    info = inspect_json(path, "--input-shape", "X:3x12")
    assert [(l["name"], l["activation_shape"]) for l in info["layers"]] == [("loop/body/mm", [3, 12])]
    x = np.random.default_rng(4).standard_normal((5, 12)).astype(np.float32)
    apply_full_rank(tmp_path, path, "svd:1.0", [{"X": x}])


def test_layer_inside_scan_body_measured_on_its_first_slice(tmp_path):
    path = save(scan_body(), tmp_path / "scan.onnx")
    info = inspect_json(path, "--input-shape", "X:4x2x12")
    assert [(l["name"], l["activation_shape"]) for l in info["layers"]] == [("scan/body/mm", [2, 12])]
    x = np.random.default_rng(6).standard_normal((3, 2, 12)).astype(np.float32)
    apply_full_rank(tmp_path, path, "svd:1.0", [{"X": x}], "--input-shape", "X:4x2x12")


# ------------------------------------------------------------------------------------------ stale rank

def test_lstm_fixture_has_the_stale_output_rank():
    """The file declares rank 2, the graph computes rank 3: a plain run only warns, a reused
    IOBinding (how the tool times) fails, as ddddocr's reader did in the tool."""
    model = lstm_reader()
    assert len(model.graph.output[0].type.tensor_type.shape.dim) == 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((6, 1, 8), np.float32)
    assert session.run(None, {"x": x})[0].shape == (6, 1, 7)
    binding = session.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y", "cpu")
    session.run_with_iobinding(binding)
    try:
        session.run_with_iobinding(binding)
    except Exception as exc:
        assert "Invalid rank for output" in str(exc)
    else:
        pytest.skip("this onnxruntime no longer checks bound outputs against the declared rank")


def test_time_session_runs_a_model_with_a_stale_output_rank():
    session = create_session(lstm_reader())
    timing = time_session(session, {"x": np.ones((6, 1, 8), np.float32)}, "CPUExecutionProvider", FAST)
    assert timing.runs >= FAST.min_runs and timing.median > 0


def test_lstm_reader_end_to_end(tmp_path):
    path = save(lstm_reader(), tmp_path / "ocr.onnx")
    info = inspect_json(path, "--input-shape", "x:6x1x8")        # [T*B, 2H]: measured, not inferred
    assert [(l["name"], l["activation_shape"]) for l in info["layers"]] == [("classifier", [6, 10])]
    x = np.random.default_rng(5).standard_normal((9, 1, 8)).astype(np.float32)
    apply_full_rank(tmp_path, path, "svd:1.0", [{"x": x}])
    short_optimize(tmp_path, path, input_shapes={"x": (6, 1, 8)})
    r = cli("optimize", path, "--flops", "-10%", "--no-cache", "--time-budget", "2s", "-o", tmp_path / "cli.onnx")
    assert r.returncode in (0, 2), r.stderr
    assert "Traceback" not in r.stderr and "Invalid rank" not in r.stderr
