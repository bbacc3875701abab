"""INT8 as a modifier of any choice (`svd:64+int8`, `dense+int8`): rewrite.quantize.

Checked against onnxruntime.quantization.quantize_dynamic called by hand on the same float
model (the same library, asked directly for those nodes), against numpy for what INT8 may cost
(the outputs stay within a quantization step of the float ones), and through the CLI for the
files written and the exit codes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

import denseflex_onnx
from denseflex_onnx.errors import UserError
from denseflex_onnx.loading import load
from denseflex_onnx.layers import find_layers
from denseflex_onnx.plan import DENSE, Choice, Plan, parse_spec, read_plan, write_json
from denseflex_onnx.rewrite import one_layer_model, rewrite_model

import graphs
import graphs_extra

ROOT = Path(__file__).resolve().parents[1]
MLP, MLP_DATA = ROOT / "models" / "mnist_mlp.onnx", ROOT / "models" / "mnist_mlp_val.npz"
INTEGER_OPS = {"MatMulInteger", "ConvInteger"}


def run(model, feeds: dict) -> np.ndarray:
    data = model if isinstance(model, (str, Path)) else model.SerializeToString()
    session = ort.InferenceSession(str(data) if isinstance(data, Path) else data,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def by_hand(model: onnx.ModelProto, nodes: list[str] | None, tmp_path: Path, per_channel=True) -> onnx.ModelProto:
    """quantize_dynamic as a user calls it: of these nodes, per channel as the tool quantizes
    layers; of every node (None), per tensor, its default, for the whole-model baseline."""
    src, dst = tmp_path / "hand.float.onnx", tmp_path / "hand.int8.onnx"
    onnx.save(model, src)
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                     per_channel=per_channel and nodes is not None)
    return onnx.load(dst)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def layers_of(model, shapes=None):
    """The layers discovery finds in a model file, or in a model built here (saved first)."""
    if isinstance(model, onnx.ModelProto):
        with tempfile.TemporaryDirectory() as tmp:
            return layers_of(graphs.save(model, Path(tmp) / "m.onnx"), shapes)
    loaded = load(model, shapes)
    return {l.name: l for l in find_layers(loaded).layers}


def test_spec_suffix_parses_prints_and_refuses_what_it_cannot_quantize():
    layers = layers_of(graphs.matmul(k=16, n=12))
    layer = next(iter(layers.values()))
    assert parse_spec(layer, "svd:4+int8") == Choice("svd", {"rank": 4}, int8=True)
    assert parse_spec(layer, "svd:4+int8").spec == "svd:4+int8"
    assert parse_spec(layer, "dense+int8").spec == "dense+int8"
    assert parse_spec(layer, "dense+int8").changes and not DENSE.changes
    for bad in ("+int8", "svd:4+int8+int8"):
        with pytest.raises(UserError, match="follows one method spec"):
            parse_spec(layer, bad)
    half = next(iter(layers_of(graphs.matmul(k=16, n=12, dtype=np.float16)).values()))
    with pytest.raises(UserError, match="float32 weights, not float16"):
        parse_spec(half, "dense+int8")


def test_dense_int8_quantizes_that_layer_alone_as_onnxruntime_does(tmp_path):
    """The MLP with /2/Gemm in INT8: bitwise what quantize_dynamic gives for that node (which it
    renames <gemm>_MatMul after turning Gemm into MatMul + Add), the other layers float."""
    proto = onnx.load(MLP)
    layers = layers_of(MLP)
    ours = rewrite_model(proto, layers, Plan({"/2/Gemm": parse_spec(layers["/2/Gemm"], "dense+int8")}))
    hand = by_hand(proto, ["/2/Gemm_MatMul"], tmp_path)
    assert ops(ours).count("MatMulInteger") == 1 and ops(hand).count("MatMulInteger") == 1
    integer = next(n for n in ours.graph.node if n.op_type == "MatMulInteger")
    assert integer.name.startswith("/2/Gemm")
    x = np.load(MLP_DATA)["x"][:200]
    np.testing.assert_array_equal(run(ours, {"x": x}), run(hand, {"x": x}))
    onnx.checker.check_model(ours, full_check=True)
    assert [i.name for i in ours.graph.input] == ["x"] and [o.name for o in ours.graph.output] == ["logits"]
    assert ours.graph.input[0].type == proto.graph.input[0].type       # the symbolic batch is kept


def test_factorized_int8_is_the_float_chain_with_int8_weights(tmp_path):
    """svd:6+int8 on x @ W + b: both MatMuls of the chain in INT8, the output that of the float
    chain within what 8-bit weights and activations lose, and equal to quantize_dynamic of the
    float chain's two MatMuls."""
    proto = graphs.matmul(k=32, n=24, bias=True, seed=3)
    layers = layers_of(proto)
    name = next(iter(layers))
    fp32 = rewrite_model(proto, layers, Plan({name: parse_spec(layers[name], "svd:6")}))
    int8 = rewrite_model(proto, layers, Plan({name: parse_spec(layers[name], "svd:6+int8")}))
    assert ops(int8).count("MatMulInteger") == 2 and "MatMul" not in ops(int8)
    chain = [n.name for n in fp32.graph.node if n.op_type == "MatMul"]
    assert len(chain) == 2 and all(n.startswith(f"{name}/svd/") for n in chain)
    x = graphs.rng(1).standard_normal((64, 32)).astype(np.float32)
    y_float, y_int8 = run(fp32, {"X": x}), run(int8, {"X": x})
    np.testing.assert_array_equal(y_int8, run(by_hand(fp32, chain, tmp_path), {"X": x}))
    relative = np.linalg.norm(y_int8 - y_float) / np.linalg.norm(y_float)
    assert 0 < relative < 0.05


def test_one_layer_timing_model_computes_what_the_layer_computes_in_the_full_model():
    """What is timed for a `+int8` candidate is the quantized layer itself: on the same input,
    the one-layer model and the layer inside the rewritten model give the same output."""
    proto = graphs_extra.mlp(sizes=(20, 32, 24, 5))
    layers = layers_of(proto)
    name = sorted(layers)[1]
    layer = layers[name]
    choice = parse_spec(layer, "dense+int8")
    alone = one_layer_model(layer, choice, None)
    assert "MatMulInteger" in ops(alone)
    full = rewrite_model(proto, layers, Plan({name: choice}))
    # read the layer's input and output inside the full model
    for t in (layer.input, layer.output):
        full.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(5):       # at the profiling shape, batch 1: activations are quantized per tensor
        x = graphs.rng(seed).standard_normal((1, 20)).astype(np.float32)
        inside_in, inside_out = session.run([layer.input, layer.output], {"X": x})
        np.testing.assert_array_equal(run(alone, {"x": inside_in}), inside_out)


def test_plan_json_records_int8_and_reads_it_back(tmp_path):
    proto = onnx.load(MLP)
    layers = layers_of(MLP)
    plan = Plan({"/0/Gemm": parse_spec(layers["/0/Gemm"], "svd:32+int8"),
                 "/2/Gemm": parse_spec(layers["/2/Gemm"], "dense+int8"),
                 "/4/Gemm": parse_spec(layers["/4/Gemm"], "svd:16")})
    data = plan.to_json()
    assert data["int8"] == "dynamic"
    assert data["layers"]["/2/Gemm"] == {"method": "dense", "config": {}, "int8": True}
    assert data["layers"]["/0/Gemm"]["int8"] is True and "int8" not in data["layers"]["/4/Gemm"]
    write_json(data, tmp_path / "p.json")
    back = read_plan(tmp_path / "p.json", layers)
    assert back.layers == plan.layers and back.sha256() == plan.sha256()
    float_only = Plan({"/4/Gemm": plan.layers["/4/Gemm"]}).to_json()
    assert "int8" not in float_only and "int8" not in json.dumps(float_only["layers"])


@pytest.mark.parametrize("text, message", [
    ('{"format": "denseflex-plan/1", "int8": "fp8", "layers": {}}', "int8 'fp8' is not one of dynamic, static"),
    ('{"format": "denseflex-plan/1", "layers": {"/2/Gemm": {"method": "dense", "config": {}, "int8": 1}}}',
     '"int8" must be true or false'),
])
def test_malformed_int8_plans(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_plan(path, layers_of(MLP))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_apply_cli_all_dense_int8_and_the_plan_reapplied_byte_for_byte(tmp_path):
    first = tmp_path / "a.onnx"
    r = cli("apply", MLP, "--all", "dense+int8", "--layer", "/6/Gemm=dense", "-o", first, "--input-shape", "x:1x784")
    assert r.returncode == 0, r.stderr
    model = onnx.load(first)
    assert ops(model).count("MatMulInteger") == 3          # the three hidden layers; the head kept float
    x = np.load(MLP_DATA)
    accuracy = lambda p: 100 * np.mean(run(p, {"x": x["x"]}).argmax(1) == x["labels"])
    assert abs(accuracy(first) - accuracy(MLP)) <= 1.0
    plan = Plan({n: Choice("dense", {}, int8=True) for n in ("/0/Gemm", "/2/Gemm", "/4/Gemm")})
    write_json(plan.to_json(), tmp_path / "plan.json")
    again = tmp_path / "b.onnx"
    r = cli("apply", MLP, "--plan", tmp_path / "plan.json", "-o", again, "--input-shape", "x:1x784")
    assert r.returncode == 0, r.stderr
    assert first.read_bytes() == again.read_bytes()


def test_apply_cli_refuses_dense_alone_and_an_already_quantized_model(tmp_path):
    r = cli("apply", MLP, "--all", "dense", "-o", tmp_path / "x.onnx")
    assert r.returncode == 2 and "dense+int8 quantizes every layer" in r.stderr
    quantized = graphs.save(graphs_extra.matmul_integer(), tmp_path / "q.onnx")
    r = cli("apply", quantized, "--all", "dense+int8", "-o", tmp_path / "y.onnx")
    assert r.returncode == 2 and "nothing to factorize (quantized op)" in r.stderr
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()


def test_api_apply_takes_int8_specs(tmp_path):
    summary = denseflex_onnx.apply(MLP, tmp_path / "o.onnx", layer_specs=["/0/Gemm=svd:32+int8"],
                                   input_shapes={"x": (1, 784)})
    assert [r["spec"] for r in summary["rewritten"]] == ["svd:32+int8"]
    assert summary["model_bytes"][1] < summary["model_bytes"][0]


def test_optimize_reports_whole_model_int8_measured_in_the_same_run(tmp_path):
    """Every optimize report carries the baseline a user would run instead: onnxruntime's
    quantize_dynamic of the whole model, its metric as that model really scores."""
    out = tmp_path / "m.onnx"
    r = cli("optimize", MLP, "--data", MLP_DATA, "--flops", "-50%", "--input-shape", "x:1x784", "-o", out,
            "--cache-dir", tmp_path / "cache", "--no-sensitivity")
    assert r.returncode in (0, 2), r.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    q = report["int8_baseline"]
    hand = by_hand(onnx.load(MLP), None, tmp_path)
    held_out = {k: v[128:] for k, v in np.load(MLP_DATA).items()}      # the default 128 calibrate
    # in chunks of 64, as CLI.md runs a symbolic batch: INT8 activations are scaled per chunk
    logits = np.concatenate([run(hand, {"x": held_out["x"][i:i + 64]}) for i in range(0, len(held_out["x"]), 64)])
    accuracy = 100 * np.mean(logits.argmax(1) == held_out["labels"])
    assert q["metric"] == pytest.approx(accuracy, abs=1e-9)
    assert q["metric_drop"] == pytest.approx(report["baseline"]["metric"] - accuracy, abs=1e-9)
    assert q["bytes"] < report["baseline"]["bytes"] / 3           # int8 weights, float biases
    assert q["speedup"] > 0 and q["latency_s"] == pytest.approx(report["baseline"]["latency_s"] / q["speedup"], rel=1e-6)
    assert "| INT8 (whole model, dynamic) |" in out.with_suffix(".report.md").read_text()
    assert "INT8 (whole" in r.stdout
    # the estimated frontier the Pareto plot draws: more error budget, never slower, never more accurate
    line = report["frontier"]
    assert len(line) >= 3
    assert all(a["latency_s"] >= b["latency_s"] - 1e-12 and a["metric"] >= b["metric"] - 1e-9
               for a, b in zip(line, line[1:]))
    assert all(p["estimated_error"] <= p["error_budget"] * (1 + 1e-6) for p in line)


# ------------------------------------------------------------------ the INT8 axis of the space

def simulated_int8(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w as dynamic QInt8 computes it, in numpy: the input scaled by its own range to uint8
    (zero point for 0), each weight column symmetrically to int8 [-127, 127], an integer product."""
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = (hi - lo) / 255
    zero = np.clip(np.round(-lo / scale), 0, 255)
    xq = np.clip(np.round(x / scale) + zero, 0, 255)
    w_scale = np.abs(w).max(axis=0, keepdims=True) / 127
    return scale * w_scale * ((xq - zero) @ np.clip(np.round(w / w_scale), -127, 127))


@pytest.mark.parametrize("mode", ["plain", "whitened"])
def test_layer_quantization_error_matches_numpy(tmp_path, mode):
    from denseflex_onnx import int8 as int8_mod
    from denseflex_onnx.data import Dataset
    path = graphs.save(graphs.matmul(k=32, n=24, bias=True, seed=3), tmp_path / "m.onnx")
    loaded = load(path, {"X": (1, 32)})
    layer = find_layers(loaded).layers[0]
    x = (graphs.rng(0).standard_normal((40, 32)) + 0.5).astype(np.float32)
    errors = int8_mod.layer_errors(loaded, [layer], Dataset({"X": x}, {}, None), mode)
    w, b = layer.weight.astype(np.float64), layer.bias.astype(np.float64)
    rows = x.astype(np.float64)
    y = rows @ w + b
    yq = np.concatenate([simulated_int8(rows[i:i + 1], w) + b for i in range(len(rows))])   # batch 1, as profiled
    reference = y - y.mean(axis=0) if mode == "whitened" else y
    assert errors[layer.name] == pytest.approx(np.linalg.norm(yq - y) / np.linalg.norm(reference), rel=1e-4)


def explored(tmp_path, name, **options):
    report = denseflex_onnx.explore(MLP, tmp_path / name, data=MLP_DATA, flops="-50%", input_shapes={"x": (1, 784)},
                                    cache_dir=tmp_path / "cache", sensitivity=False, **options).report
    return {(r["layer"], r["spec"]): r for r in report["candidates"]}, report


def test_no_int8_is_the_float_space_and_int8_adds_a_twin_of_each_survivor(tmp_path):
    off, off_report = explored(tmp_path, "off", int8="off")
    on, on_report = explored(tmp_path, "on")
    assert not any("+int8" in spec for _, spec in off)
    floats = {k: r for k, r in on.items() if not k[1].endswith("+int8")}
    assert set(floats) == set(off)
    assert all(floats[k]["error"] == off[k]["error"] and floats[k]["params"] == off[k]["params"] for k in off)
    twins = {k: r for k, r in on.items() if k[1].endswith("+int8")}
    # what pruning before timing kept, of the layers that pay off (not the head, nor the pair into
    # it), TT aside (its chains multiply their cores from the left, which onnxruntime's dynamic
    # quantization leaves in float)
    survivors = [k for k, r in off.items() if r["dropped"] in (None, "dominated after timing")
                 and "/6/Gemm" not in (k[0], *r["covers"]) and r["method"] != "tt"]
    assert len(survivors) > 10 and all((layer, spec + "+int8") in twins for layer, spec in survivors)
    assert not any(r["method"] == "tt" for r in twins.values())
    # the head holds 0.2% of the model: kept dense before anything, and kept float
    assert ("/6/Gemm", "dense+int8") not in twins
    for (layer, spec), twin in twins.items():
        base = floats[(layer, spec[:-len("+int8")])]
        # a pair quantizes both its layers: their errors add as energies
        q = np.hypot.reduce([twins[(part, "dense+int8")]["error"] for part in (layer, *twin["covers"])])
        assert twin["params"] == base["params"] and twin["flops"] == base["flops"]
        assert twin["error"] == pytest.approx(np.hypot(base["error"], q), rel=1e-5, abs=1e-6)
    grid = lambda r: r["stages"]["grid"]
    assert grid(on_report) == grid(off_report) + len(twins)


def test_forced_and_excluded_layers_keep_what_the_user_said(tmp_path):
    on, _ = explored(tmp_path, "forced", layer_specs=["/0/Gemm=svd:32"], exclude=["/2/Gemm"])
    assert not any(layer in ("/0/Gemm", "/2/Gemm") and spec.endswith("+int8") for layer, spec in on)
    forced, _ = explored(tmp_path, "forced8", layer_specs=["/0/Gemm=svd:32+int8"])
    alive = [spec for (layer, spec), r in forced.items() if layer == "/0/Gemm" and r["dropped"] is None]
    assert alive == ["svd:32+int8"]


def test_optimize_plan_with_int8_reapplies_byte_for_byte(tmp_path):
    out = tmp_path / "m.onnx"
    result = denseflex_onnx.optimize(MLP, out, data=MLP_DATA, latency="-50%", input_shapes={"x": (1, 784)},
                                     cache_dir=tmp_path / "cache", layer_specs=["/4/Gemm=dense+int8"],
                                     sensitivity=False)
    written = out if result.feasible else tmp_path / "m.closest.onnx"
    plan = written.with_name(written.name.replace(".onnx", ".plan.json"))
    assert json.loads(plan.read_text())["layers"]["/4/Gemm"] == {"method": "dense", "config": {}, "int8": True}
    again = tmp_path / "again.onnx"
    denseflex_onnx.apply(MLP, again, plan_path=plan, data=MLP_DATA, input_shapes={"x": (1, 784)})
    assert again.read_bytes() == written.read_bytes()
    assert "MatMulInteger" in ops(onnx.load(again))


def test_an_already_quantized_model_is_reported_not_quantized_again(tmp_path):
    quantized = tmp_path / "int8.onnx"
    onnx.save(by_hand(onnx.load(MLP), None, tmp_path), quantized)
    r = cli("optimize", quantized, "--latency", "-30%", "-o", tmp_path / "o.onnx", "--input-shape", "x:1x784")
    assert r.returncode == 2 and "nothing to factorize (quantized op)" in r.stderr
    assert not list(tmp_path.glob("o.*"))


def test_int8_option_errors(tmp_path):
    r = cli("optimize", MLP, "--latency", "-30%", "--int8", "fp8", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "--int8 fp8: use one of off, dynamic, static" in r.stderr
    r = cli("optimize", MLP, "--latency", "-30%", "--int8", "dynamic", "--no-int8", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "contradict" in r.stderr


def test_a_weight_onnxruntime_does_not_quantize_gets_no_twin_and_a_clear_error(tmp_path):
    """A weight fed by a Constant node (as Paddle exports write them): the tool finds the layer,
    but quantize_dynamic reads stored initializers only. It gets no INT8 variant, and asking for
    one says which layer and what to do."""
    from denseflex_onnx import int8 as int8_mod
    from denseflex_onnx.data import Dataset
    from denseflex_onnx.rewrite import int8_left_float
    path = graphs.save(graphs.matmul(k=32, n=24, weight_via="Constant"), tmp_path / "c.onnx")
    loaded = load(path, {"X": (1, 32)})
    layers = {l.name: l for l in find_layers(loaded).layers}
    assert list(layers) and int8_left_float(loaded.proto, layers) == list(layers)
    x = graphs.rng(0).standard_normal((8, 32)).astype(np.float32)
    assert int8_mod.layer_errors(loaded, list(layers.values()), Dataset({"X": x}, {}, None), "plain") == {}
    # the same weight as an initializer is quantized
    plain = graphs.save(graphs.matmul(k=32, n=24), tmp_path / "i.onnx")
    loaded_plain = load(plain, {"X": (1, 32)})
    assert int8_left_float(loaded_plain.proto, {l.name: l for l in find_layers(loaded_plain).layers}) == []
    r = cli("apply", path, "--all", "dense+int8", "-o", tmp_path / "o.onnx", "--input-shape", "X:1x32")
    assert r.returncode == 2 and "leaves mm in float" in r.stderr and "without +int8" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------ static (QDQ) INT8

def test_static_int8_is_quantize_static_qdq_calibrated_on_the_data(tmp_path):
    """--int8 static: the chosen layer in QDQ form (what TensorRT reads), its activation range
    calibrated on the calibration samples: bitwise what quantize_static gives for that node with
    those feeds, per channel; close to the float layer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    proto = graphs.matmul(k=32, n=24, bias=True, seed=3)
    layers = layers_of(proto)
    name = next(iter(layers))
    calib = [{"X": graphs.rng(i).standard_normal((16, 32)).astype(np.float32)} for i in range(10)]
    ours = rewrite_model(proto, layers, Plan({name: parse_spec(layers[name], "dense+int8")}, int8="static"),
                         samples=calib)
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(ops(ours)) and "MatMulInteger" not in ops(ours)
    weight_scale = next(i for i in ours.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1)
    assert list(weight_scale.dims) == [24]                               # one scale per output channel

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(calib)

        def get_next(self):
            return next(self.left, None)
    onnx.save(proto, tmp_path / "f.onnx")
    quantize_static(tmp_path / "f.onnx", tmp_path / "q.onnx", Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"], nodes_to_quantize=["mm"], per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    x = graphs.rng(9).standard_normal((16, 32)).astype(np.float32)
    y = run(ours, {"X": x})
    np.testing.assert_array_equal(y, run(tmp_path / "q.onnx", {"X": x}))
    y_float = run(proto, {"X": x})
    assert 0 < np.linalg.norm(y - y_float) / np.linalg.norm(y_float) < 0.05
    onnx.checker.check_model(ours, full_check=True)


def test_static_plans_need_data_and_record_their_mode(tmp_path):
    r = cli("apply", MLP, "--all", "dense+int8", "--int8", "static", "-o", tmp_path / "a.onnx")
    assert r.returncode == 2 and "give --data" in r.stderr
    r = cli("optimize", MLP, "--latency", "-30%", "--int8", "static", "-o", tmp_path / "o.onnx")
    assert r.returncode == 2 and "give --data" in r.stderr
    r = cli("apply", MLP, "--layer", "/2/Gemm=dense+int8", "--int8", "static", "--data", MLP_DATA,
            "-o", tmp_path / "s.onnx", "--input-shape", "x:1x784")
    assert r.returncode == 0, r.stderr
    assert "DequantizeLinear" in ops(onnx.load(tmp_path / "s.onnx"))
    plan = Plan({"/2/Gemm": Choice("dense", {}, int8=True)}, int8="static")
    write_json(plan.to_json(), tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["int8"] == "static"
    r = cli("apply", MLP, "--plan", tmp_path / "p.json", "-o", tmp_path / "p.onnx", "--input-shape", "x:1x784")
    assert r.returncode == 2 and "static INT8" in r.stderr and "give --data" in r.stderr
    r = cli("apply", MLP, "--plan", tmp_path / "p.json", "--data", MLP_DATA, "-o", tmp_path / "p.onnx",
            "--input-shape", "x:1x784")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.onnx").read_bytes() == (tmp_path / "s.onnx").read_bytes()
    r = cli("apply", MLP, "--plan", tmp_path / "p.json", "--data", MLP_DATA, "--int8", "dynamic",
            "-o", tmp_path / "q.onnx", "--input-shape", "x:1x784")
    assert r.returncode == 2 and "drop the flag" in r.stderr


def test_static_space_times_qdq_twins(tmp_path):
    """explore --int8 static: the twins are there, timed as QDQ one-layer models (cached apart
    from dynamic ones), their errors measured with static ranges."""
    static, _ = explored(tmp_path, "static", int8="static")
    dynamic, _ = explored(tmp_path, "dynamic")
    for table in (static, dynamic):
        assert table[("/0/Gemm", "dense+int8")]["latency_ms"] is not None
    assert static[("/0/Gemm", "dense+int8")]["error"] != dynamic[("/0/Gemm", "dense+int8")]["error"]


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_int8_twins_are_timed_on_a_gpu_provider_through_the_same_path(tmp_path, provider):
    """The INT8 twins go through the provider timing every candidate goes through (QDQ is what
    TensorRT consumes: --int8 static)."""
    if provider not in ort.get_available_providers():
        pytest.skip(f"{provider} is not installed here (onnxruntime CPU build)")
    mode = "static" if provider == "TensorrtExecutionProvider" else "dynamic"
    report = denseflex_onnx.explore(MLP, tmp_path / "gpu", data=MLP_DATA, flops="-50%", input_shapes={"x": (1, 784)},
                                    provider=provider, int8=mode, cache_dir=tmp_path / "cache").report
    assert report["provider"] == provider
    assert any(r["spec"].endswith("+int8") and r["latency_ms"] for r in report["candidates"])
