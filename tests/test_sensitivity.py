"""Layer sensitivity: slopes from probes, normalized so the error-budget range is unchanged."""
import numpy as np
import pytest

from denseflex_onnx import sensitivity
from denseflex_onnx.plan import DENSE, Choice
from denseflex_onnx.space import Candidate, Space


def space_of(errors: dict[str, list[float]]) -> Space:
    space = Space({})
    for name, errs in errors.items():
        space.candidates[name] = [Candidate(name, DENSE, 100, 100, error=0.0, latency=1.0)] + [
            Candidate(name, Choice("svd", {"rank": i + 1}), 10, 10, error=e, latency=0.5) for i, e in enumerate(errs)]
    return space


def test_slopes_are_least_squares_through_the_origin_normalized_to_a_mean_of_one():
    space = space_of({"a": [0.03, 0.1, 0.3], "b": [0.03, 0.1, 0.3], "c": [0.03, 0.1, 0.3]})
    drops = {"a": lambda e: 2.0 * e ** 2, "b": lambda e: 6.0 * e ** 2 + 0.1, "c": lambda e: 0.0}
    scales, measured = sensitivity.error_scales(space, lambda name, cand: drops[name](cand.error))
    slope = {}
    for name in ("a", "b"):       # points per unit of squared error: what the solver adds up
        e = np.array([p["error"] for p in measured[name]]) ** 2
        d = np.array([p["drop"] for p in measured[name]])
        slope[name] = float(np.linalg.lstsq(e[:, None], d, rcond=None)[0][0])
    mean = (slope["a"] + slope["b"]) / 2
    assert scales["a"] == pytest.approx(slope["a"] / mean)
    assert scales["b"] == pytest.approx(slope["b"] / mean)
    assert scales["c"] == pytest.approx(sensitivity.MIN_SLOPE_SHARE)     # insensitive, yet never free
    # the candidate nearest (in log) each target error
    assert [p["spec"] for p in measured["a"]] == [
        f"svd:{1 + min(range(3), key=lambda i: abs(np.log([0.03, 0.1, 0.3][i] / t)))}" for t in sensitivity.TARGET_ERRORS]


def test_no_probe_losing_anything_leaves_every_layer_at_one():
    space = space_of({"a": [0.03, 0.1, 0.3], "b": [0.05, 0.2]})
    scales, measured = sensitivity.error_scales(space, lambda name, cand: 0.0)
    assert scales == {"a": 1.0, "b": 1.0}
    assert set(measured) == {"a", "b"}
