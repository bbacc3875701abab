"""Data-aware factorization: whitened and scaled SVD, bias correction, sensitivity, fallbacks."""
import logging

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from denseflex_onnx.calibrate import LayerStats
from denseflex_onnx.layers import Layer
from denseflex_onnx.passes import PASSES, svd
from denseflex_onnx.plan import Choice
from denseflex_onnx.space import Factors


def correlated_inputs(rng, rows, k, decay):
    """Activations whose channels are correlated and unevenly scaled, as real ones are."""
    mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / (decay * k))[None, :]
    return rng.standard_normal((rows, k)) @ mix.T + 0.5 * rng.standard_normal(k)


def stats_of(x):
    return LayerStats(x.T @ x, x.sum(axis=0), np.abs(x).sum(axis=0), len(x))


def dense_layer(w, bias=None):
    k, n = w.shape
    return Layer(name="fc", op="MatMul", input="x", output="y", node_outputs=("y",), weight=w.astype(np.float32),
                 bias=None if bias is None else bias.astype(np.float32), activation_shape=(1, k),
                 output_shape=(1, n), params=w.size, flops=2 * k * n)


def output_error(x, w, a, b):
    """||X W - X A B|| / ||X W||, computed directly on the activations."""
    return np.linalg.norm(x @ w - (x @ a) @ b) / np.linalg.norm(x @ w)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(k=st.integers(4, 40), n=st.integers(4, 40), decay=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_whitened_output_error_is_at_most_plain_at_every_rank(k, n, decay, seed):
    rng = np.random.default_rng(seed)
    x = correlated_inputs(rng, 3 * k + 5, k, decay)
    w = rng.standard_normal((k, n))
    stats = stats_of(x)
    plain = svd.decompose_matrix(w, stats, None, "plain")
    white = svd.decompose_matrix(w, stats, None, "whitened")
    for rank in range(1, min(k, n) + 1):
        e_plain = output_error(x, w, *svd.truncate(plain, rank))
        e_white = output_error(x, w, *svd.truncate(white, rank))
        assert e_white <= e_plain * (1 + 1e-6) + 1e-9
        # and the closed-form error the solver uses is the real one
        assert white.relative_error(rank) == pytest.approx(e_white, rel=1e-4, abs=1e-6)
        assert plain.relative_error(rank) == pytest.approx(e_plain, rel=1e-4, abs=1e-6)


def test_scaled_is_exact_at_full_rank_and_its_error_is_real():
    rng = np.random.default_rng(0)
    x = correlated_inputs(rng, 200, 24, 0.3)
    w = rng.standard_normal((24, 16))
    d = svd.decompose_matrix(w, stats_of(x), None, "scaled")
    a, b = svd.truncate(d, 16)
    np.testing.assert_allclose(a @ b, w, rtol=1e-8, atol=1e-8)
    for rank in (2, 5, 9):
        assert d.relative_error(rank) == pytest.approx(output_error(x, w, *svd.truncate(d, rank)), rel=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_scaled_second_factor_is_the_least_squares_refit_and_never_worse(seed):
    """At each rank the scaled SVD's second factor is numpy's lstsq of X W on X A (A its first
    factor), its closed-form error is that fit's real error, and no worse than the truncation."""
    rng = np.random.default_rng(seed)
    x = correlated_inputs(rng, 300, 20, 0.3)
    w = rng.standard_normal((20, 14))
    d = svd.decompose_matrix(w, stats_of(x), None, "scaled")
    u, s, vt = d.u, d.s, d.vt
    for rank in (1, 3, 7, 13):
        a, b = svd.truncate(d, rank)
        reference = np.linalg.lstsq(x @ a, x @ w, rcond=None)[0]
        np.testing.assert_allclose(b, reference, rtol=1e-6, atol=1e-8)
        root = np.sqrt(s[:rank])
        truncated = root[:, None] * vt[:rank]                   # the second factor before the refit
        assert output_error(x, w, a, b) <= output_error(x, w, a, truncated) + 1e-12
        assert d.relative_error(rank) == pytest.approx(output_error(x, w, a, b), rel=1e-5, abs=1e-8)


def test_whitened_truncation_is_already_the_least_squares_refit():
    """Why only the scaled mode refits: the whitened second factor is lstsq's already."""
    rng = np.random.default_rng(5)
    x = correlated_inputs(rng, 300, 20, 0.3)
    w = rng.standard_normal((20, 14))
    d = svd.decompose_matrix(w, stats_of(x), None, "whitened")
    assert d.refit is None
    for rank in (2, 6, 11):
        a, b = svd.truncate(d, rank)
        # up to the small ridge whitening adds to X^T X
        np.testing.assert_allclose(b, np.linalg.lstsq(x @ a, x @ w, rcond=None)[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["svd", "tt"])
def test_layer_errors_are_measured_on_held_out_samples(method):
    """Candidates fitted on one part of the calibration rows are scored on the other part: the
    error is ||X_h (W - W')|| / ||X_h W|| on those rows (centered: the bias absorbs the mean),
    computed here directly, and it is above the error on the rows the fit saw."""
    from denseflex_onnx.passes import tt
    rng = np.random.default_rng(3)
    x = correlated_inputs(rng, 120, 24, 0.2)
    fit, held = x[0::2], x[1::2]
    w = rng.standard_normal((24, 16))
    layer = dense_layer(w)
    scored = Factors({"fc": layer}, {"fc": stats_of(fit)}, "whitened", held_out={"fc": stats_of(held)})
    configs = [{"rank": r} for r in (2, 5, 9)] if method == "svd" else tt.candidates(layer)[:3]
    hc, fc = held - held.mean(axis=0), fit - fit.mean(axis=0)
    for config in configs:
        choice = Choice(method, config)
        approx = PASSES[method].reconstruct(layer, scored.factors(layer, choice)).astype(np.float64)
        expected = np.linalg.norm(hc @ (w - approx)) / np.linalg.norm(hc @ w)
        assert scored.error(layer, choice) == pytest.approx(expected, rel=1e-4), config
        seen = np.linalg.norm(fc @ (w - approx)) / np.linalg.norm(fc @ w)
        assert scored.error(layer, choice) > seen


def test_singular_gram_is_regularized_and_nan_falls_back_to_plain(caplog):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 12))
    x[:, 5] = 0.0                      # a dead channel
    x[:, 7] = x[:, 3]                  # a duplicated one: X^T X is singular
    w = rng.standard_normal((12, 8))
    white = svd.decompose_matrix(w, stats_of(x), None, "whitened")
    plain = svd.decompose_matrix(w, stats_of(x), None, "plain")
    assert np.all(np.isfinite(white.u)) and white.untransform is not None
    for rank in range(1, 9):
        assert output_error(x, w, *svd.truncate(white, rank)) <= output_error(x, w, *svd.truncate(plain, rank)) + 1e-6
    broken = stats_of(x)
    broken.gram[0, 0] = np.nan
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        fallback = svd.decompose_matrix(w, broken, None, "whitened")
    assert fallback.untransform is None
    assert "plain SVD" in caplog.text
    np.testing.assert_allclose(fallback.s, np.linalg.svd(w, compute_uv=False), rtol=1e-10)


def test_expected_gram_is_centered_and_shrunk_by_dims_over_dims_plus_rows():
    rng = np.random.default_rng(3)
    x = correlated_inputs(rng, 30, 10, 0.3) + 2.0
    stats = stats_of(x)
    for centered in (False, True):
        xc = x - x.mean(axis=0) if centered else x
        raw = xc.T @ xc
        weight = 10 / (10 + 30)
        want = (1 - weight) * raw + weight * np.trace(raw) / 10 * np.eye(10)
        got = stats.expected(centered)
        np.testing.assert_allclose(got.gram, want, rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(got.total, stats.total)
        assert got.count == 30


def test_with_fewer_rows_than_dims_the_expected_gram_generalizes():
    """40 calibration rows in 120 dims: whitened SVD fitted to the raw X^T X is exact on those
    rows only; fitted to the expected one, its output error on fresh rows of the same
    distribution is lower on average, and never above plain SVD's."""
    k, n, ratios = 120, 64, []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / k)[None, :]
        calib, fresh = rng.standard_normal((40, k)) @ mix.T, rng.standard_normal((2000, k)) @ mix.T
        w = rng.standard_normal((k, n))
        raw = svd.decompose_matrix(w, stats_of(calib), None, "whitened")
        shrunk = svd.decompose_matrix(w, stats_of(calib).expected(False), None, "whitened")
        plain = svd.decompose_matrix(w, None, None, "plain")
        for rank in (4, 8, 16, 32):
            e_raw, e_shrunk, e_plain = (output_error(fresh, w, *svd.truncate(d, rank)) for d in (raw, shrunk, plain))
            assert e_shrunk <= e_plain
            ratios.append(e_shrunk / e_raw)
    assert np.mean(ratios) < 0.98


def test_data_aware_layer_error_is_the_bias_corrected_error_on_the_calibration_rows():
    """With many rows (no shrinkage to speak of), the error the solver adds up for a whitened
    candidate is what the rewritten, bias-corrected layer really does on those rows."""
    rng = np.random.default_rng(4)
    x = correlated_inputs(rng, 20000, 16, 0.3) + 2.0
    w = rng.standard_normal((16, 12))
    layer = dense_layer(w, rng.standard_normal(12))
    factors = Factors({"fc": layer}, {"fc": stats_of(x)}, "whitened")
    for rank in (2, 5, 9):
        choice = Choice("svd", {"rank": rank})
        corrected, (a, b) = factors.rewrite_inputs(layer, choice)
        y = x @ w + layer.bias
        real = np.linalg.norm(y - (x @ a @ b + corrected.bias)) / np.linalg.norm(y - y.mean(axis=0))
        assert factors.error(layer, choice) == pytest.approx(real, rel=5e-2)


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_correction_removes_the_mean_output_error(with_bias):
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 400, 32, 0.2) + 3.0          # inputs with a large mean
    w = rng.standard_normal((32, 24))
    bias = rng.standard_normal(24) if with_bias else None
    layer = dense_layer(w, bias)
    factors = Factors({"fc": layer}, {"fc": stats_of(x)}, "whitened")
    choice = Choice("svd", {"rank": 4})
    corrected, (a, b) = factors.rewrite_inputs(layer, choice)
    y = x @ w + (0 if bias is None else bias)
    y_plain = x @ a @ b + (0 if bias is None else bias)
    y_corrected = x @ a @ b + corrected.bias
    mean_plain = np.abs((y - y_plain).mean(axis=0)).mean()
    mean_corrected = np.abs((y - y_corrected).mean(axis=0)).mean()
    assert mean_corrected < 1e-3 * max(mean_plain, 1e-12) + 1e-4
    assert np.linalg.norm(y - y_corrected) <= np.linalg.norm(y - y_plain) + 1e-9
    # plain plans are re-applied without data: no correction there
    plain = Factors({"fc": layer}, {"fc": stats_of(x)}, "plain")
    same, _ = plain.rewrite_inputs(layer, choice)
    assert same is layer


@pytest.mark.parametrize("k,n,ins,outs", [(64, 48, [8, 8], [6, 8]), (60, 48, [3, 4, 5], [4, 3, 4]),
                                          (96, 64, [2, 3, 4, 4], [2, 2, 4, 4])])
@pytest.mark.parametrize("bond", [2, 8])
def test_tt_least_squares_sweeps_lower_the_output_error(k, n, ins, outs, bond):
    from denseflex_onnx.passes import tt
    rng = np.random.default_rng(k + bond)
    x = correlated_inputs(rng, 300, k, 0.15)
    w = rng.standard_normal((k, n))
    layer = dense_layer(w)
    config = {"in_modes": ins, "out_modes": outs, "ranks": tt.reachable_ranks(ins, outs, [bond] * (len(ins) - 1))}
    errors = {}
    for mode in ("plain", "whitened"):
        cores = tt.factorize(layer, config, stats_of(x), tt.decompose(layer), mode)
        assert [c.shape[-1] for c in cores[:-1]] == config["ranks"]      # the sweeps keep the shapes
        approx = tt.reconstruct(layer, cores)
        errors[mode] = np.linalg.norm(x @ (w - approx)) / np.linalg.norm(x @ w)
    assert errors["whitened"] <= errors["plain"] + 1e-6


@pytest.mark.parametrize("ranks", [[8, 8], [8, 16], [16, 16]])
def test_conv_tt_least_squares_sweeps_lower_the_patch_error(ranks):
    from denseflex_onnx.calibrate import im2col
    from denseflex_onnx.passes import conv_tt
    rng = np.random.default_rng(sum(ranks))
    cin, cout = 16, 24
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    mix = rng.standard_normal((cin, cin)) * np.exp(-np.arange(cin) / 3)
    x = np.einsum("bchw,dc->bdhw", rng.standard_normal((6, cin, 10, 10)), mix)
    layer = Layer(name="c", op="Conv", input="x", output="y", node_outputs=("y",), weight=w, bias=None,
                  activation_shape=x.shape, output_shape=(6, cout, 10, 10),
                  attrs={"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]})
    patches = im2col(x, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1])
    matrix = w.reshape(cout, -1).T.astype(np.float64)
    errors = {}
    for mode in ("plain", "whitened"):
        kernels = conv_tt.factorize(layer, {"ranks": ranks}, stats_of(patches), None, mode)
        approx = conv_tt.reconstruct(layer, kernels).reshape(cout, -1).T
        errors[mode] = np.linalg.norm(patches @ (matrix - approx)) / np.linalg.norm(patches @ matrix)
    assert errors["whitened"] < errors["plain"]
