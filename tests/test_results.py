"""The results cache (results.py): entries, damaged and foreign ones, the size cap, and a second
optimize that reuses what the first computed and reaches the same model."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import denseflex_onnx
from denseflex_onnx import calibrate, results
from denseflex_onnx.calibrate import LayerStats
from denseflex_onnx.sketch import LowRankGram
from denseflex_onnx.profile import Budget

ROOT = Path(__file__).resolve().parent.parent
MLP, MLP_DATA = ROOT / "models/mnist_mlp.onnx", ROOT / "models/mnist_mlp_val.npz"
FAST = Budget(min_runs=3, max_runs=15, max_seconds=0.02)


def test_a_value_comes_back_only_for_its_own_key(tmp_path):
    store = results.Results(tmp_path, {"model": "abc"})
    store.put("errors", {"layer": "fc"}, {"svd:8": 0.25})
    assert store.get("errors", {"layer": "fc"}) == {"svd:8": 0.25}
    assert store.get("errors", {"layer": "fc2"}) is None
    assert results.Results(tmp_path, {"model": "abd"}).get("errors", {"layer": "fc"}) is None
    assert store.hits == {}                 # what this object wrote is not served from the cache's past
    later = results.Results(tmp_path, {"model": "abc"})
    assert later.get("errors", {"layer": "fc"}) == {"svd:8": 0.25} and later.hits == {"errors": 1}
    assert results.Results(None, {}).get("errors", {"layer": "fc"}) is None      # no folder: nothing kept


def test_a_truncated_or_foreign_entry_is_not_trusted(tmp_path, caplog):
    store = results.Results(tmp_path, {"model": "abc"})
    store.put("errors", {"layer": "a"}, {"svd:8": 0.25})
    store.put("errors", {"layer": "b"}, {"svd:8": 0.5})
    path_a, path_b = sorted(tmp_path.glob("*.json"), key=lambda p: json.loads(p.read_text())["key"]["layer"])
    path_a.write_bytes(path_a.read_bytes()[:20])                     # a write cut short
    path_b.write_text(json.dumps({"key": {"kind": "errors", "layer": "z"}, "value": {"svd:8": 9.0}}))
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        assert store.get("errors", {"layer": "a"}) is None
        assert store.get("errors", {"layer": "b"}) is None
    assert "unreadable" in caplog.text and "another entry" in caplog.text
    store.put("errors", {"layer": "a"}, {"svd:8": 0.25})               # computed again, stored again
    assert store.get("errors", {"layer": "a"}) == {"svd:8": 0.25}


def test_arrays_come_back_bit_for_bit_and_a_damaged_file_is_not_trusted(tmp_path, caplog):
    store = results.Results(tmp_path, {"model": "abc"})
    rng = np.random.default_rng(0)
    full = LayerStats(rng.standard_normal((5, 5)), rng.standard_normal(5), rng.random(5), 17)
    sketch = LayerStats(LowRankGram(0.3, np.linalg.qr(rng.standard_normal((6, 2)))[0], rng.random(2)),
                        rng.standard_normal(6), rng.random(6), 9)
    store.put_arrays("statistics", {"part": "all"}, calibrate.stats_to_arrays({"fc/1": full, "conv": sketch}))
    back = calibrate.stats_from_arrays(store.get_arrays("statistics", {"part": "all"}))
    assert list(back) == ["fc/1", "conv"]
    assert np.array_equal(back["fc/1"].gram, full.gram) and back["fc/1"].count == 17
    g = back["conv"].gram
    assert isinstance(g, LowRankGram) and g.sigma == 0.3 and np.array_equal(g.basis, sketch.gram.basis)
    assert np.array_equal(g.values, sketch.gram.values) and np.array_equal(back["conv"].total_abs, sketch.total_abs)
    assert store.get_arrays("statistics", {"part": "odd"}) is None
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        assert store.get_arrays("statistics", {"part": "all"}) is None
    assert "unreadable" in caplog.text
    other = results.Results(tmp_path, {"model": "xyz"})        # a file under another entry's name
    other.put_arrays("reference", {}, {"outputs": np.ones(3)})
    (moved,) = [p for p in tmp_path.glob("*.npz") if p != path]
    moved.rename(path)
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        assert store.get_arrays("statistics", {"part": "all"}) is None
    assert "another entry" in caplog.text


def test_trim_removes_the_least_recently_used_and_nothing_that_is_not_the_cache(tmp_path):
    (tmp_path / "results").mkdir()
    mine = tmp_path / "notes.txt"
    mine.write_text("not the cache's")
    paths = []
    for i in range(4):
        p = tmp_path / "results" / f"{i}.json"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (1000 + i, 1000 + i))
        paths.append(p)
    os.utime(paths[0], (5000, 5000))                   # read lately: kept longest
    assert results.trim(tmp_path, 2500) == 2
    assert [p.exists() for p in paths] == [True, False, False, True]
    assert results.clear(tmp_path) == 2
    assert mine.exists()


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """optimize on the bundled MLP with data, twice, one cache folder. A FLOPs limit and accuracy
    the objective, so that a verification measured again (a damaged entry) reaches the same verdict:
    a latency limit or objective would hang on a whole-model A/B that load can tip either way."""
    tmp = tmp_path_factory.mktemp("twice")
    options = dict(flops="-30%", objective="accuracy", max_accuracy_drop=1, data=MLP_DATA, cache_dir=tmp / "cache",
                   timing=FAST)
    first = denseflex_onnx.optimize(MLP, tmp / "a.onnx", **options)
    second = denseflex_onnx.optimize(MLP, tmp / "b.onnx", **options)
    return tmp, options, first, second


def test_a_second_run_reuses_errors_probes_and_verifications_and_gives_the_same_model(twice):
    tmp, _, first, second = twice
    assert first.report["stages"]["results_cached"] == {}
    hits = second.report["stages"]["results_cached"]
    scored = sum(1 for n, cands in _by_layer(first.report).items() if any(c["error"] for c in cands))
    assert hits["errors"] >= scored > 0
    assert hits["probe"] == sum(len(p["probes"]) for p in first.report["sensitivity"].values()) > 0
    assert hits["verified"] == len(first.report["verifications"]) > 0
    # statistics of the whole calibration set or of its two halves; the outputs on the evaluation
    # and probe samples; the chosen plan's held-out errors
    assert hits["statistics"] in (1, 2, 3) and hits["reference"] == 2 and hits["held-out errors"] == 1
    assert hits["solution"] >= 1                     # the solver is not run again either
    assert second.report["held_out_errors"] == first.report["held_out_errors"]
    assert second.report["verifications"] == first.report["verifications"]
    assert second.plan.to_json()["layers"] == first.plan.to_json()["layers"]
    assert (tmp / "b.onnx").read_bytes() == (tmp / "a.onnx").read_bytes()
    # and the plan re-applied gives those bytes too: a factorization does not depend on what the
    # run computed before it
    denseflex_onnx.apply(MLP, tmp / "again.onnx", plan_path=tmp / "a.plan.json", data=MLP_DATA)
    assert (tmp / "again.onnx").read_bytes() == (tmp / "a.onnx").read_bytes()


def test_damaged_entries_are_recomputed_to_the_same_plan(twice, tmp_path, caplog):
    tmp, options, first, _ = twice
    cache = tmp_path / "cache"
    subprocess.run(["cp", "-r", str(options["cache_dir"]), str(cache)], check=True)
    for p in sorted([*(cache / "results").glob("*.json"), *(cache / "results").glob("*.npz")])[::2]:
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        third = denseflex_onnx.optimize(MLP, tmp_path / "c.onnx", **{**options, "cache_dir": cache})
    assert "unreadable" in caplog.text
    assert third.plan.to_json()["layers"] == first.plan.to_json()["layers"]
    assert (tmp_path / "c.onnx").read_bytes() == (tmp / "a.onnx").read_bytes()


def test_cache_info_and_clear(twice, tmp_path):
    tmp, options, _, _ = twice
    cache = tmp_path / "cache"
    subprocess.run(["cp", "-r", str(options["cache_dir"]), str(cache)], check=True)
    run = lambda *a: subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", "cache", *a, "--cache-dir", str(cache)],
                                    capture_output=True, text=True)
    info = json.loads(run("info", "--json").stdout)
    held = [*(cache / "results").glob("*.json"), *(cache / "results").glob("*.npz")]
    assert info["timings"] == len(list(cache.glob("*.json"))) > 0
    assert info["results"] == len(held) > len(list((cache / "results").glob("*.npz"))) > 0
    assert info["bytes"] == sum(p.stat().st_size for p in [*cache.glob("*.json"), *held])
    r = run("clear")
    assert r.returncode == 0 and f"removed {info['timings'] + info['results']}" in r.stdout
    assert json.loads(run("info", "--json").stdout)["bytes"] == 0


def _by_layer(report):
    out = {}
    for c in report["candidates"]:
        if c["method"] != "dense":
            out.setdefault(c["layer"], []).append(c)
    return out


def test_a_bad_cache_size_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", "optimize", str(MLP), "-o", str(tmp_path / "o.onnx"),
                        "--latency", "-30%", "--cache-size", "lots", "--cache-dir", str(tmp_path / "c")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "--cache-size 'lots'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("o*"))


def test_two_runs_sharing_a_cache_folder_at_once_both_write_the_same_model(twice, tmp_path):
    """Two processes computing the same results into one folder at the same time (atomic writes,
    readers that never see half a file): both succeed with the same plan and bytes. The timings
    are the first run's, so that measurement noise cannot choose between plans."""
    tmp, options, first, _ = twice
    cache = tmp_path / "cache"
    (cache / "results").mkdir(parents=True)
    for p in options["cache_dir"].glob("*.json"):
        (cache / p.name).write_bytes(p.read_bytes())
    for p in (options["cache_dir"] / "results").glob("*.json"):
        if json.loads(p.read_text())["key"]["kind"] in ("verified", "original timing"):
            (cache / "results" / p.name).write_bytes(p.read_bytes())
    code = ("import sys, denseflex_onnx; from denseflex_onnx.profile import Budget; "
            "denseflex_onnx.optimize(sys.argv[1], sys.argv[2], flops='-30%', objective='accuracy', "
            "max_accuracy_drop=1, data=sys.argv[3], "
            "cache_dir=sys.argv[4], timing=Budget(min_runs=3, max_runs=15, max_seconds=0.02))")
    runs = [subprocess.Popen([sys.executable, "-c", code, str(MLP), str(tmp_path / f"{k}.onnx"), str(MLP_DATA),
                              str(cache)], stderr=subprocess.PIPE, text=True) for k in ("x", "y")]
    for r in runs:
        assert r.wait(timeout=600) == 0, r.stderr.read()
    assert (tmp_path / "x.onnx").read_bytes() == (tmp_path / "y.onnx").read_bytes() == (tmp / "a.onnx").read_bytes()
    assert not list(cache.rglob("*.tmp"))                  # no write left half done
