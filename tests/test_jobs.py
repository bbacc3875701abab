"""--jobs: layers scored and probes measured at once give bitwise what one job gives."""
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import denseflex_onnx
from denseflex_onnx import api, calibrate, sensitivity, space
from denseflex_onnx.profile import Budget
from tests.graphs import mlp, save
from tests.test_sensitivity import space_of

ROOT = Path(__file__).resolve().parent.parent
MLP, MLP_DATA = ROOT / "models/mnist_mlp.onnx", ROOT / "models/mnist_mlp_val.npz"
FAST = Budget(min_runs=3, max_runs=15, max_seconds=0.02)


def _scored(tmp_path, jobs, working_memory=None):
    path = save(mlp((48, 96, 64, 10), seed=1), tmp_path / "mlp.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, X=np.random.default_rng(0).standard_normal((96, 48)).astype(np.float32))
    prep = api._prepare(path, {"X": [1, 48]})
    calib, _ = api._dataset(prep.loaded, data, 64, 0)
    layers = list(prep.layers.values())
    stats = calibrate.collect(prep.loaded, layers, calib)
    factors = space.Factors(prep.layers, stats, "whitened")
    built = space.build(layers, factors, jobs=jobs, working_memory=working_memory)
    return {(c.layer, c.spec): (c.error, c.dropped) for c in built.all()}, built.stage_counts


def test_layers_scored_at_once_get_bitwise_the_errors_of_one_job(tmp_path):
    one, counts = _scored(tmp_path, jobs=1)
    three, counts3 = _scored(tmp_path, jobs=3)
    assert one == three and counts == counts3
    assert sum(1 for e, _ in one.values() if e > 0) > 10
    assert {name for name, _ in one} == {"fc0", "fc1", "fc2"}
    # a working memory smaller than any layer: one layer at a time, the same errors
    assert _scored(tmp_path, jobs=3, working_memory=1)[0] == one


def test_the_working_memory_bounds_what_runs_at_once():
    running, most = [0], [0]
    lock = threading.Lock()

    def work(item):
        with lock:
            running[0] += item
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= item
        return item * 10

    items = [3, 3, 3, 5, 1, 1]
    out = list(space._in_parallel(work, items, jobs=4, memory=6, cost=lambda i: i))
    assert out == [(i, 10 * i) for i in items]            # in order, every one
    assert most[0] <= 6 and most[0] >= 4                   # some ran together, never past the memory


def test_probes_measured_at_once_give_the_same_slopes():
    s = space_of({"a": [0.03, 0.1, 0.3], "b": [0.05, 0.2], "c": [0.1, 0.4]})
    drop = lambda name, cand: {"a": 2.0, "b": 6.0, "c": 0.5}[name] * cand.error ** 2
    assert sensitivity.error_scales(s, drop, jobs=3) == sensitivity.error_scales(s, drop, jobs=1)


def test_jobs_1_and_2_write_the_same_model(tmp_path):
    """Same timings (copied from the first run's cache, so timing noise cannot pick another
    plan), everything else computed afresh with one job and with two."""
    options = dict(latency="-30%", max_accuracy_drop=1, data=MLP_DATA, timing=FAST)
    first = denseflex_onnx.optimize(MLP, tmp_path / "one.onnx", cache_dir=tmp_path / "a", jobs=1, **options)
    (tmp_path / "b" / "results").mkdir(parents=True)
    for p in (tmp_path / "a").glob("*.json"):                             # candidate timings
        (tmp_path / "b" / p.name).write_bytes(p.read_bytes())
    for p in (tmp_path / "a" / "results").glob("*.json"):                 # end-to-end timings
        if json.loads(p.read_text())["key"]["kind"] in ("verified", "original timing"):
            (tmp_path / "b" / "results" / p.name).write_bytes(p.read_bytes())
    second = denseflex_onnx.optimize(MLP, tmp_path / "two.onnx", cache_dir=tmp_path / "b", jobs=2, **options)
    hits = second.report["stages"]["results_cached"]
    assert "errors" not in hits and "probe" not in hits and "statistics" not in hits     # really recomputed
    assert second.plan.to_json()["layers"] == first.plan.to_json()["layers"]
    assert second.report["sensitivity"] == first.report["sensitivity"]
    assert (tmp_path / "two.onnx").read_bytes() == (tmp_path / "one.onnx").read_bytes()


def test_jobs_below_one_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", "optimize", str(MLP), "-o", str(tmp_path / "o.onnx"),
                        "--latency", "-30%", "--jobs", "0"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: --jobs 0: must be at least 1"
    assert not (tmp_path / "o.onnx").exists()
