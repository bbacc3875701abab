"""Calibration statistics within a memory budget: the sketch, the plan, and their use by the passes."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from denseflex_onnx import calibrate
from denseflex_onnx.calibrate import LayerStats, NystromSketch, Representation, plan_statistics
from denseflex_onnx.sketch import LowRankGram
from denseflex_onnx.space import Factors, as_matrix
from passes import svd


def _dense(g: LowRankGram) -> np.ndarray:
    return g.sigma * np.eye(len(g)) + g.basis @ np.diag(g.values) @ g.basis.T


def _low_rank_gram(k=40, l=6, seed=0) -> LowRankGram:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((k, l)))
    return LowRankGram(0.3, q, rng.uniform(0.5, 5.0, l))


def test_low_rank_gram_acts_as_the_matrix_it_stands_for():
    g = _low_rank_gram()
    dense = _dense(g)
    m = np.random.default_rng(1).standard_normal((40, 7))
    np.testing.assert_allclose(g @ m, dense @ m, atol=1e-12)
    np.testing.assert_allclose(m.T @ g, m.T @ dense, atol=1e-12)
    np.testing.assert_allclose(g @ m[:, 0], dense @ m[:, 0], atol=1e-12)
    assert g.trace() == pytest.approx(np.trace(dense))
    assert len(g) == 40 and g.T is g


def test_low_rank_gram_powers_centering_and_shrinkage_match_numpy():
    g = _low_rank_gram()
    dense = _dense(g)
    values, vectors = np.linalg.eigh(dense)
    root = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    np.testing.assert_allclose(_dense(g.power(0.5)), root, atol=1e-10)
    np.testing.assert_allclose(_dense(g.power(-0.5)) @ root, np.eye(40), atol=1e-9)
    v = np.random.default_rng(2).standard_normal(40)
    np.testing.assert_allclose(_dense(g.minus_outer(v, 0.01)), dense - 0.01 * np.outer(v, v), atol=1e-10)
    w = 0.2
    np.testing.assert_allclose(_dense(g.shrunk(w)), (1 - w) * dense + w * np.trace(dense) / 40 * np.eye(40),
                               atol=1e-10)


def test_nystrom_sketch_is_exact_when_the_rows_span_fewer_dims_than_its_rank():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 10)) @ rng.standard_normal((10, 120))      # rank 10 in 120 dims
    sketch = NystromSketch(120, 32)
    for block in np.array_split(x, 7):
        sketch.add(block)
    exact = x.T @ x
    approx = _dense(sketch.gram())
    assert np.linalg.norm(approx - exact) / np.linalg.norm(exact) < 1e-4


def _decaying_rows(n, k, seed):
    """Activations whose covariance spectrum decays, as real layers' inputs do."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    scales = 1.0 / (1 + np.arange(k)) ** 1.2
    return (rng.standard_normal((n, k)) * scales) @ basis.T + 0.05


def _stats(rows, sketch_rank=None) -> LayerStats:
    k = rows.shape[1]
    rep = Representation("sketch", sketch_rank, 0, "") if sketch_rank else Representation("full", 0, 0, "")
    sums = calibrate._Sums(k, rep)
    for block in np.array_split(rows, 5):
        sums.add(block)
    return sums.stats()


def _layer(w):
    from denseflex_onnx.layers import Layer
    return Layer("fc", "MatMul", "x", "y", ("y",), w.astype(np.float32), None, (1, w.shape[0]), (1, w.shape[1]))


def test_whitened_fit_on_a_sketch_is_within_10_percent_of_the_full_statistics_fit():
    k, n, rank = 512, 256, 32
    rng = np.random.default_rng(3)
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    calib, held_out = _decaying_rows(4000, k, 4), _decaying_rows(2000, k, 5)
    layer = _layer(w)
    errors = {}
    for name, stats in (("full", _stats(calib)), ("sketch", _stats(calib, sketch_rank=128))):
        factors = Factors({"fc": layer}, {"fc": stats}, "whitened")
        from denseflex_onnx.plan import Choice
        fitted, (a, b) = factors.rewrite_inputs(layer, Choice("svd", {"rank": rank}))
        outputs = held_out @ a.astype(np.float64) @ b.astype(np.float64) + fitted.bias   # bias corrected
        errors[name] = np.linalg.norm(held_out @ w - outputs) / np.linalg.norm(held_out @ w)
    plain = svd.truncate(svd.decompose_matrix(w), rank)
    plain_error = np.linalg.norm(held_out @ (w - plain[0] @ plain[1])) / np.linalg.norm(held_out @ w)
    assert errors["full"] < plain_error                     # the data-aware fit is worth comparing
    assert errors["sketch"] <= 1.10 * errors["full"], errors


def test_error_estimates_from_a_sketch_track_the_full_statistics():
    k, n = 512, 64
    rng = np.random.default_rng(6)
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    calib = _decaying_rows(3000, k, 7)
    layer = _layer(w)
    from denseflex_onnx.plan import Choice
    for rank in (8, 32):
        full = Factors({"fc": layer}, {"fc": _stats(calib)}, "whitened").error(layer, Choice("svd", {"rank": rank}))
        sketched = Factors({"fc": layer}, {"fc": _stats(calib, 128)}, "whitened").error(
            layer, Choice("svd", {"rank": rank}))
        assert sketched == pytest.approx(full, rel=0.15)


def test_conv_patches_in_blocks_equal_im2col():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 9, 7))
    args = ((3, 2), [2, 1], [1, 0, 1, 1], [1, 2])
    whole = calibrate.im2col(x, *args)
    sample_bytes = 8 * whole.size // len(x)
    for limit, count in ((sample_bytes, 3), (2 * sample_bytes, 2), (sample_bytes // 2, None), (1, None)):
        blocks = list(calibrate.im2col_blocks(x, *args, limit))
        assert len(blocks) == count if count else len(blocks) > 3
        one_output_row = whole.nbytes // (len(x) * 5)             # 5 output rows a sample
        assert all(b.nbytes <= max(limit, one_output_row) for b in blocks)
        np.testing.assert_array_equal(np.concatenate(blocks), whole)


def _fake_layer(name, k, n=16):
    """A layer record as plan_statistics reads it (name, K); no weight of K x n needed."""
    from denseflex_onnx.layers import Layer
    return Layer(name, "MatMul", "x", "y", ("y",), np.zeros((k, 1), np.float32), None, (1, k), (1, 1))


def test_plan_keeps_full_statistics_for_narrow_layers_and_sketches_wide_ones():
    layers = [_fake_layer("narrow", 512), _fake_layer("wide", 65536)]
    plan = plan_statistics(layers, 8 << 30, {"narrow": 64, "wide": 16})
    assert plan["narrow"].kind == "full" and plan["narrow"].bytes == 8 * 512 * 512
    assert plan["wide"].kind == "sketch" and plan["wide"].rank == calibrate.SKETCH_MIN_RANK
    assert "65536 inputs" in plan["wide"].why


def test_plan_never_holds_more_than_the_budget_and_says_what_it_left_plain():
    layers = [_fake_layer(f"l{i}", 2048) for i in range(6)]
    budget = 300 << 20                  # five full X^T X of 32 MB and one's working copies
    plan = plan_statistics(layers, budget, {l.name: 64 for l in layers})
    full = [r for r in plan.values() if r.kind == "full"]
    assert full and sum(r.bytes for r in plan.values()) + calibrate.FULL_GRAM_WORKING_COPIES * full[0].bytes <= budget
    assert [r.kind for r in plan.values()].count("full") == 5
    assert [r.kind for r in plan.values()].count("sketch") == 1
    tiny = plan_statistics(layers, 1 << 10, {l.name: 64 for l in layers})
    assert all(r.kind == "none" and "fitted plainly" in r.why for r in tiny.values())


def test_randomized_svd_error_check_measures_the_residual():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((700, 600)) * (1.0 / (1 + np.arange(600)) ** 0.5)
    u, s, vt = svd._randomized_svd(w, 40)
    measured = svd._residual_norm(w, u, s, vt, steps=30)
    assert measured == pytest.approx(np.linalg.norm(w - (u * s) @ vt, 2), rel=0.02)
    u2, s2, _ = svd.truncated_svd(w, 40)
    np.testing.assert_allclose(s2[:40], np.linalg.svd(w, compute_uv=False)[:40], rtol=0.02)


# ------------------------------------------------------------------------------ end to end

def _wide_conv_model(path, cin=1024, kh=64, length=16):
    """Conv of Cin*kh = 65,536 inputs (a 32 GiB X^T X), Relu, Gemm."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((16, cin, kh, 1)) / np.sqrt(cin * kh)).astype(np.float32)
    g = (rng.standard_normal((16 * length, 10)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[kh // 2 - 1, 0, kh // 2, 0], kernel_shape=[kh, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"])]
    graph = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, length, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(g, "g")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    base = rng.standard_normal((40, 8, length)).astype(np.float32)
    x = np.einsum("nkl,kc->ncl", base, rng.standard_normal((8, cin)).astype(np.float32))[..., None]
    return x.astype(np.float32)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=900, **kw)


def test_optimize_a_conv_whose_full_statistics_need_32_gib(tmp_path):
    model = tmp_path / "wide.onnx"
    np.savez(tmp_path / "d.npz", x=_wide_conv_model(model))
    out = tmp_path / "small.onnx"
    run = _cli("optimize", model, "--data", tmp_path / "d.npz", "--calib-samples", 24, "--latency", "-5%",
               "--max-accuracy-drop", 100, "--no-cache", "-o", out)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "small.report.json").read_text())
    assert report["statistics"]["c"]["kind"] == "sketch"
    assert "65536 inputs" in report["statistics"]["c"]["why"]
    assert report["peak_memory_bytes"] < report["memory_budget_bytes"]
    assert report["peak_memory_bytes"] < 4 << 30
    assert "- c: sketch (65536 inputs" in (tmp_path / "small.report.md").read_text()
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_a_layer_without_room_for_statistics_is_fitted_plainly_with_a_warning(tmp_path):
    from tests.graphs import mlp, save
    model = save(mlp(), tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((64, 20)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x)
    run = _cli("optimize", model, "--data", tmp_path / "d.npz", "--calib-samples", 32, "--flops", "-20%",
               "--max-accuracy-drop", 100, "--no-cache", "--memory-budget", "1kB", "-o", tmp_path / "o.onnx")
    assert run.returncode in (0, 2) and "Traceback" not in run.stderr
    assert "no calibration statistics" in run.stderr and "--memory-budget" in run.stderr
    report = json.loads((tmp_path / "o.report.json").read_text())
    assert {r["kind"] for r in report["statistics"].values()} == {"none"}


def test_bad_memory_budget_is_one_line_exit_2(tmp_path):
    from tests.graphs import mlp, save
    model = save(mlp(), tmp_path / "m.onnx")
    run = _cli("optimize", model, "--flops", "-20%", "--memory-budget", "lots", "-o", tmp_path / "o.onnx")
    assert run.returncode == 2
    assert "--memory-budget 'lots'" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_a_layer_that_cannot_pay_off_gets_no_decomposition_and_statistics_only_as_a_pair_consumer(tmp_path):
    from tests.graphs import mlp, save
    model = save(mlp(sizes=(20, 512, 512, 2)), tmp_path / "m.onnx")      # fc2: 0.4% of weights and FLOPs
    x = np.random.default_rng(0).standard_normal((48, 20)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x)
    from denseflex_onnx import api
    result = api.explore(model, tmp_path / "space", flops="-20%", data=tmp_path / "d.npz", calib_samples=32,
                         no_cache=True)
    report = result.report
    assert set(report["kept_dense"]) == {"fc2"} and report["kept_dense"]["fc2"].startswith("negligible")
    # fc2 keeps statistics only because it consumes the pair fc1 -> fc2, which is refitted on them
    assert {"fc0", "fc1", "fc2"} == set(report["statistics"])
    assert any(row["layer"] == "fc1" and row["method"] == "prune" and row["error"] is not None
               for row in report["candidates"])
    without_pairs = api._explore(model, latency=None, memory=None, flops="-20%", max_accuracy_drop="1",
                                 objective="latency", metric=None, output=None, data=tmp_path / "d.npz",
                                 provider="cpu", threads=1, factorization=None, calib_samples=32,
                                 sensitivity=False, time_budget=None, cache_dir=None, no_cache=True, seed=0,
                                 layer_specs=None, exclude=None, input_shapes=None, progress=api.Progress(),
                                 methods=["svd", "tt"])
    assert "fc2" not in without_pairs.statistics and {"fc0", "fc1"} <= set(without_pairs.statistics)
    fc2 = [row for row in report["candidates"] if row["layer"] == "fc2" and row["spec"] != "dense"]
    assert fc2 and all(row["dropped"].startswith("cannot pay off") and row["error"] is None for row in fc2)
    # the grid still counts them: pruning shares stay comparable
    assert report["stages"]["grid"] == sum(1 for row in report["candidates"])


def test_padding_tokens_the_attention_mask_marks_are_left_out_of_the_statistics():
    from denseflex_onnx.layers import Layer
    layer = Layer("fc", "MatMul", "h", "y", ("y",), np.ones((4, 3), np.float32), None, (2, 3, 4), (2, 3, 3))
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    rows = np.concatenate(list(calibrate.input_blocks(layer, x, mask=mask)))
    np.testing.assert_array_equal(rows, x.reshape(6, 4)[[0, 1, 3]])
    assert calibrate.TOKEN_MASK == "attention_mask"
    # a mask of another shape (not this layer's tokens) leaves every row in
    assert len(np.concatenate(list(calibrate.input_blocks(layer, x, mask=np.ones((2, 5)))))) == 6
