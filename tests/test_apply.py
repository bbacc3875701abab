"""`denseflex-onnx apply` through the CLI, as a subprocess, on the bundled MNIST MLP and CNN.

Each output is checked here with onnx and onnxruntime on their own: the full checker, runs at
batch 1 and 1000, the interface (input/output names, dtypes, symbolic batch), metadata_props,
the layers rewritten, accuracy on models/*_val.npz; and the exit codes of CLI.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import denseflex_onnx

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MLP, CNN = MODELS / "mnist_mlp.onnx", MODELS / "mnist_cnn.onnx"
MLP_DATA, CNN_DATA = MODELS / "mnist_mlp_val.npz", MODELS / "mnist_cnn_val.npz"
# one BLAS thread: on a small shared machine threaded OpenBLAS spins and a 1024x1024 SVD takes 10x longer
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
HIDDEN = ("/0/Gemm", "/2/Gemm", "/4/Gemm")        # the MLP's Gemm layers before the 512x10 head
HEAD = "/6/Gemm"
CONVS = ("/0/Conv", "/2/Conv", "/5/Conv")


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def accuracy(path, data) -> float:
    d = np.load(data)
    logits = session(path).run(["logits"], {"x": d["x"]})[0]
    return 100.0 * float(np.mean(logits.argmax(1) == d["labels"]))


def metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def node_names(model) -> set[str]:
    return {n.name for n in model.graph.node}


def check_output(original: Path, out: Path, data: Path, rewritten: dict[str, str], dense=()):
    """Valid, runs at batch 1 and 1000, interface and metadata as CLI.md says, layers rewritten."""
    model, before = onnx.load(str(out)), onnx.load(str(original))
    onnx.checker.check_model(model, full_check=True)
    assert [i.SerializeToString() for i in model.graph.input] == [i.SerializeToString() for i in before.graph.input]
    assert [o.SerializeToString() for o in model.graph.output] == [o.SerializeToString() for o in before.graph.output]
    assert model.graph.input[0].name == "x" and model.graph.output[0].name == "logits"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param          # batch still symbolic
    keys = metadata(model)
    assert keys["denseflex_onnx.version"] == denseflex_onnx.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", keys["denseflex_onnx.plan_sha256"])
    x = np.load(data)["x"]
    s = session(out)
    for batch in (x[:1], x[:1000]):
        y = s.run(["logits"], {"x": batch})[0]
        assert y.shape == (len(batch), 10) and np.all(np.isfinite(y))
    names = node_names(model)
    for layer, method in rewritten.items():
        assert layer not in names
        assert any(n.startswith(f"{layer}/{method}/") for n in names), (layer, method)
    old = {n.name: n for n in before.graph.node}
    new = {n.name: n for n in model.graph.node}
    inits_before = {t.name: t for t in before.graph.initializer}
    inits_after = {t.name: t for t in model.graph.initializer}
    for layer in dense:
        assert new[layer].SerializeToString() == old[layer].SerializeToString()
        for name in old[layer].input[1:]:
            assert inits_after[name].SerializeToString() == inits_before[name].SerializeToString()
    for layer in rewritten:       # the replaced weights are gone
        for name in old[layer].input[1:]:
            assert name not in inits_after
    return model


# --------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("apply")
    for src in (MLP, CNN):
        shutil.copy(src, folder / src.name)
    return folder


@pytest.fixture(scope="module")
def mlp_svd(work):
    """`--all svd:0.1` on the MLP, run once."""
    before = sha(work / MLP.name)
    result = cli("apply", work / MLP.name, "-o", work / "svd.onnx", "--all", "svd:0.1")
    assert result.returncode == 0, result.stderr
    assert sha(work / MLP.name) == before
    return work / "svd.onnx", result


def svd_plan(ranks):
    return {"format": "denseflex-plan/1", "model_sha256": "", "factorization": "plain",
            "layers": {name: {"method": "svd", "config": {"rank": r}} for name, r in ranks.items()}}


# hidden layers at 10% of full rank, written by hand (784x1024 -> 78, 1024x1024 -> 102, 1024x512 -> 51)
HIDDEN_PLAN = svd_plan({"/0/Gemm": 78, "/2/Gemm": 102, "/4/Gemm": 51})


@pytest.fixture(scope="module")
def mlp_plan(work):
    """`--plan` with svd:0.1 on the three hidden layers, the head left dense."""
    plan = work / "hidden.plan.json"
    plan.write_text(json.dumps(HIDDEN_PLAN))
    result = cli("apply", work / MLP.name, "-o", work / "hidden.onnx", "--plan", plan)
    assert result.returncode == 0, result.stderr
    return work / "hidden.onnx", result


# ------------------------------------------------------------------------------ the outputs

def test_all_svd_rank_one_head_loses_accuracy_and_layer_override_keeps_it(mlp_svd, work):
    """`--all svd:0.1` gives the 512x10 head rank round(0.1 x 10) = 1, as CLI.md's rounding says:
    a rank-1 map to 10 classes cannot classify. `--layer /6/Gemm=dense` on top of `--all`
    keeps the head and the accuracy within 1 point (the issue's acceptance check)."""
    out, _ = mlp_svd
    original = accuracy(MLP, MLP_DATA)
    assert original > 90
    assert accuracy(out, MLP_DATA) < original - 10
    kept = work / "svd_head_dense.onnx"
    result = cli("apply", work / MLP.name, "-o", kept, "--all", "svd:0.1", "--layer", f"{HEAD}=dense")
    assert result.returncode == 0, result.stderr
    assert accuracy(kept, MLP_DATA) >= original - 1.0


def _interface(graph) -> list[tuple]:
    """(name, elem_type, dims) of every graph input and output; a symbolic dim by its name."""
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in (*graph.input, *graph.output)]


def _summary_rows(stdout: str) -> dict[str, tuple[str, int, int, str]]:
    """The apply table: layer -> (spec, params before, params after, FLOPs column)."""
    rows = {}
    for line in stdout.splitlines():
        found = re.search(r"(/\d+/Gemm)\W+(svd:\d+)\W+([\d,]+) -> ([\d,]+)\W+"
                          r"([\d.]+(?: [kMG])? -> [\d.]+(?: [kMG])?)", line)
        if found:
            layer, spec, before, after, flops = found.groups()
            rows[layer] = (spec, int(before.replace(",", "")), int(after.replace(",", "")), flops)
    return rows


def _si(value: float, units) -> str:
    """As the CLI prints a count: two decimals in the largest unit it reaches."""
    for unit, size in units:
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def test_all_svd_output_is_valid(mlp_svd, work):
    """`--all svd:0.1` on the MLP: a valid model (full checker) with the original interface, each Gemm
    replaced by x @ A @ B + bias where A @ B is a best rank-r approximation of W^T (Eckart-Young,
    against numpy's SVD), onnxruntime on it equal to numpy on those reconstructed weights, and the
    printed summary (specs, params, FLOPs, weight bytes) equal to what the written graph holds."""
    out, result = mlp_svd
    layers = (*HIDDEN, HEAD)
    model = check_output(MLP, out, MLP_DATA, {name: "svd" for name in layers})
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    before = onnx.load(str(MLP))
    assert _interface(model.graph) == _interface(before.graph)
    assert _interface(model.graph) == [("x", onnx.TensorProto.FLOAT, ["batch", 784]),
                                       ("logits", onnx.TensorProto.FLOAT, ["batch", 10])]

    old_inits = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    new_inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    old_nodes = {n.name: n for n in before.graph.node}
    # nothing of the old weights left, nothing but each layer's two factors and its bias added
    assert set(new_inits) == {f"{layer}/svd/{part}" for layer in layers for part in ("A", "B", "bias")}
    rows = _summary_rows(result.stdout)
    assert set(rows) == set(layers), result.stdout
    chain = []
    for layer in layers:
        node = old_nodes[layer]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.op_type == "Gemm" and attrs == {"alpha": 1.0, "beta": 1.0, "transB": 1}, attrs
        w, bias = old_inits[node.input[1]], old_inits[node.input[2]]          # W [N, K]: y = x @ W^T + b
        n, k = w.shape
        rank = int(np.floor(0.1 * min(k, n) + 0.5))                             # CLI.md: a fraction of min(K, N)
        a, b, new_bias = (new_inits[f"{layer}/svd/{part}"] for part in ("A", "B", "bias"))
        assert a.dtype == b.dtype == new_bias.dtype == np.float32
        assert a.shape == (k, rank) and b.shape == (rank, n), (layer, a.shape, b.shape)
        np.testing.assert_array_equal(new_bias, bias)
        target = w.T.astype(np.float64)
        recon = a.astype(np.float64) @ b.astype(np.float64)
        sv = np.linalg.svd(target, compute_uv=False)
        best = float(np.sqrt(np.sum(sv[rank:] ** 2)))       # no rank-r matrix is closer (Frobenius)
        err = float(np.linalg.norm(target - recon))
        assert best * (1 - 1e-4) <= err <= best * 1.02 + 1e-6, (layer, err, best)   # randomized SVD: ~1.006
        # the summary row: spec, params of the dense layer and of what the graph now holds for it
        spec, p_before, p_after, flops = rows[layer]
        assert spec == f"svd:{rank}"
        assert p_before == w.size + bias.size
        assert p_after == a.size + b.size + new_bias.size
        # FLOPs at the batch apply defaults to (1): 2 x MACs of x @ W^T before, x @ A then @ B after
        g = (("G", 1e9), ("M", 1e6), ("k", 1e3))
        assert flops == f"{_si(2 * k * n, g)} -> {_si(2 * (k * rank + rank * n), g)}", (layer, flops)
        chain.append((recon, new_bias.astype(np.float64)))
    weights_before = sum(v.nbytes for v in old_inits.values())
    weights_after = sum(v.nbytes for v in new_inits.values())
    b_units = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
    assert f"weights {_si(weights_before, b_units)} -> {_si(weights_after, b_units)};" in result.stdout

    # onnxruntime on the written model against numpy on the reconstructed weights (Gemm, ReLU, ..., Gemm)
    assert [n.op_type for n in before.graph.node] == ["Gemm", "Relu"] * 3 + ["Gemm"]
    x = np.load(MLP_DATA)["x"][:512]
    h = x.astype(np.float64)
    for i, (recon, bias) in enumerate(chain):
        h = h @ recon + bias
        if i < len(chain) - 1:
            h = np.maximum(h, 0.0)
    (y,) = session(out).run(["logits"], {"x": x})
    assert y.dtype == np.float32 and y.shape == (len(x), 10)
    np.testing.assert_allclose(y, h, rtol=1e-4, atol=1e-4 * float(np.abs(h).max()))


def test_plan_round_trip(mlp_plan, mlp_svd, work):
    """A plan.json written by hand (CLI.md format): its layers rewritten, the rest untouched,
    and the factors the same as `--all` writes for those layers."""
    out, _ = mlp_plan
    model = check_output(MLP, out, MLP_DATA, {name: "svd" for name in HIDDEN}, dense=(HEAD,))
    all_model = onnx.load(str(mlp_svd[0]))
    ours = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith(HIDDEN)}
    theirs = {t.name: numpy_helper.to_array(t) for t in all_model.graph.initializer if t.name.startswith(HIDDEN)}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    # 78 * (784 + 1024) + 102 * (1024 + 1024) + 51 * (1024 + 512) + biases
    params = sum(v.size for v in ours.values())
    assert params == 78 * 1808 + 102 * 2048 + 51 * 1536 + 1024 + 1024 + 512
    assert metadata(model)["denseflex_onnx.plan_sha256"] != metadata(all_model)["denseflex_onnx.plan_sha256"]


def test_plan_hidden_layers_keep_accuracy(mlp_plan):
    out, _ = mlp_plan
    assert accuracy(out, MLP_DATA) >= accuracy(MLP, MLP_DATA) - 1.0


def test_layer_options_give_the_plan_hash(work):
    """The same choices by --layer and by --plan: the same plan hash and the same graph."""
    small = svd_plan({HEAD: 4})
    (work / "head.plan.json").write_text(json.dumps(small))
    a = cli("apply", work / MLP.name, "-o", work / "head_plan.onnx", "--plan", work / "head.plan.json")
    b = cli("apply", work / MLP.name, "-o", work / "head_layer.onnx", "--layer", f"{HEAD}=svd:4")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    ma, mb = onnx.load(str(work / "head_plan.onnx")), onnx.load(str(work / "head_layer.onnx"))
    assert metadata(ma)["denseflex_onnx.plan_sha256"] == metadata(mb)["denseflex_onnx.plan_sha256"]
    assert ma.graph.SerializeToString() == mb.graph.SerializeToString()
    check_output(MLP, work / "head_layer.onnx", MLP_DATA, {HEAD: "svd"}, dense=HIDDEN)


@pytest.mark.parametrize(("model", "data", "spec", "method", "layers", "dense"), [
    (MLP, MLP_DATA, "tt:0.1", "tt", (*HIDDEN, HEAD), ()),
    (CNN, CNN_DATA, "conv_svd:0.25", "conv_svd", CONVS, ("/9/Gemm", "/11/Gemm")),
    (CNN, CNN_DATA, "conv_tt:0.25", "conv_tt", CONVS, ("/9/Gemm", "/11/Gemm")),
], ids=["tt-mlp", "conv_svd-cnn", "conv_tt-cnn"])
def test_each_method_gives_a_valid_model(work, model, data, spec, method, layers, dense):
    src = work / model.name
    before = sha(src)
    out = work / f"{method}.onnx"
    result = cli("apply", src, "-o", out, "--all", spec)
    assert result.returncode == 0, result.stderr
    assert sha(src) == before
    check_output(model, out, data, {name: method for name in layers}, dense)
    if model == CNN:
        # the Gemm layers the conv method cannot take are listed as left dense
        text = " ".join(result.stdout.split())
        for name in dense:
            assert f"{name}: left dense" in text


def test_conv_methods_keep_cnn_accuracy_at_half_rank(work):
    out = work / "cnn_half.onnx"
    result = cli("apply", work / CNN.name, "-o", out, "--layer", "/2/Conv=conv_svd:0.5",
                 "--layer", "/5/Conv=conv_tt:0.5")
    assert result.returncode == 0, result.stderr
    check_output(CNN, out, CNN_DATA, {"/2/Conv": "conv_svd", "/5/Conv": "conv_tt"}, ("/0/Conv", "/9/Gemm"))
    assert accuracy(out, CNN_DATA) >= accuracy(CNN, CNN_DATA) - 1.0


def test_rank_above_full_in_all_leaves_that_layer_dense(work):
    """conv_svd:40 on the CNN: /0/Conv (1->32, 3x3) has full rank 9, so it stays dense with a note;
    the other two are rewritten and the command succeeds."""
    out = work / "above.onnx"
    result = cli("apply", work / CNN.name, "-o", out, "--all", "conv_svd:40")
    assert result.returncode == 0, result.stderr
    assert re.search(r"/0/Conv: left dense .*full rank 9", " ".join(result.stdout.split()))
    check_output(CNN, out, CNN_DATA, {"/2/Conv": "conv_svd", "/5/Conv": "conv_svd"}, ("/0/Conv",))


def test_data_aware_plan(work):
    """A whitened plan needs --data: without it exit 2, with it a valid model."""
    plan = {**svd_plan({HEAD: 5}), "factorization": "whitened"}
    (work / "whitened.plan.json").write_text(json.dumps(plan))
    bad = cli("apply", work / MLP.name, "-o", work / "w.onnx", "--plan", work / "whitened.plan.json")
    assert bad.returncode == 2 and "--data" in bad.stderr and "Traceback" not in bad.stderr
    assert not (work / "w.onnx").exists()
    good = cli("apply", work / MLP.name, "-o", work / "w.onnx", "--plan", work / "whitened.plan.json",
               "--data", MLP_DATA)
    assert good.returncode == 0, good.stderr
    check_output(MLP, work / "w.onnx", MLP_DATA, {HEAD: "svd"}, HIDDEN)


# ---------------------------------------------------------------------------- user errors

def user_error(result):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert "error" in result.stderr.lower()


def test_existing_output_needs_force(work):
    out = work / "exists.onnx"
    out.write_bytes(b"not a model")
    result = cli("apply", work / MLP.name, "-o", out, "--layer", f"{HEAD}=svd:2")
    user_error(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "--force" in lines[0]
    assert out.read_bytes() == b"not a model"
    forced = cli("apply", work / MLP.name, "-o", out, "--layer", f"{HEAD}=svd:2", "--force")
    assert forced.returncode == 0, forced.stderr
    check_output(MLP, out, MLP_DATA, {HEAD: "svd"}, HIDDEN)


def test_output_is_never_the_input(work):
    before = sha(work / MLP.name)
    user_error(cli("apply", work / MLP.name, "-o", work / MLP.name, "--layer", f"{HEAD}=svd:2", "--force"))
    assert sha(work / MLP.name) == before


def test_layer_rank_above_full_rank(work):
    out = work / "above_layer.onnx"
    user_error(cli("apply", work / MLP.name, "-o", out, "--layer", f"{HEAD}=svd:11"))
    assert not out.exists()


def test_all_with_a_method_no_layer_takes(work):
    out = work / "none.onnx"
    user_error(cli("apply", work / MLP.name, "-o", out, "--all", "conv_svd:0.5"))
    assert not out.exists()


def test_plan_naming_an_unknown_layer(work):
    plan = work / "unknown.plan.json"
    plan.write_text(json.dumps(svd_plan({"/no/such/Gemm": 4, HEAD: 4})))
    out = work / "unknown.onnx"
    result = cli("apply", work / MLP.name, "-o", out, "--plan", plan)
    user_error(result)
    assert "/no/such/Gemm" in result.stderr
    assert not out.exists()


# the same errors through the Python API (in process: fast); the CLI maps UserError to exit 2
@pytest.mark.parametrize("kwargs", [
    {"layer_specs": ["/no/such=svd:2"]},
    {"layer_specs": [f"{HEAD}=conv_svd:2"]},
    {"layer_specs": [f"{HEAD}=svd:0"]},
    {"layer_specs": [f"{HEAD}=svd:1.5"]},
    {"layer_specs": [f"{HEAD}=tt:16x32,2x5:33"]},
    {"all_spec": "nope:2"},
    {},
    {"all_spec": "svd:0.5", "plan_path": "plan.json"},
], ids=["unknown-layer", "wrong-method", "rank-0", "fraction-above-1", "tt-bond-above-max", "unknown-method",
        "no-choice", "plan-and-all"])
def test_other_user_errors(work, tmp_path, kwargs):
    out = tmp_path / "err.onnx"
    with pytest.raises(denseflex_onnx.UserError):
        denseflex_onnx.apply(work / MLP.name, out, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("text", [
    "{",
    json.dumps({"format": "other", "layers": {}}),
    json.dumps({"format": "denseflex-plan/1", "layers": {HEAD: {"method": "svd", "config": {}}}}),
    json.dumps({"format": "denseflex-plan/1", "layers": {HEAD: {"method": "nope", "config": {"rank": 2}}}}),
    json.dumps({"format": "denseflex-plan/1", "layers": {HEAD: {"method": "conv_svd", "config": {"rank": 2}}}}),
    json.dumps({**svd_plan({HEAD: 2}), "factorization": "fancy"}),
    json.dumps(svd_plan({HEAD: 11})),
    json.dumps({"format": "denseflex-plan/1", "layers": {}}),
], ids=["not-json", "wrong-format", "no-rank", "unknown-method", "wrong-method", "bad-factorization",
        "above-full", "empty"])
def test_malformed_plans(work, tmp_path, text):
    plan = tmp_path / "bad.plan.json"
    plan.write_text(text)
    with pytest.raises(denseflex_onnx.UserError):
        denseflex_onnx.apply(work / MLP.name, tmp_path / "bad.onnx", plan_path=plan)
    assert not (tmp_path / "bad.onnx").exists()


def test_api_metric_matches_onnxruntime(work, tmp_path):
    """apply with --data reports accuracy before/after on the held-out part (after the first 128
    calibration samples): the same numbers onnxruntime gives here."""
    out = tmp_path / "metric.onnx"
    summary = denseflex_onnx.apply(work / MLP.name, out, layer_specs=[f"{HEAD}=svd:5"], data=MLP_DATA)
    d = np.load(MLP_DATA)
    x, labels = d["x"][128:], d["labels"][128:]
    ours = [100.0 * float(np.mean(session(p).run(["logits"], {"x": x})[0].argmax(1) == labels)) for p in (MLP, out)]
    assert summary["metric"]["kind"] == "accuracy"
    assert summary["metric"]["original"] == pytest.approx(ours[0], abs=1e-9)
    assert summary["metric"]["rewritten"] == pytest.approx(ours[1], abs=1e-9)
    assert summary["rewritten"][0]["layer"] == HEAD and summary["rewritten"][0]["spec"] == "svd:5"
    assert summary["rewritten"][0]["params"] == [5120 + 10, 5 * (512 + 10) + 10]


def test_apply_with_data_fits_whitened_by_default_and_takes_factorization(tmp_path):
    """`apply --all SPEC --data D` is data-aware like optimize (whitened); --factorization plain
    gives the plain SVD; a plan's own factorization cannot be overridden."""
    import graphs
    from denseflex_onnx import api
    from denseflex_onnx.errors import UserError
    model = graphs.save(graphs.mlp((20, 32, 24, 5)), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((96, 20)) * np.linspace(0.1, 3, 20)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x)
    fits = {}
    for mode in (None, "plain", "whitened"):
        out = tmp_path / f"{mode}.onnx"
        summary = api.apply(model, out, all_spec="svd:4", data=tmp_path / "d.npz", factorization=mode,
                            calib_samples=64)
        fits[mode] = (summary["factorization"], onnx.load(str(out)))
    assert fits[None][0] == "whitened" and fits["plain"][0] == "plain"
    weights = {m: {i.name: numpy_helper.to_array(i) for i in p.graph.initializer} for m, (_, p) in fits.items()}
    assert all(np.array_equal(weights[None][k], weights["whitened"][k]) for k in weights[None])
    assert any(not np.allclose(weights[None][k], weights["plain"][k]) for k in weights[None] if k in weights["plain"])
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"format": "denseflex-plan/1", "factorization": "whitened",
                                "layers": {"fc0": {"method": "svd", "config": {"rank": 4}}}}))
    with pytest.raises(UserError, match="whitened plan: --factorization plain"):
        api.apply(model, tmp_path / "q.onnx", plan_path=plan, data=tmp_path / "d.npz", factorization="plain")
