"""Layers inside If and Loop bodies are rewritten in place; the model keeps working on both branches."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import denseflex_onnx
from denseflex_onnx.layers import find_layers
from denseflex_onnx.loading import load
from denseflex_onnx.passes import PASSES
from denseflex_onnx.plan import Choice, Plan, parse_spec
from denseflex_onnx.rewrite import rewrite_model

import graphs
import graphs_extra as gx


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)


@pytest.mark.parametrize("spec,exact", [("svd:10", True), ("svd:3", False), ("tt:3x4,2x5:6", True)])
def test_if_branches_rewritten_and_both_branches_run(tmp_path, spec, exact):
    path = graphs.save(gx.if_model(), tmp_path / "if.onnx")
    loaded = load(path, {"X": (2, 12)})
    layers = {l.name: l for l in find_layers(loaded).layers}
    plan = Plan({name: parse_spec(layer, spec) for name, layer in layers.items()})
    out = rewrite_model(loaded.proto, layers, plan)
    onnx.checker.check_model(out, full_check=True)
    names = {n.name for g in (out.graph.node[0].attribute[0].g, out.graph.node[0].attribute[1].g) for n in g.node}
    assert any("/svd/" in n or "/tt/" in n for n in names)
    assert not {i.name for i in out.graph.initializer} & {"W", "V"}          # the old weights are gone
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    for cond in (True, False):
        feeds = {"X": x, "cond": np.array(cond)}
        got, want = run(out, feeds)[0], run(loaded.proto, feeds)[0]
        if exact:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:       # truncated: x @ A @ B from the factors, branch by branch
            layer = layers["ifnode/then_branch/mm_then" if cond else "ifnode/else_branch/mm_else"]
            a, b = PASSES["svd"].factorize(layer, plan.layers[layer.name].config)
            np.testing.assert_allclose(got, x @ a @ b, rtol=1e-4, atol=1e-4)


def test_loop_body_rewritten(tmp_path):
    path = graphs.save(gx.loop_model(), tmp_path / "loop.onnx")
    loaded = load(path, {"X": (2, 12)})
    layers = {l.name: l for l in find_layers(loaded).layers}
    out = rewrite_model(loaded.proto, layers, Plan({"loop/body/mm_body": Choice("svd", {"rank": 10})}))
    onnx.checker.check_model(out, full_check=True)
    feeds = {"X": np.random.default_rng(1).standard_normal((3, 12)).astype(np.float32), "trip": np.array(4)}
    np.testing.assert_allclose(run(out, feeds)[0], run(loaded.proto, feeds)[0], rtol=1e-4, atol=1e-4)


def test_optimize_with_data_factorizes_body_layers_plainly_with_a_warning(tmp_path, caplog):
    """Activations inside a body cannot be captured: data-aware modes fall back to plain there."""
    path = graphs.save(gx.if_model(k=32, n=24), tmp_path / "if.onnx")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "d.npz", X=rng.standard_normal((160, 32)).astype(np.float32),
             cond=np.array(True))
    result = denseflex_onnx.optimize(path, tmp_path / "out.onnx", data=tmp_path / "d.npz", memory="-20%",
                                     max_accuracy_drop=100, cache_dir=tmp_path / "c", input_shapes={"X": (2, 32)})
    assert "cannot be captured" in caplog.text
    assert result.report["factorization"] == "whitened"
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)
