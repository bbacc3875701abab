"""data.py (CLI.md, Data): .npz checks, calibration/evaluation split, chunking, synthetic inputs;
and the bundled models reach their accuracy through onnxruntime on their .npz."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphs
import graphs_extra as gx
from denseflex_onnx import data as D
from denseflex_onnx import loading
from denseflex_onnx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def loaded(m, tmp_path, shapes=None, name="m.onnx"):
    return loading.load(graphs.save(m, tmp_path / name), shapes)


def npz(tmp_path, name="d.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.fixture
def gemm_model(tmp_path):
    """X [N, 12] float32 -> Y [N, 10]."""
    return loaded(graphs.gemm(12, 10), tmp_path, {"X": (1, 12)})


def floats(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------- load_data

def test_load_data_good(tmp_path, gemm_model):
    x, labels = floats(30, 12), np.arange(30) % 10
    ds = D.load_data(npz(tmp_path, X=x, labels=labels), gemm_model)
    assert ds.samples == 30 and not ds.synthetic and ds.fixed == {}
    np.testing.assert_array_equal(ds.arrays["X"], x)
    np.testing.assert_array_equal(ds.labels, labels)


def test_load_data_casts_within_a_kind(tmp_path, gemm_model):
    ds = D.load_data(npz(tmp_path, X=floats(5, 12).astype(np.float64)), gemm_model)
    assert ds.arrays["X"].dtype == np.float32 and ds.labels is None


def test_load_data_missing_input(tmp_path, gemm_model):
    with pytest.raises(UserError) as info:
        D.load_data(npz(tmp_path, x=floats(5, 12)), gemm_model)       # wrong name (case)
    assert "X" in str(info.value) and "--data" in str(info.value)


@pytest.mark.parametrize("shape", [(5, 11), (5, 12, 1), (12,), (5, 1, 12)])
def test_load_data_wrong_shape(tmp_path, gemm_model, shape):
    with pytest.raises(UserError) as info:
        D.load_data(npz(tmp_path, X=floats(*shape)), gemm_model)
    assert "X" in str(info.value) and "shape" in str(info.value)


def test_load_data_int_array_for_a_float_input(tmp_path, gemm_model):
    with pytest.raises(UserError) as info:
        D.load_data(npz(tmp_path, X=np.ones((5, 12), np.int64)), gemm_model)
    assert "X" in str(info.value) and "int64" in str(info.value)


def test_load_data_float_array_for_an_int_input(tmp_path):
    model = loaded(gx.gather_model(), tmp_path, {"ids": (1, 6)})
    with pytest.raises(UserError):
        D.load_data(npz(tmp_path, ids=floats(5, 6)), model)


@pytest.mark.parametrize("labels", [np.arange(29), np.arange(31), np.zeros((30, 1), np.int64)])
def test_load_data_labels_wrong_length(tmp_path, gemm_model, labels):
    with pytest.raises(UserError) as info:
        D.load_data(npz(tmp_path, X=floats(30, 12), labels=labels), gemm_model)
    assert "labels" in str(info.value) and "30" in str(info.value)


def test_load_data_float_labels(tmp_path, gemm_model):
    with pytest.raises(UserError) as info:
        D.load_data(npz(tmp_path, X=floats(30, 12), labels=np.zeros(30, np.float32)), gemm_model)
    assert "labels" in str(info.value)


def test_load_data_not_a_file(tmp_path, gemm_model):
    with pytest.raises(UserError):
        D.load_data(tmp_path / "none.npz", gemm_model)
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(UserError) as info:
        D.load_data(bad, gemm_model)
    assert str(bad) in str(info.value)


def test_load_data_different_sample_counts(tmp_path):
    model = loaded(gx.layer_and_attention(), tmp_path, {"X": (1, 12), "A": (1, 6, 12), "B": (1, 12, 5)})
    path = npz(tmp_path, X=floats(8, 12), A=floats(8, 6, 12), B=floats(7, 12, 5))
    with pytest.raises(UserError):
        D.load_data(path, model)


def test_array_without_sample_dim_is_fed_to_every_chunk(tmp_path):
    model = loaded(gx.with_state(12), tmp_path, {"X": (1, 12)})
    state = floats(2, 12, seed=3)
    ds = D.load_data(npz(tmp_path, X=floats(130, 12), S=state), model)
    assert set(ds.arrays) == {"X"} and set(ds.fixed) == {"S"}
    chunks = list(D.feeds(ds, model))
    assert sum(c["X"].shape[0] for c in chunks) == 130
    for c in chunks:
        np.testing.assert_array_equal(c["S"], state)
        assert gx.run(gx.with_state(12), c)[0].shape == c["X"].shape


def test_fixed_shape_state_input_does_not_set_the_batch(tmp_path):
    """X has a symbolic batch; S [2, K] is a state fed whole (no sample dim): chunks of 64, not of 2."""
    model = loaded(gx.with_state(12), tmp_path, {"X": (1, 12)})
    assert D.batching(model) == (2, True)          # alone, S looks like a fixed batch of 2
    assert D.batching(model, {"S"}) == (64, False)  # the data says S has no sample dim
    ds = D.load_data(npz(tmp_path, X=floats(130, 12), S=floats(2, 12)), model)
    assert [c["X"].shape[0] for c in D.feeds(ds, model)] == [64, 64, 2]


# ------------------------------------------------------------------------------------------ split

def test_split_is_disjoint_and_covers_everything(tmp_path, gemm_model):
    n = 300
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 12, axis=1)   # row i holds i: an id
    ds = D.load_data(npz(tmp_path, X=x, labels=np.arange(n)), gemm_model)
    calib, evaluation = D.split(ds, 128)
    assert calib.samples == 128 and evaluation.samples == n - 128
    calib_ids, eval_ids = set(calib.arrays["X"][:, 0]), set(evaluation.arrays["X"][:, 0])
    assert not calib_ids & eval_ids
    assert calib_ids | eval_ids == set(range(n))
    assert calib_ids == set(range(128))                  # the first samples calibrate
    np.testing.assert_array_equal(evaluation.labels, np.arange(128, n))
    assert calib.labels is not None and len(calib.labels) == 128


def test_split_with_fewer_samples_than_calibration_stays_disjoint(tmp_path, gemm_model, caplog):
    x = np.repeat(np.arange(50, dtype=np.float32)[:, None], 12, axis=1)
    ds = D.load_data(npz(tmp_path, X=x), gemm_model)
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        calib, evaluation = D.split(ds, 128)
    assert calib.samples > 0 and evaluation.samples > 0
    assert calib.samples + evaluation.samples == 50
    assert not set(calib.arrays["X"][:, 0]) & set(evaluation.arrays["X"][:, 0])
    assert caplog.records


def test_split_needs_two_samples(tmp_path, gemm_model):
    ds = D.load_data(npz(tmp_path, X=floats(1, 12)), gemm_model)
    with pytest.raises(UserError):
        D.split(ds, 128)


# ----------------------------------------------------------------------------------------- feeds

def test_fixed_batch_runs_in_chunks_of_b_and_drops_the_tail(tmp_path, caplog):
    model = loaded(gx.fixed_batch(batch=4), tmp_path)
    assert D.batching(model) == (4, True)
    x = np.repeat(np.arange(10, dtype=np.float32)[:, None], 12, axis=1)
    ds = D.load_data(npz(tmp_path, X=x), model)
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        chunks = list(D.feeds(ds, model))
    assert [c["X"].shape for c in chunks] == [(4, 12), (4, 12)]
    np.testing.assert_array_equal(np.concatenate([c["X"][:, 0] for c in chunks]), np.arange(8))
    assert any("2" in r.getMessage() for r in caplog.records)   # the dropped tail is reported
    # every chunk runs on the fixed-batch model
    session = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for c in chunks:
        assert session.run(None, c)[0].shape == (4, 10)


def test_fixed_batch_exact_multiple_no_warning(tmp_path, caplog):
    model = loaded(gx.fixed_batch(batch=4), tmp_path)
    ds = D.load_data(npz(tmp_path, X=floats(12, 12)), model)
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        chunks = list(D.feeds(ds, model))
    assert len(chunks) == 3 and not caplog.records


def test_symbolic_batch_runs_in_chunks_of_64(tmp_path, gemm_model):
    assert D.batching(gemm_model) == (64, False)
    ds = D.load_data(npz(tmp_path, X=floats(150, 12)), gemm_model)
    chunks = list(D.feeds(ds, gemm_model))
    assert [c["X"].shape[0] for c in chunks] == [64, 64, 22]


# ------------------------------------------------------------------------------------- synthetic

def test_synthetic_float_inputs(tmp_path, caplog):
    model = loaded(graphs.matmul(12, 10, lead=("N", "S")), tmp_path, {"X": (2, 5, 12)})
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        ds = D.synthetic_data(model, 40, seed=1)
    assert ds.synthetic and ds.labels is None and ds.samples == 40
    assert ds.arrays["X"].shape == (40, 5, 12) and ds.arrays["X"].dtype == np.float32
    assert abs(float(ds.arrays["X"].std()) - 1.0) < 0.1
    assert caplog.records                                 # says the metric is fidelity only
    again = D.synthetic_data(model, 40, seed=1)
    np.testing.assert_array_equal(ds.arrays["X"], again.arrays["X"])


@pytest.mark.parametrize("via_cast", [False, True])
def test_synthetic_integer_inputs_stay_inside_the_gather_table(tmp_path, via_cast):
    vocab = 7
    m = gx.gather_model(vocab=vocab, seq=6, via_cast=via_cast)
    model = loaded(m, tmp_path, {"ids": (1, 6)})
    ds = D.synthetic_data(model, 500, seed=0)
    ids = ds.arrays["ids"]
    assert ids.shape == (500, 6)
    assert ids.dtype == (np.int32 if via_cast else np.int64)
    assert ids.min() >= 0 and ids.max() < vocab
    assert len(np.unique(ids)) == vocab                   # the whole table is used
    # the ids really run through the model
    for chunk in D.feeds(ds.take(0, 64), model):
        gx.run(m, chunk)


def test_integer_input_without_gather_asks_for_data(tmp_path):
    model = loaded(gx.int_input_no_gather(), tmp_path, {"ids": (1, 6)})
    with pytest.raises(UserError) as info:
        D.synthetic_data(model, 10)
    assert "ids" in str(info.value) and "--data" in str(info.value)


# --------------------------------------------------------------------------- bundled model accuracy

@pytest.mark.parametrize("name,shape,minimum", [("mnist_mlp", (1, 784), 0.92), ("mnist_cnn", (1, 1, 28, 28), 0.95)])
def test_bundled_models_reach_their_accuracy(name, shape, minimum):
    model = loading.load(ROOT / f"models/{name}.onnx", {"x": shape})
    ds = D.load_data(ROOT / f"models/{name}_val.npz", model)
    assert ds.samples == 1000 and ds.labels is not None and len(ds.labels) == 1000
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(["logits"], chunk)[0] for chunk in D.feeds(ds, model)])
    assert logits.shape == (1000, 10)
    accuracy = float((logits.argmax(1) == ds.labels).mean())
    assert accuracy >= minimum, f"{name}: {accuracy:.3f} < {minimum}"


def _stateful(path):
    """y = [x @ W, sum over the state's first dim]: the state [2, batch, 3] is tied to x's batch."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("ReduceSum", ["state", "axes"], ["s"], keepdims=0),
             helper.make_node("Concat", ["h", "s"], ["y"], axis=1)]
    graph = helper.make_graph(nodes, "stateful",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                               helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 19])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_a_state_tied_to_a_symbolic_batch_is_fed_whole_at_the_given_batch(tmp_path):
    from denseflex_onnx import api, data as data_mod, loading
    path = _stateful(tmp_path / "s.onnx")
    x = np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)
    state = np.ones((2, 1, 3), np.float32)
    np.savez(tmp_path / "d.npz", x=x, state=state)
    loaded = loading.load(path, {"x": (1, 4), "state": (2, 1, 3)})
    dataset = data_mod.load_data(tmp_path / "d.npz", loaded)
    assert set(dataset.fixed) == {"state"} and dataset.samples == 40
    assert data_mod.batching(loaded, dataset.fixed) == (1, False)
    chunks = list(data_mod.feeds(dataset, loaded))
    assert len(chunks) == 40 and all(c["state"].shape == (2, 1, 3) and c["x"].shape == (1, 4) for c in chunks)
    summary = api.apply(path, tmp_path / "o.onnx", all_spec="svd:1.0", data=tmp_path / "d.npz",
                        input_shapes={"x": (1, 4), "state": (2, 1, 3)}, calib_samples=16)
    assert summary["metric"]["rewritten"] == pytest.approx(100.0, abs=1e-3)
