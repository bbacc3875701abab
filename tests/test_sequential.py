"""Sequential calibration (sequential.py): stages, the anchored layer, exactness at full size,
and that it fits the inputs the layer really receives."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from graphs import init, mlp, model, rng, save, value
from graphs_extra import run

from denseflex_onnx import api, calibrate, sequential
from denseflex_onnx.layers import Layer
from denseflex_onnx.space import as_matrix


def units_of(path, shapes, names=None):
    prep = api._prepare(path, shapes)
    return prep, {n: (l.input, l.output) for n, l in prep.layers.items() if names is None or n in names}


def test_depths_count_rewritten_layers_upstream_and_stages_merge_them(tmp_path):
    path = save(mlp((20, 32, 24, 16, 5)), tmp_path / "m.onnx")
    prep, units = units_of(path, {"X": (1, 20)})
    assert sequential.depths(prep.loaded.proto.graph, units) == {"fc0": 0, "fc1": 1, "fc2": 2, "fc3": 3}
    assert sequential.stages({"fc0": 0, "fc1": 1, "fc2": 2, "fc3": 3}, max_stages=2) == [["fc0", "fc1"], ["fc2", "fc3"]]
    # a pruned pair is one unit, from its producer's input to its consumer's output; fc1 is not rewritten
    pair_units = {"fc0": (units["fc0"][0], units["fc1"][1]), "fc2": units["fc2"]}
    assert sequential.depths(prep.loaded.proto.graph, pair_units) == {"fc0": 0, "fc2": 1}
    # layers reading the same input (attention's Q, K, V) share a depth
    x = rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "Wq"], ["q"], name="q"), helper.make_node("MatMul", ["X", "Wk"], ["k"], name="k"),
             helper.make_node("Add", ["q", "k"], ["s"]), helper.make_node("MatMul", ["s", "Wo"], ["Y"], name="o")]
    m = model(nodes, [value("X", ["N", 8])], [value("Y", ["N", 8])], [init("Wq", x), init("Wk", x.T.copy()), init("Wo", x)])
    prep, units = units_of(save(m, tmp_path / "qk.onnx"), {"X": (1, 8)})
    assert sequential.depths(prep.loaded.proto.graph, units) == {"q": 0, "k": 0, "o": 1}


def test_the_anchored_layer_is_the_least_squares_map_onto_the_new_inputs():
    r = rng(1)
    x = r.standard_normal((4000, 6)) * np.linspace(1, 2, 6) + 0.5
    xt = x @ (np.eye(6) + 0.1 * r.standard_normal((6, 6))) + 0.1 * r.standard_normal((4000, 6)) - 0.2
    w, b = r.standard_normal((6, 3)).astype(np.float32), r.standard_normal(3).astype(np.float32)
    layer = Layer("fc", "MatMul", "x", "y", ("y",), w, b, (1, 6), (1, 3))
    a = calibrate.Anchored(xt.T @ xt, xt.T @ x, xt.sum(0), x.sum(0), np.abs(xt).sum(0), len(x))
    got = sequential.anchored(layer, as_matrix, a, ridge=0.0)
    design = np.hstack([xt, np.ones((len(x), 1))])
    coef = np.linalg.lstsq(design, x @ w.astype(np.float64) + b, rcond=None)[0]
    # the ridge as if d rows with X~ = X were added: 6 of 4006 here, a small pull toward W
    np.testing.assert_allclose(got.weight, coef[:-1], rtol=0.02, atol=0.02)
    np.testing.assert_allclose(got.bias, coef[-1], rtol=0.02, atol=0.02)
    # the same inputs give the layer back
    same = calibrate.Anchored(x.T @ x, x.T @ x, x.sum(0), x.sum(0), np.abs(x).sum(0), len(x))
    again = sequential.anchored(layer, as_matrix, same)
    np.testing.assert_allclose(again.weight, w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(again.bias, b, rtol=1e-4, atol=1e-5)


@pytest.fixture
def mlp_files(tmp_path):
    m = mlp((20, 32, 24, 5))
    path = save(m, tmp_path / "mlp.onnx")
    np.savez(tmp_path / "d.npz", X=rng(3).standard_normal((600, 20)).astype(np.float32))
    return m, path, tmp_path / "d.npz"


def test_sequential_at_full_size_is_the_original(mlp_files, tmp_path):
    m, path, data = mlp_files
    api.apply(path, tmp_path / "o.onnx", all_spec="svd:1.0", data=data, calibration="sequential", calib_samples=400,
              input_shapes={"X": (1, 20)})
    x = rng(5).standard_normal((7, 20)).astype(np.float32)
    np.testing.assert_allclose(run(onnx.load(str(tmp_path / "o.onnx")), {"X": x})[0], run(m, {"X": x})[0],
                               rtol=1e-3, atol=1e-4)


def linear_chain(seed=0) -> onnx.ModelProto:
    """Two MatMul+Add layers with nothing between: the last layer's error is the model's."""
    r = rng(seed)
    w0 = (r.standard_normal((16, 16)) * np.linspace(1, 0.05, 16)).astype(np.float32)
    w1 = (r.standard_normal((16, 8)) / 4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["X", "W0"], ["u"], name="fc0"), helper.make_node("Add", ["u", "b0"], ["h"]),
             helper.make_node("MatMul", ["h", "W1"], ["v"], name="fc1"), helper.make_node("Add", ["v", "b1"], ["Y"])]
    return model(nodes, [value("X", ["N", 16])], [value("Y", ["N", 8])],
                 [init("W0", w0), init("b0", r.standard_normal(16).astype(np.float32)),
                  init("W1", w1), init("b1", r.standard_normal(8).astype(np.float32))])


def test_sequential_fits_what_the_layer_really_receives(tmp_path, monkeypatch):
    """In a linear chain the second layer's sequential fit minimizes the model's own output error
    on the calibration rows, so it is no worse there than the independent fit (ridge off);
    plan.json records the calibration and re-applying it gives the same model."""
    monkeypatch.setattr(sequential, "RIDGE", 0.0)
    m = linear_chain()
    path = save(m, tmp_path / "chain.onnx")
    r = rng(4)
    x = (r.standard_normal((3000, 16)) @ r.standard_normal((16, 16))).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x)
    reference = run(m, {"X": x[:2000]})[0].astype(np.float64)
    errors = {}
    for calibration in ("independent", "sequential"):
        out = tmp_path / f"{calibration}.onnx"
        summary = api.apply(path, out, all_spec="svd:4", data=tmp_path / "d.npz", calibration=calibration,
                            calib_samples=2000, input_shapes={"X": (1, 16)})
        assert summary["calibration"] == calibration
        y = run(onnx.load(str(out)), {"X": x[:2000]})[0]
        errors[calibration] = np.linalg.norm(y - reference) / np.linalg.norm(reference - reference.mean(0))
    assert errors["sequential"] < errors["independent"] * 0.98, errors
    # plan.json round trip: a sequential plan, re-applied
    plan = {"format": "denseflex-plan/1", "model_sha256": "", "factorization": "whitened", "calibration": "sequential",
            "layers": {"fc0": {"method": "svd", "config": {"rank": 4}}, "fc1": {"method": "svd", "config": {"rank": 4}}}}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    api.apply(path, tmp_path / "again.onnx", plan_path=tmp_path / "p.json", data=tmp_path / "d.npz", calib_samples=2000,
              input_shapes={"X": (1, 16)})
    feed = {"X": x[2000:2010]}
    np.testing.assert_array_equal(run(onnx.load(str(tmp_path / "again.onnx")), feed)[0],
                                  run(onnx.load(str(tmp_path / "sequential.onnx")), feed)[0])


def test_bad_calibration_requests_are_one_line_errors(mlp_files, tmp_path):
    from denseflex_onnx.errors import UserError
    _, path, data = mlp_files
    with pytest.raises(UserError, match="--calibration 'sometimes': use one of independent, sequential"):
        api.apply(path, tmp_path / "o.onnx", all_spec="svd:4", data=data, calibration="sometimes")
    with pytest.raises(UserError, match="fits layers on data: give --data"):
        api.apply(path, tmp_path / "o.onnx", all_spec="svd:4", calibration="sequential")
    assert not (tmp_path / "o.onnx").exists()


def test_the_residual_gap_is_fitted_with_the_layer():
    """With a residual Add after the layer, W* and b* are lstsq of [X~, 1] against
    X W + b + (R - R~): the layer takes back what the residual stream lost upstream."""
    r = rng(3)
    x = r.standard_normal((4000, 6)) + 0.5
    xt = x + 0.2 * r.standard_normal(x.shape)
    gap = 0.3 * xt @ r.standard_normal((6, 3)) + 0.1 * r.standard_normal((4000, 3)) + 0.5
    w, b = r.standard_normal((6, 3)).astype(np.float32), r.standard_normal(3).astype(np.float32)
    layer = Layer("fc", "MatMul", "x", "y", ("y",), w, b, (1, 6), (1, 3))
    a = calibrate.Anchored(xt.T @ xt, xt.T @ x, xt.sum(0), x.sum(0), np.abs(xt).sum(0), len(x),
                           gap_cross=xt.T @ gap, gap_total=gap.sum(0))
    got = sequential.anchored(layer, as_matrix, a, ridge=0.0)
    design = np.hstack([xt, np.ones((len(x), 1))])
    want = np.linalg.lstsq(design, x @ w.astype(np.float64) + b + gap, rcond=None)[0]
    without = np.linalg.lstsq(design, x @ w.astype(np.float64) + b, rcond=None)[0]
    assert np.abs(want - without).max() > 0.2          # the gap moves the fit
    np.testing.assert_allclose(got.weight, want[:-1], rtol=0.02, atol=0.02)
    np.testing.assert_allclose(got.bias, want[-1], rtol=0.02, atol=0.02)


def test_anchored_sums_are_those_of_the_tapped_activations(tmp_path):
    """collect_anchored over one-sample chunks (a batch-1 model) against numpy on the whole
    taps: Q and K read the same input (one set of sums serves both), and the output projection,
    whose residual Add sums it with q, gets X~^T (R - R~) of the two models' q."""
    r = rng(4)
    w = {n: r.standard_normal((8, 8)).astype(np.float32) for n in ("Wq", "Wk", "Wo")}
    def build(wq):
        nodes = [helper.make_node("MatMul", ["X", "Wq"], ["q"], name="q"),
                 helper.make_node("MatMul", ["X", "Wk"], ["k"], name="k"),
                 helper.make_node("Add", ["q", "k"], ["s"]), helper.make_node("MatMul", ["s", "Wo"], ["o"], name="o"),
                 helper.make_node("Add", ["o", "q"], ["Y"])]
        return model(nodes, [value("X", ["N", 8])], [value("Y", ["N", 8])],
                     [init("Wq", wq), init("Wk", w["Wk"]), init("Wo", w["Wo"])])
    original = build(w["Wq"])
    rewritten = build(w["Wq"] + 0.3 * r.standard_normal((8, 8)).astype(np.float32))
    prep = api._prepare(save(original, tmp_path / "m.onnx"), {"X": (1, 8)})
    x = r.standard_normal((300, 8)).astype(np.float32)
    from denseflex_onnx.data import Dataset
    layers = [prep.layers[n] for n in ("q", "k", "o")]
    assert sequential.residual(prep.loaded.proto.graph, prep.layers["o"]) == "q"
    got = calibrate.collect_anchored(prep.loaded, rewritten, layers, Dataset({"X": x}, {}, None), residuals={"o": "q"})
    def taps(m):
        tapped = onnx.ModelProto()
        tapped.CopyFrom(m)
        tapped.graph.output.extend([onnx.ValueInfoProto(name="s"), onnx.ValueInfoProto(name="q")])
        return (a.astype(np.float64) for a in run(tapped, {"X": x}, ["s", "q"]))
    s, q = taps(original)
    st, qt = taps(rewritten)
    x64 = x.astype(np.float64)
    for name in ("q", "k"):
        np.testing.assert_allclose(got[name].gram_tilde, x64.T @ x64, rtol=1e-9)
        np.testing.assert_allclose(got[name].cross, x64.T @ x64, rtol=1e-9)
        assert got[name].count == 300 and got[name].gap_cross is None
    o = got["o"]
    np.testing.assert_allclose(o.gram_tilde, st.T @ st, rtol=1e-6)
    np.testing.assert_allclose(o.cross, st.T @ s, rtol=1e-6)
    np.testing.assert_allclose(o.total, s.sum(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(o.gap_cross, st.T @ (q - qt), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(o.gap_total, (q - qt).sum(0), rtol=1e-6, atol=1e-6)
