"""`denseflex-onnx inspect` as a user runs it (a subprocess): bad files, --json contract, shapes, MiniLM.

Each run is a fresh interpreter (about a second of imports), so every command this module needs is
started once, side by side, by the module fixture `runs`; the tests read the results by key.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import graphs
import graphs_extra as gx

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "models/mnist_mlp.onnx"
CNN = ROOT / "models/mnist_cnn.onnx"
MINILM = ROOT / "models/minilm.onnx"

TOP_KEYS = {"model", "opset", "ir_version", "inputs", "layers", "skipped", "totals", "pairs"}
PAIR_KEYS = {"producer", "consumer", "channels", "between"}
LAYER_KEYS = {"name", "op", "weight_shape", "activation_shape", "params", "flops", "params_share", "flops_share"}
SKIPPED_KEYS = {"name", "op", "reason"}


def cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "denseflex_onnx.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.strip()]


def assert_user_error(result: subprocess.CompletedProcess, *must_name: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    err = lines(result.stderr)
    assert 1 <= len(err) <= 2, result.stderr
    for text in must_name:
        assert text in result.stderr, (text, result.stderr)


MINILM_SHAPES = ["--input-shape", "input_ids:1x64", "--input-shape", "attention_mask:1x64",
                 "--input-shape", "token_type_ids:1x64"]
BAD_KINDS = ["missing", "folder", "empty", "text", "truncated"]
BRACKETS = ["model[v2].onnx", "model[/v2].onnx"]
BAD_SHAPES = [
    ("x:1x", "x:1x"),
    ("x:[a,b]", "x:[a,b]"),                       # echoed as given, brackets included
    ("y:1x784", "y"),                             # no such input
    ("x:1x783", "783"),                           # conflicts with the fixed dim
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    bad = root / "bad"
    bad.mkdir()
    folder = bad / "folder.onnx"
    folder.mkdir()
    (bad / "empty.onnx").write_bytes(b"")
    (bad / "notes.onnx").write_text("name,value\nthis is a text file, not an ONNX model\n" * 10)
    data = MLP.read_bytes()
    (bad / "truncated.onnx").write_bytes(data[: len(data) // 2])
    paths = {"missing": bad / "missing.onnx", "folder": folder, "empty": bad / "empty.onnx",
             "text": bad / "notes.onnx", "truncated": bad / "truncated.onnx",
             "seq": graphs.save(graphs.matmul(12, 10, lead=("N", "S")), root / "seq.onnx"),
             "attn": graphs.save(gx.layer_and_attention(), root / "attn.onnx"),
             "relu": graphs.save(gx.relu_only(), root / "relu.onnx"),
             "only_skipped": graphs.save(gx.two_input_matmul(), root / "only_skipped.onnx")}
    for name in BRACKETS:
        paths[name] = root / name                     # missing files whose names hold [...]
    return root, paths


@pytest.fixture(scope="module")
def runs(files):
    root, paths = files
    commands = {f"bad:{k}": (["inspect", paths[k]] + (["--json"] if k == "missing" else []), root / "bad")
                for k in BAD_KINDS}
    commands.update({f"brackets:{n}": (["inspect", paths[n]], root) for n in BRACKETS})
    commands.update({f"shape:{flag}": (["inspect", MLP, "--input-shape", flag, "--json"], root)
                     for flag, _ in BAD_SHAPES})
    commands.update({
        "seq": (["inspect", paths["seq"]], root),
        "mlp_json": (["inspect", MLP, "--json"], root),
        "mlp_batch8": (["inspect", MLP, "--input-shape", "x:[8,784]", "--json", "--quiet"], root),
        "mlp_table": (["inspect", MLP, "--input-shape", "x:1x784"], root),
        "mlp_quiet": (["inspect", MLP, "--quiet"], root),
        "cnn_json": (["inspect", CNN, "--json"], root),
        "attn_json": (["inspect", paths["attn"], "--json", "--input-shape", "X:2x12", "--input-shape",
                       "A:2x6x12", "--input-shape", "B:2x12x5"], root),
        "relu": (["inspect", paths["relu"], "--input-shape", "X:1x8"], root),
        "relu_json": (["inspect", paths["relu"], "--input-shape", "X:1x8", "--json"], root),
        "only_skipped": (["inspect", paths["only_skipped"], "--input-shape", "A:1x6x8", "--input-shape",
                          "B:1x8x5"], root),
    })
    if MINILM.exists():
        commands["minilm"] = (["inspect", MINILM, *MINILM_SHAPES, "--json"], root)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with ThreadPoolExecutor(min(8, 2 * (os.cpu_count() or 2))) as pool:
        futures = {key: pool.submit(cli, *args, cwd=cwd) for key, (args, cwd) in commands.items()}
        results = {key: f.result() for key, f in futures.items()}
    results["files_before"], results["files_after"] = before, sorted(
        str(p.relative_to(root)) for p in root.rglob("*"))
    return results


# ------------------------------------------------------------------------------------------ bad files

@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_is_a_user_error(files, runs, kind):
    _, paths = files
    result = runs[f"bad:{kind}"]
    assert_user_error(result, paths[kind].name)
    assert str(paths[kind]) in result.stderr.replace("\n", "")
    assert result.stdout == ""


def test_bad_files_create_no_output(runs):
    assert runs["files_before"] == runs["files_after"]


@pytest.mark.parametrize("name", BRACKETS)
def test_error_names_a_file_with_brackets_verbatim(runs, name):
    """The error line is plain text: a file name with [...] is printed as it is, never as markup."""
    assert_user_error(runs[f"brackets:{name}"], name)


# ------------------------------------------------------------------------------------- shape flags

@pytest.mark.parametrize("flag,must_name", BAD_SHAPES)
def test_bad_shape_flags(runs, flag, must_name):
    result = runs[f"shape:{flag}"]
    assert_user_error(result, must_name, "--input-shape")
    assert result.stdout == ""


def test_symbolic_non_leading_dim_error_through_cli(runs):
    assert_user_error(runs["seq"], "X", "dim 1", "--input-shape")


# ------------------------------------------------------------------------------------ inspect --json

MLP_DIMS = [(784, 1024), (1024, 1024), (1024, 512), (512, 10)]


@pytest.fixture(scope="module")
def mlp_json(runs):
    result = runs["mlp_json"]
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_inspect_json_keys_exactly_as_cli_md(mlp_json):
    assert set(mlp_json) == TOP_KEYS
    assert mlp_json["layers"] and all(set(l) == LAYER_KEYS for l in mlp_json["layers"])
    assert set(mlp_json["totals"]) == {"params", "flops"}
    assert mlp_json["pairs"] and all(set(p) == PAIR_KEYS for p in mlp_json["pairs"])
    assert isinstance(mlp_json["skipped"], list)


def test_inspect_json_bundled_mlp(mlp_json):
    d = mlp_json
    assert d["model"].endswith("mnist_mlp.onnx")
    assert d["opset"] == 17 and d["ir_version"] == 8
    assert d["inputs"] == {"x": [1, 784]}
    assert [l["op"] for l in d["layers"]] == ["Gemm"] * 4
    assert len({l["name"] for l in d["layers"]}) == 4
    assert [l["weight_shape"] for l in d["layers"]] == [list(s) for s in MLP_DIMS]
    assert [l["activation_shape"] for l in d["layers"]] == [[1, k] for k, _ in MLP_DIMS]
    assert [l["params"] for l in d["layers"]] == [k * n + n for k, n in MLP_DIMS]
    assert [l["flops"] for l in d["layers"]] == [2 * k * n for k, n in MLP_DIMS]
    assert d["skipped"] == []
    assert sum(k * n + n for k, n in MLP_DIMS) == 2383370
    assert d["totals"] == {"params": 2383370, "flops": sum(2 * k * n for k, n in MLP_DIMS)}
    assert sum(l["params_share"] for l in d["layers"]) == pytest.approx(1.0, abs=1e-4)
    assert sum(l["flops_share"] for l in d["layers"]) == pytest.approx(1.0, abs=1e-4)
    for l in d["layers"]:
        assert l["params_share"] == pytest.approx(l["params"] / d["totals"]["params"], abs=1e-5)
        assert l["flops_share"] == pytest.approx(l["flops"] / d["totals"]["flops"], abs=1e-5)


def test_inspect_json_at_a_given_batch(runs):
    result = runs["mlp_batch8"]
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["inputs"] == {"x": [8, 784]}
    assert [l["activation_shape"] for l in d["layers"]] == [[8, k] for k, _ in MLP_DIMS]
    assert d["totals"]["flops"] == 8 * sum(2 * k * n for k, n in MLP_DIMS)
    assert result.stderr == ""                           # no warning: the batch was given


def test_inspect_warns_on_stderr_and_keeps_stdout_json(runs):
    result = runs["cnn_json"]
    assert result.returncode == 0, result.stderr
    assert "symbolic" in result.stderr and "--input-shape" in result.stderr
    d = json.loads(result.stdout)
    assert [l["op"] for l in d["layers"]] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    assert d["layers"][0]["weight_shape"] == [32, 1, 3, 3]
    assert d["layers"][0]["activation_shape"] == [1, 1, 28, 28]
    assert d["totals"]["params"] == 458570


def test_inspect_table_and_quiet(runs):
    table = runs["mlp_table"]
    assert table.returncode == 0, table.stderr
    assert "Gemm" in table.stdout and "4 factorizable" in table.stdout
    quiet = runs["mlp_quiet"]
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""


def test_inspect_skipped_listed_with_reasons(runs):
    result = runs["attn_json"]
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    assert [l["name"] for l in d["layers"]] == ["fc"]
    assert len(d["skipped"]) == 1 and set(d["skipped"][0]) == SKIPPED_KEYS
    assert d["skipped"][0]["name"] == "attn" and d["skipped"][0]["reason"]
    assert d["totals"]["flops"] == 2 * 2 * 12 * 10 + 2 * 2 * 6 * 5 * 12


def test_inspect_nothing_to_factorize_exits_0_and_says_so(runs):
    result = runs["relu"]
    assert result.returncode == 0, result.stderr
    assert "nothing to factorize" in result.stdout
    as_json = runs["relu_json"]
    assert as_json.returncode == 0, as_json.stderr
    d = json.loads(as_json.stdout)
    assert d["layers"] == [] and d["totals"] == {"params": 0, "flops": 0}


def test_inspect_only_skipped_layers_exits_0(runs):
    result = runs["only_skipped"]
    assert result.returncode == 0, result.stderr
    assert "nothing to factorize" in result.stdout and "attn" in result.stdout


# --------------------------------------------------------------------------------------------- MiniLM

def test_inspect_minilm(runs):
    if not MINILM.exists():
        pytest.skip("models/minilm.onnx not exported: run models/export_minilm.py")
    result = runs["minilm"]
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["inputs"] == {"input_ids": [1, 64], "attention_mask": [1, 64], "token_type_ids": [1, 64]}
    assert len(d["layers"]) == 36 and {l["op"] for l in d["layers"]} == {"MatMul"}
    shapes = sorted(tuple(l["weight_shape"]) for l in d["layers"])
    assert shapes.count((384, 384)) == 24 and shapes.count((384, 1536)) == 6 and shapes.count((1536, 384)) == 6
    assert all(l["activation_shape"][:2] == [1, 64] for l in d["layers"])
    assert len({l["name"] for l in d["layers"]}) == 36
    assert len(d["skipped"]) == 12
    for s in d["skipped"]:
        assert s["op"] == "MatMul" and s["reason"]
        assert "attention" in s["name"]
    assert sum(l["params_share"] for l in d["layers"]) < 1.0        # embeddings are not layers
