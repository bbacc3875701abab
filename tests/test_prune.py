"""Channel pruning of layer pairs (denseflex_onnx/pairs.py, passes/prune.py) on small real graphs.

Every model here is built with onnx.helper and run with onnxruntime; activations for the
least-squares checks come from onnxruntime runs of the original graph, never from the code
under test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import graphs
from graphs import init, model, rng, value
from graphs_extra import run

from denseflex_onnx import api, calibrate, layers as layers_mod, loading, model as model_mod, pairs as pairs_mod
from denseflex_onnx.data import Dataset
from denseflex_onnx.errors import UserError
from denseflex_onnx.passes import prune
from denseflex_onnx.plan import Choice, Plan, read_plan
from denseflex_onnx.rewrite import rewrite_model

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ graphs

def ffn(d=16, hidden=40, tokens=6, scale=False, seed=0) -> onnx.ModelProto:
    """MatMul+Add -> Erf GELU (Div, Erf, Add, Mul, Mul) [-> Mul by a [hidden] scale] -> MatMul+Add."""
    r = rng(seed)
    inits = [init("W1", (r.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32)),
             init("b1", (r.standard_normal(hidden) * 0.3).astype(np.float32)),
             init("W2", (r.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32)),
             init("b2", (r.standard_normal(d) * 0.1).astype(np.float32)),
             init("sqrt2", np.array(np.sqrt(2.0), np.float32)), init("one", np.array(1.0, np.float32)),
             init("half", np.array(0.5, np.float32))]
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["u"], name="up"),
             helper.make_node("Add", ["u", "b1"], ["h"], name="up_bias"),
             helper.make_node("Div", ["h", "sqrt2"], ["g0"], name="gelu_div"),
             helper.make_node("Erf", ["g0"], ["g1"], name="gelu_erf"),
             helper.make_node("Add", ["g1", "one"], ["g2"], name="gelu_add"),
             helper.make_node("Mul", ["h", "g2"], ["g3"], name="gelu_mul"),
             helper.make_node("Mul", ["g3", "half"], ["a"], name="gelu_half")]
    act = "a"
    if scale:
        inits.append(init("gamma", (1 + r.standard_normal((1, hidden)) * 0.2).astype(np.float32)))
        nodes.append(helper.make_node("Mul", ["gamma", "a"], ["a2"], name="layer_scale"))
        act = "a2"
    nodes += [helper.make_node("MatMul", [act, "W2"], ["v"], name="down"),
              helper.make_node("Add", ["v", "b2"], ["Y"], name="down_bias")]
    return model(nodes, [value("X", ["N", tokens, d])], [value("Y", ["N", tokens, d])], inits)


def conv_pair(cin=3, mid=8, cout=6, kernel2=3, spatial=10, seed=0) -> onnx.ModelProto:
    """Conv 3x3 -> Add of a [mid,1,1] constant -> Relu -> Conv kernel2 x kernel2 (padded)."""
    r = rng(seed)
    inits = [init("W1", (r.standard_normal((mid, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)),
             init("B1", (r.standard_normal(mid) * 0.2).astype(np.float32)),
             init("shift", (r.standard_normal((mid, 1, 1)) * 0.2).astype(np.float32)),
             init("W2", (r.standard_normal((cout, mid, kernel2, kernel2)) / np.sqrt(mid * kernel2 ** 2))
                  .astype(np.float32)),
             init("B2", (r.standard_normal(cout) * 0.1).astype(np.float32))]
    pad = kernel2 // 2
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Add", ["c1", "shift"], ["c2"], name="shift"),
             helper.make_node("Relu", ["c2"], ["c3"], name="relu"),
             helper.make_node("Conv", ["c3", "W2", "B2"], ["Y"], name="conv2", kernel_shape=[kernel2] * 2,
                              pads=[pad] * 4)]
    return model(nodes, [value("X", ["N", cin, spatial, spatial])], [value("Y", ["N", cout, spatial, spatial])],
                 inits)


def between(op: str, seed=0) -> onnx.ModelProto:
    """Gemm -> OP -> Gemm where OP is what no pair may hold: Softmax, Reshape, a second reader,
    or the consumer's weight shared with another Gemm."""
    r = rng(seed)
    inits = [init("W1", r.standard_normal((8, 12)).astype(np.float32)),
             init("W2", r.standard_normal((12, 5)).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["X", "W1"], ["h"], name="fc1")]
    outputs = [value("Y", ["N", 5])]
    if op == "Softmax":
        nodes.append(helper.make_node("Softmax", ["h"], ["a"], name="soft", axis=-1))
    elif op == "Reshape":
        inits.append(init("shape", np.array([-1, 12], np.int64)))
        nodes.append(helper.make_node("Reshape", ["h", "shape"], ["a"], name="reshape"))
    elif op == "second":
        nodes.append(helper.make_node("Relu", ["h"], ["a"], name="relu"))
        nodes.append(helper.make_node("Sigmoid", ["a"], ["side"], name="side"))
        outputs.append(value("side", ["N", 12]))
    elif op == "shared":
        nodes.append(helper.make_node("Relu", ["h"], ["a"], name="relu"))
        nodes.append(helper.make_node("Gemm", ["X2", "W2"], ["Z"], name="other"))
        outputs.append(value("Z", ["N", 5]))
    nodes.append(helper.make_node("Gemm", ["a", "W2"], ["Y"], name="fc2"))
    inputs = [value("X", ["N", 8])] + ([value("X2", ["N", 12])] if op == "shared" else [])
    return model(nodes, inputs, outputs, inits)


# ------------------------------------------------------------------------------------ helpers

def load(m: onnx.ModelProto, tmp_path: Path, shapes: dict) -> model_mod.LoadedModel:
    return loading.load(graphs.save(m, tmp_path / "m.onnx"), shapes)


def discover(m, tmp_path, shapes):
    loaded = load(m, tmp_path, shapes)
    found = layers_mod.find_layers(loaded)
    return loaded, found, pairs_mod.find_pairs(loaded, found)


def inputs(m: onnx.ModelProto, batch: int, seed=1) -> np.ndarray:
    dims = [d.dim_value or batch for d in m.graph.input[0].type.tensor_type.shape.dim]
    return rng(seed).standard_normal(dims).astype(np.float32)


def tapped(m: onnx.ModelProto, x: np.ndarray, name: str) -> np.ndarray:
    """A tensor of the original graph, as onnxruntime computes it."""
    t = onnx.ModelProto()
    t.CopyFrom(m)
    t.graph.output.append(onnx.ValueInfoProto(name=name))
    return run(t, {m.graph.input[0].name: x}, [name])[0].astype(np.float64)


def statistics(loaded, layer, x: np.ndarray):
    data = Dataset({loaded.proto.graph.input[0].name: x}, {}, None)
    return calibrate.collect(loaded, [layer], data)[layer.name]


def pruned(loaded, pair, keep, stats=None):
    factors = prune.factorize(pair, {"keep": keep}, stats)
    plan = Plan({pair.name: Choice("prune", {"keep": keep}, pair.consumer.name)})
    return rewrite_model(loaded.proto, {pair.name: pair}, plan, {pair.name: factors}), factors


def input_rows(pair, h: np.ndarray) -> np.ndarray:
    """The consumer's input vectors (im2col patches for a Conv), built here with numpy."""
    if pair.consumer.op == "Conv":
        c = pair.consumer
        return calibrate.im2col(h, c.weight.shape[2:], c.attrs["strides"], c.attrs["pads"], c.attrs["dilations"])
    return h.reshape(-1, h.shape[-1])


CASES = {
    "mlp": (lambda: graphs.mlp((20, 32, 24, 5)), {"X": (4, 20)}, "fc0"),
    "ffn": (lambda: ffn(scale=True), {"X": (2, 6, 16)}, "up"),
    "conv3x3": (lambda: conv_pair(), {"X": (2, 3, 10, 10)}, "conv1"),
    "conv1x1": (lambda: conv_pair(kernel2=1), {"X": (2, 3, 10, 10)}, "conv1"),
}


# ------------------------------------------------------------------------------------ discovery

def test_pairs_found_with_what_lies_between(tmp_path):
    _, _, found = discover(graphs.mlp((20, 32, 24, 5)), tmp_path, {"X": (4, 20)})
    assert [p.to_json() for p in found.pairs] == [
        {"producer": "fc0", "consumer": "fc1", "channels": 32, "between": ["Relu"]},
        {"producer": "fc1", "consumer": "fc2", "channels": 24, "between": ["Relu"]}]
    assert "graph output" in found.why_not("fc2")

    _, _, found = discover(ffn(scale=True), tmp_path, {"X": (2, 6, 16)})
    (pair,) = found.pairs
    assert (pair.producer.name, pair.consumer.name, pair.channels) == ("up", "down", 40)
    assert pair.between == ("Div", "Erf", "Add", "Mul", "Mul", "Mul")
    # the fused bias Adds belong to the layers; only the [1, 40] scale is sliced between them
    assert [(c.node, c.index, c.value.shape, c.axis) for c in pair.sliced] == [("a2", 0, (1, 40), 1)]

    _, _, found = discover(conv_pair(), tmp_path, {"X": (2, 3, 10, 10)})
    (pair,) = found.pairs
    assert (pair.producer.name, pair.consumer.name, pair.channels, pair.between) == ("conv1", "conv2", 8,
                                                                                     ("Add", "Relu"))
    assert [(c.value.shape, c.axis) for c in pair.sliced] == [((8, 1, 1), 0)]


@pytest.mark.parametrize("op, reason", [("Softmax", "a Softmax (soft) sits between"),
                                        ("Reshape", "a Reshape (reshape) sits between"),
                                        ("second", "graph output"),
                                        ("shared", "weight shared by several nodes")])
def test_pairs_refused_with_the_reason(tmp_path, op, reason):
    _, _, found = discover(between(op), tmp_path, {"X": (4, 8)} | ({"X2": (4, 12)} if op == "shared" else {}))
    assert found.pair("fc1") is None
    assert reason in found.why_not("fc1"), found.why_not("fc1")


def test_a_second_consumer_layer_is_refused(tmp_path):
    r = rng(0)
    inits = [init(n, r.standard_normal(s).astype(np.float32)) for n, s in (("W1", (8, 12)), ("W2", (12, 5)),
                                                                          ("W3", (12, 3)))]
    nodes = [helper.make_node("Gemm", ["X", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "W2"], ["Y"], name="fc2"),
             helper.make_node("Gemm", ["a", "W3"], ["Z"], name="fc3")]
    m = model(nodes, [value("X", ["N", 8])], [value("Y", ["N", 5]), value("Z", ["N", 3])], inits)
    _, _, found = discover(m, tmp_path, {"X": (4, 8)})
    assert found.pair("fc1") is None and "a second consumer" in found.why_not("fc1")


def test_a_constant_varying_along_another_axis_is_refused(tmp_path):
    """A [tokens, hidden] constant (a position bias) is not per channel: slicing it is not enough."""
    m = ffn()
    m.graph.initializer.append(init("pos", rng(3).standard_normal((6, 40)).astype(np.float32)))
    gelu_half = next(n for n in m.graph.node if n.name == "gelu_half")
    gelu_half.op_type, gelu_half.input[1] = "Add", "pos"
    _, _, found = discover(m, tmp_path, {"X": (2, 6, 16)})
    assert "not only the channels" in found.why_not("up")


# ------------------------------------------------------------------------------------ the rewrite

@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("with_stats", [False, True])
def test_keeping_every_channel_is_the_original(tmp_path, case, with_stats):
    build, shapes, producer = CASES[case]
    m = build()
    loaded, _, found = discover(m, tmp_path, shapes)
    pair = found.pair(producer)
    x = inputs(m, 64, seed=2)
    stats = statistics(loaded, pair.consumer, x) if with_stats else None
    new, _ = pruned(loaded, pair, pair.channels, stats)
    onnx.checker.check_model(new, full_check=True)
    feed = {m.graph.input[0].name: inputs(m, 7, seed=3)}
    np.testing.assert_allclose(run(new, feed)[0], run(m, feed)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cost_matches_the_built_graph(tmp_path, case):
    build, shapes, producer = CASES[case]
    m = build()
    loaded, before, found = discover(m, tmp_path, shapes)
    pair = found.pair(producer)
    keep = pair.channels // 2 + 1
    new, _ = pruned(loaded, pair, keep)
    onnx.checker.check_model(new, full_check=True)
    after_loaded = load(new, tmp_path, shapes)
    after = layers_mod.find_layers(after_loaded)
    params, flops = prune.cost(pair, {"keep": keep})
    assert after.total_params == before.total_params - pair.params + params
    assert after.total_flops == before.total_flops - pair.flops + flops
    # the rewritten pair is found again, with k channels: its shapes are consistent
    assert pairs_mod.find_pairs(after_loaded, after).pair(f"{producer}/prune/" + (
        "Conv_0" if pair.op == "Conv" else "Gemm_0" if pair.producer.op == "Gemm" else "MatMul_0")).channels == keep


@pytest.mark.parametrize("case", sorted(CASES))
def test_refit_never_raises_the_calibration_error(tmp_path, case):
    build, shapes, producer = CASES[case]
    m = build()
    loaded, _, found = discover(m, tmp_path, shapes)
    pair = found.pair(producer)
    x = inputs(m, 96, seed=4)
    stats = statistics(loaded, pair.consumer, x)
    h = tapped(m, x, pair.consumer.input)
    rows = input_rows(pair, h)
    m2 = prune.consumer_matrix(pair)
    b2 = np.broadcast_to(pair.consumer.bias.astype(np.float64), (m2.shape[1],))
    target = rows @ m2 + b2
    for keep in (1, pair.channels // 4, pair.channels // 2, pair.channels - 1):
        kept, _, _, w2, b = prune.factorize(pair, {"keep": keep}, stats)
        r = prune.rows_of(kept, prune.block(pair))
        refit = rows[:, r] @ prune.consumer_matrix_of(pair, w2) + b
        sliced = rows[:, r] @ m2[r] + b2
        assert np.linalg.norm(refit - target) <= np.linalg.norm(sliced - target) * (1 + 1e-6), keep


def calibrated_pair(tmp_path, case):
    """A CASES pair, its consumer's statistics on 400 inputs, and those inputs' rows as the
    consumer multiplies them (from onnxruntime)."""
    build, shapes, producer = CASES[case]
    m = build()
    loaded, _, found = discover(m, tmp_path, shapes)
    pair = found.pair(producer)
    x = inputs(m, 400, seed=5)
    return pair, statistics(loaded, pair.consumer, x), input_rows(pair, tapped(m, x, pair.consumer.input))


def test_a_removal_order_from_the_results_cache_is_the_one_computed(tmp_path):
    """A later run's Factors read the greedy order an earlier one stored (results cache), and
    prune to the same channels and weights as one that computes it."""
    from denseflex_onnx import results
    from denseflex_onnx.space import Factors
    case = sorted(CASES)[0]
    pair, stats, _ = calibrated_pair(tmp_path, case)
    layers = {pair.producer.name: pair.producer, pair.consumer.name: pair.consumer}
    choice = Choice("prune", {"keep": pair.channels // 2}, consumer=pair.consumer.name)
    fresh = Factors(layers, {pair.consumer.name: stats}, "whitened").pair_factors(pair, choice)
    first = results.Results(tmp_path / "r", {"model": "m"})
    Factors(layers, {pair.consumer.name: stats}, "whitened", memo=(first, "all")).pair_factors(pair, choice)
    later = results.Results(tmp_path / "r", {"model": "m"})
    again = Factors(layers, {pair.consumer.name: stats}, "whitened", memo=(later, "all")).pair_factors(pair, choice)
    assert later.hits == {"removal order": 1}
    for a, b in zip(fresh, again):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_refit_is_least_squares_on_the_activations(tmp_path, case):
    """The refit equals numpy's lstsq of [H_S, 1] against H W2 + b, H from onnxruntime."""
    pair, stats, rows = calibrated_pair(tmp_path, case)
    m2 = prune.consumer_matrix(pair)
    b2 = np.broadcast_to(pair.consumer.bias.astype(np.float64), (m2.shape[1],))
    keep = pair.channels // 2
    kept = prune.factorize(pair, {"keep": keep}, stats)[0]      # the channels the pass keeps
    r = prune.rows_of(kept, prune.block(pair))
    design = np.hstack([rows[:, r], np.ones((len(rows), 1))])
    solution = np.linalg.lstsq(design, rows @ m2 + b2, rcond=None)[0]
    mean = stats.total / stats.count
    # without the ridge: the same numbers
    w, b = prune.refit(m2, b2, prune.covariance(stats), mean, r, ridge=0.0)
    np.testing.assert_allclose(w, solution[:-1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, solution[-1], rtol=1e-6, atol=1e-7)
    # as the pass writes it: off lstsq by exactly the ridge's pull toward the plain slice M_S,
    # (Cov_SS + lam I)(W - W*) = lam (M_S - W*), lam = max(1e-3, d / n) of the mean variance
    # (Cov from numpy; d inputs, n calibration rows)
    _, _, _, w2, b = prune.factorize(pair, {"keep": keep}, stats)
    w = prune.consumer_matrix_of(pair, w2)
    cov = np.cov(rows[:, r].T, bias=True)
    lam = max(1e-3, rows.shape[1] / len(rows)) * np.mean(np.diag(cov))
    pull = lam * (m2[r] - solution[:-1])
    np.testing.assert_allclose((cov + lam * np.eye(len(r))) @ (w - solution[:-1]), pull,
                               atol=1e-3 * np.abs(pull).max() + 1e-6)
    mu = rows.mean(axis=0)
    np.testing.assert_allclose(b, b2 + mu @ m2 - mu[r] @ w, rtol=1e-5, atol=1e-5)


def test_channels_kept_are_the_largest_contributions(tmp_path):
    m = graphs.mlp((20, 32, 24, 5))
    loaded, _, found = discover(m, tmp_path, {"X": (4, 20)})
    pair = found.pair("fc0")
    x = inputs(m, 200, seed=6)
    stats = statistics(loaded, pair.consumer, x)
    h = tapped(m, x, pair.consumer.input)
    contribution = np.sum(pair.consumer.weight.astype(np.float64) ** 2, axis=1) * h.var(axis=0)
    np.testing.assert_allclose(prune.scores(pair, stats), contribution, rtol=1e-6, atol=1e-9)
    assert set(prune.select(pair, 10, stats)) == set(np.argsort(-contribution)[:10])


# ------------------------------------------------------------------------------------ apply / plan / CLI

def cli(*args):
    return subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def float_params(m: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


@pytest.fixture
def ffn_files(tmp_path):
    m = ffn(scale=True)
    path = graphs.save(m, tmp_path / "ffn.onnx")
    data = tmp_path / "ffn.npz"
    np.savez(data, X=inputs(m, 300, seed=7))
    return m, path, data


def test_apply_layer_prune_writes_a_valid_model(ffn_files, tmp_path):
    m, path, data = ffn_files
    out = tmp_path / "out.onnx"
    done = cli("apply", path, "--layer", "up=prune:24", "--input-shape", "X:1x6x16", "-o", out)
    assert done.returncode == 0, done.stderr
    new = onnx.load(str(out))
    onnx.checker.check_model(new, full_check=True)
    assert [i.SerializeToString() for i in new.graph.input] == [i.SerializeToString() for i in m.graph.input]
    assert [o.SerializeToString() for o in new.graph.output] == [o.SerializeToString() for o in m.graph.output]
    loaded, before, found = discover(m, tmp_path, {"X": (1, 6, 16)})
    pair = found.pair("up")
    params, _ = prune.cost(pair, {"keep": 24})
    assert float_params(new) == float_params(m) - pair.params + params
    y = run(new, {"X": inputs(m, 5)})[0]
    assert y.shape == (5, 6, 16) and np.all(np.isfinite(y))
    # the same rewrite through the API, with data: refitted, and reported
    summary = api.apply(path, tmp_path / "fit.onnx", layer_specs=["up=prune:0.6"], data=data,
                        input_shapes={"X": (1, 6, 16)}, calib_samples=200)
    assert summary["rewritten"] == [{"layer": "up", "spec": "prune:24", "params": [pair.params, params],
                                     "flops": [pair.flops, prune.cost(pair, {"keep": 24})[1]]}]
    assert summary["metric"]["kind"] == "cosine" and summary["metric"]["rewritten"] > 90


def test_plan_round_trip(ffn_files, tmp_path):
    m, path, data = ffn_files
    loaded, found_layers, found = discover(m, tmp_path, {"X": (1, 6, 16)})
    plan = Plan({"up": Choice("prune", {"keep": 20}, "down")}, "plain", loaded.sha256)
    entry = plan.to_json()["layers"]["up"]
    assert entry == {"method": "prune", "config": {"keep": 20}, "consumer": "down"}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan.to_json()))
    layers = {l.name: l for l in found_layers.layers}
    again = read_plan(plan_path, layers, found)
    assert again.layers == plan.layers and again.to_json() == plan.to_json()
    # --plan and --layer give the same model, plain and refitted (a whitened plan, with data)
    for mode, extra in (("plain", {}), ("whitened", {"data": data, "calib_samples": 200})):
        plan.factorization = mode
        plan_path.write_text(json.dumps(plan.to_json()))
        a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
        api.apply(path, a, plan_path=plan_path, input_shapes={"X": (1, 6, 16)}, force=True, **extra)
        api.apply(path, b, layer_specs=["up=prune:20"], input_shapes={"X": (1, 6, 16)}, force=True, **extra)
        feed = {"X": inputs(m, 3)}
        np.testing.assert_array_equal(run(onnx.load(str(a)), feed)[0], run(onnx.load(str(b)), feed)[0])
    # a plan that pairs the layer with another consumer than the model's is refused
    bad = plan.to_json()
    bad["layers"]["up"]["consumer"] = "elsewhere"
    plan_path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="pairs it with elsewhere"):
        read_plan(plan_path, layers, found)


def test_bad_prune_specs_are_one_line_user_errors(tmp_path):
    path = graphs.save(graphs.mlp((20, 32, 24, 5)), tmp_path / "mlp.onnx")
    for spec, message in [("fc2=prune:4", "fc2: it heads no layer pair"),
                          ("fc0=prune:33", "keep 33 is above the pair's 32 inner channels"),
                          ("fc0=prune:1.5", "must be in (0, 1]"),
                          ("fc0=prune:many", "neither a channel count")]:
        done = cli("apply", path, "--layer", spec, "--input-shape", "X:1x20", "-o", tmp_path / "o.onnx")
        assert done.returncode == 2, (spec, done.stderr)
        assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for specs, message in [(["fc0=prune:16", "fc1=svd:4"], "rewrites fc1 too .* cannot also take svd:4"),
                           (["fc0=prune:16", "fc1=prune:12"], "rewrites fc1 too .* cannot also take prune:12")]:
        with pytest.raises(UserError, match=message):
            api.apply(path, tmp_path / "o.onnx", layer_specs=specs, input_shapes={"X": (1, 20)})


def test_inspect_lists_the_pairs(tmp_path):
    path = graphs.save(conv_pair(), tmp_path / "conv.onnx")
    done = cli("inspect", path, "--input-shape", "X:1x3x10x10", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pairs"] == [{"producer": "conv1", "consumer": "conv2", "channels": 8,
                                                 "between": ["Add", "Relu"]}]
    done = cli("inspect", path, "--input-shape", "X:1x3x10x10")
    assert "pair conv1 -> conv2: 8 channels through Add Relu" in done.stdout


def test_mnist_mlp_prune_half_with_data(tmp_path):
    """The bundled MLP: half of /2/Gemm's 1024 outputs, /4/Gemm refitted on 128 images."""
    summary = api.apply(ROOT / "models" / "mnist_mlp.onnx", tmp_path / "m.onnx", layer_specs=["/2/Gemm=prune:0.5"],
                        data=ROOT / "models" / "mnist_mlp_val.npz", input_shapes={"x": (1, 784)})
    metric = summary["metric"]
    assert metric["kind"] == "accuracy"
    assert metric["rewritten"] >= metric["original"] - 1.5, metric
    assert summary["rewritten"][0]["params"][1] < summary["rewritten"][0]["params"][0] * 0.55


def no_bias(opset=17) -> onnx.ModelProto:
    """Gemm(transA=1) -> Relu -> Gemm, neither with a C (optional from opset 11)."""
    r = rng(0)
    nodes = [helper.make_node("Gemm", ["X", "W1"], ["h"], name="fc1", transA=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "W2"], ["Y"], name="fc2")]
    inits = [init("W1", r.standard_normal((8, 12)).astype(np.float32)),
             init("W2", r.standard_normal((12, 5)).astype(np.float32))]
    return model(nodes, [value("X", [8, "N"])], [value("Y", ["N", 5])], inits, opset=opset)


@pytest.mark.parametrize("opset", [9, 11, 13, 17])
@pytest.mark.parametrize("case", ["mlp", "ffn", "conv3x3", "no_bias"])
def test_rewrite_is_valid_in_the_models_opset(tmp_path, case, opset):
    """Only Gemm (with its C), MatMul, Transpose, Add and Conv are written: in every opset from 9."""
    if case == "no_bias" and opset < 11:
        pytest.skip("Gemm without C needs opset 11")
    build, shapes, producer = CASES[case] if case != "no_bias" else (lambda: no_bias(opset), {"X": (8, 4)}, "fc1")
    m = build()
    m.opset_import[0].version = opset
    onnx.checker.check_model(m, full_check=True)
    loaded, _, found = discover(m, tmp_path, shapes)
    pair = found.pair(producer)
    for keep in (pair.channels, pair.channels // 2):
        new, _ = pruned(loaded, pair, keep)
        assert new.opset_import[0].version == opset
        onnx.checker.check_model(new, full_check=True)
        feed = {m.graph.input[0].name: inputs(m, 5, seed=8)}
        y = run(new, feed)[0]
        if keep == pair.channels:
            np.testing.assert_allclose(y, run(m, feed)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ in the search

def test_optimize_searches_pairs_with_the_consumers_output_error(ffn_files, tmp_path):
    """Pair candidates join the producer's list; each one's error is the consumer's output error
    after the refit, recomputed here with numpy: the refit (ridge least squares) on the even
    calibration samples' activations, its error on the odd ones', which the fit never saw."""
    m, path, data = ffn_files
    from denseflex_onnx.profile import Budget
    out = tmp_path / "out.onnx"
    result = api.optimize(path, out, flops="-30%", max_accuracy_drop=5, data=data, calib_samples=200,
                          input_shapes={"X": (1, 6, 16)},
                          cache_dir=tmp_path / "c", timing=Budget(warmup=1, min_runs=3, max_runs=20, max_seconds=0.05))
    # the float candidates (an INT8 twin's error adds the layers' quantization error: test_int8.py)
    rows = [r for r in result.report["candidates"] if r["method"] == "prune" and not r["spec"].endswith("+int8")]
    assert rows and all(r["layer"] == "up" for r in rows)
    alive = [r for r in rows if r["dropped"] is None]
    # timed, or (model-guided timing) given a lower bound that was never needed
    assert alive and all((r["latency_ms"] or r["latency_bound_ms"]) > 0 for r in alive)
    assert any(r["latency_ms"] for r in alive)
    # the consumer's inputs on the two halves of the 200 calibration samples, by onnxruntime
    with np.load(data) as npz:
        x, npz_rest = npz["X"][:200], npz["X"][200:]
    fit, held = tapped(m, x[0::2], "a2").reshape(-1, 40), tapped(m, x[1::2], "a2").reshape(-1, 40)
    w2 = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "W2")).astype(np.float64)
    loaded, _, found = discover(m, tmp_path, {"X": (1, 6, 16)})
    pair = found.pair("up")
    stats = statistics(loaded, pair.consumer, x[0::2])
    cov = np.cov(fit.T, bias=True)
    held_c = held - held.mean(axis=0)
    s = held_c.T @ held_c
    for row in rows:
        keep = int(row["spec"].split(":")[1])
        kept = prune.factorize(pair, {"keep": keep}, stats)[0]
        # (Cov_SS + lam I) W = Cov_S: W2 + lam W2_S, lam = max(1e-3, d / n) of the mean kept variance
        c_ss = cov[np.ix_(kept, kept)]
        lam = max(1e-3, 40 / len(fit)) * np.mean(np.diag(c_ss))
        coef = np.linalg.solve(c_ss + lam * np.eye(len(kept)), cov[kept] @ w2 + lam * w2[kept])
        diff = w2.copy()
        diff[kept] -= coef
        measured = np.sqrt(np.sum(diff * (s @ diff)) / np.sum(w2 * (s @ w2)))
        assert row["error"] == pytest.approx(measured, rel=0.02, abs=1e-4), row
        # and it tracks the output error on the evaluation samples
        ho = tapped(m, npz_rest, "a2").reshape(-1, 40)
        yo = ho @ w2
        bias = fit.mean(axis=0) @ w2 - fit.mean(axis=0)[kept] @ coef
        held_out = np.linalg.norm(yo - ho[:, kept] @ coef - bias) / np.linalg.norm(yo - yo.mean(axis=0))
        assert 0.8 * held_out <= row["error"] <= 1.25 * held_out, (row, held_out)
    # a pruned pair leaves its consumer to the pair: not in the plan, and apply --plan gives the model again
    assert result.feasible
    plan = json.loads((tmp_path / "out.plan.json").read_text())
    assert plan["layers"]["up"]["method"] == "prune"       # only pruning reaches -30% FLOPs in 5 points here
    assert plan["layers"]["up"]["consumer"] == "down" and "down" not in plan["layers"]
    again = tmp_path / "again.onnx"
    api.apply(path, again, plan_path=tmp_path / "out.plan.json", data=data, calib_samples=200,
              input_shapes={"X": (1, 6, 16)})
    feed = {"X": inputs(m, 4)}
    np.testing.assert_array_equal(run(onnx.load(str(out)), feed)[0], run(onnx.load(str(again)), feed)[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_removal_drops_first_the_channel_whose_refit_loses_least(tmp_path, case):
    """Brute force: refit without each channel in turn (numpy lstsq with an intercept on the
    activations from onnxruntime); removal_order's first channel is the one that loses least."""
    pair, stats, rows = calibrated_pair(tmp_path, case)
    target = rows @ prune.consumer_matrix(pair)
    g = prune.block(pair)
    lost = []
    for j in range(pair.channels):
        r = prune.rows_of(np.setdiff1d(np.arange(pair.channels), [j]), g)
        design = np.hstack([rows[:, r], np.ones((len(rows), 1))])
        fit = np.linalg.lstsq(design, target, rcond=None)[0]
        lost.append(np.sum((design @ fit - target) ** 2))
    order = prune.removal_order(pair, stats, ridge=1e-9)
    assert sorted(order) == list(range(pair.channels))
    assert order[0] == int(np.argmin(lost))
