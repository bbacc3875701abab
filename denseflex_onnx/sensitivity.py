"""Layer sensitivity (--sensitivity): what a unit of each layer's error costs end to end.

The summed layer error is a proxy: an error in one layer may cost far more accuracy than
the same error in another. Factorizing one layer at a time at a few ranks and measuring the
end-to-end drop gives each layer a slope (points lost per unit of squared layer error, least
squares through the origin); the solver then adds up errors weighted by these slopes, normalized
to a mean of 1 so the error-budget range stays the same.

A probe's drop is in fidelity, 100 x mean cosine of the outputs to the original's, on the
first PROBE_SAMPLES calibration samples, whatever --metric judges the plans: a continuous
figure gives a slope from a few samples where accuracy on 64 samples moves in steps of 1.6
points, the evaluation samples stay unseen until a plan is judged, and a probe costs a fraction
of a full evaluation (MiniLM-L6, 36 layers: the probes took 10 minutes on 384 sentences).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .space import Candidate, Space

PROBE_SAMPLES = 64
MIN_SLOPE_SHARE = 0.05      # a layer that seems insensitive still counts a little: probes are few


# where metric drops are measurable and plans usually sit. One probe a layer: a layer's drop
# follows its squared error closely (MiniLM-L6, layer 0's FFN pruned to 864 and to 384 channels:
# drops 0.74 and 1.84 for squared errors 0.0020 and 0.0052), so one point fixes its slope
TARGET_ERRORS = (0.15,)


def probes(space: Space, name: str) -> list[Candidate]:
    """The layer's candidates nearest (in log scale) to each target error, without repeats."""
    # INT8 variants are not probed: their error is the float candidate's and int8.py's measured one
    cands = [c for c in space.alive(name) if not c.is_dense and not c.covers and c.error > 0 and not c.choice.int8]
    picked: list[Candidate] = []
    for target in TARGET_ERRORS:
        if cands:
            best = min(cands, key=lambda c: (abs(np.log(c.error / target)), c.params))
            if best not in picked:
                picked.append(best)
    return picked


def error_scales(space: Space, drop_of: Callable[[str, Candidate], float], on_probe=None,
                 jobs: int = 1) -> tuple[dict, dict]:
    """Per layer: the normalized slope, and the probes it came from ({spec, error, drop}).
    `jobs` probes are measured at once (threads: onnxruntime runs without the GIL); each is a
    model of its own, so the drops do not depend on how many run together."""
    wanted = [(name, cand) for name in sorted(space.candidates) for cand in probes(space, name)]

    def measure(item) -> float:
        drop = drop_of(*item)
        if on_probe:
            on_probe()
        return drop

    if jobs > 1 and len(wanted) > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(jobs) as pool:
            drops = list(pool.map(measure, wanted))
    else:
        drops = [measure(item) for item in wanted]
    slopes, measured = {}, {}
    for name in sorted(space.candidates):
        points = [{"spec": c.spec, "error": c.error, "drop": d} for (n, c), d in zip(wanted, drops) if n == name]
        if points:
            e = np.array([p["error"] for p in points]) ** 2     # the solver adds squared errors
            d = np.maximum(np.array([p["drop"] for p in points]), 0.0)
            slopes[name] = float(e @ d / (e @ e))
            measured[name] = points
    if not slopes:
        return {}, measured
    positive = [s for s in slopes.values() if s > 0]
    if not positive:                 # no probe lost anything: no layer is known to matter more
        return {n: 1.0 for n in slopes}, measured
    mean = float(np.mean(positive))
    floor = MIN_SLOPE_SHARE * mean
    return {n: max(s, floor) / mean for n, s in slopes.items()}, measured
