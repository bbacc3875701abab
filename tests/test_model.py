"""Stage 1 (model.py): shape flags, shape resolution, reading files, weight bytes, writing outputs."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
import graphs_extra as gx
from denseflex_onnx import loading, model as M
from denseflex_onnx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "models/mnist_mlp.onnx"


# ------------------------------------------------------------------------------------ --input-shape

@pytest.mark.parametrize("spec,want", [
    ("x:1x128", {"x": (1, 128)}),
    ("x:[1,128]", {"x": (1, 128)}),
    ("x:[1, 128]", {"x": (1, 128)}),
    ("x:2x3x4", {"x": (2, 3, 4)}),
    ("x:7", {"x": (7,)}),
    ("input_ids:[1,64]", {"input_ids": (1, 64)}),
    ("ns:name:1x2", {"ns:name": (1, 2)}),       # split on the last ':'
])
def test_parse_input_shapes_both_spellings(spec, want):
    assert M.parse_input_shapes([spec]) == want


def test_parse_input_shapes_several_and_none():
    assert M.parse_input_shapes(["a:1x2", "b:[3,4]"]) == {"a": (1, 2), "b": (3, 4)}
    assert M.parse_input_shapes(None) == {}
    assert M.parse_input_shapes([]) == {}
    # one flag, several inputs: commas inside brackets and a bare 1,128 stay dims
    assert M.parse_input_shapes(["a:1x2,b:[3,4],ns:c:5"]) == {"a": (1, 2), "b": (3, 4), "ns:c": (5,)}
    assert M.parse_input_shapes(["x:1,128"]) == {"x": (1, 128)}
    assert M.parse_input_shapes(["a:1x2, b:3"]) == {"a": (1, 2), "b": (3,)}


@pytest.mark.parametrize("spec", ["x", "x:", ":1x2", "1x2", "x:1xa", "x:a", "x:1x", "x:x1", "x:1x-2",
                                  "x:1.5x2", "x:[]", "x:0x2", "x:1x0", "x:1;2", "x:1 2"])
def test_parse_input_shapes_malformed(spec):
    with pytest.raises(UserError) as info:
        M.parse_input_shapes([spec])
    assert "--input-shape" in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------- shape resolution

def test_resolve_fixed_dims_and_given_shapes():
    m = gx.fixed_batch(batch=4)
    assert M.resolve_input_shapes(m, {}) == {"X": (4, 12)}
    assert M.resolve_input_shapes(m, {"X": (4, 12)}) == {"X": (4, 12)}
    m = graphs.matmul(lead=("N", "S"))
    assert M.resolve_input_shapes(m, {"X": (2, 5, 12)}) == {"X": (2, 5, 12)}


def test_resolve_unknown_input_name():
    with pytest.raises(UserError) as info:
        M.resolve_input_shapes(graphs.gemm(), {"nope": (1, 12)})
    assert "nope" in str(info.value) and "X" in str(info.value)


@pytest.mark.parametrize("given", [(1, 12, 1), (12,)])
def test_resolve_wrong_rank(given):
    with pytest.raises(UserError) as info:
        M.resolve_input_shapes(graphs.gemm(), {"X": given})
    msg = str(info.value)
    assert "X" in msg and str(len(given)) in msg and "2" in msg


def test_resolve_conflicting_fixed_dim():
    with pytest.raises(UserError) as info:
        M.resolve_input_shapes(graphs.gemm(12, 10), {"X": (1, 13)})
    msg = str(info.value)
    assert "X" in msg and "12" in msg and "13" in msg


def test_symbolic_leading_dim_defaults_to_one_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        shapes = M.resolve_input_shapes(graphs.gemm(12, 10, batch="batch"), {})
    assert shapes == {"X": (1, 12)}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "X" in text and "batch" in text and "--input-shape" in text


def test_no_warning_when_the_leading_dim_is_given(caplog):
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        M.resolve_input_shapes(graphs.gemm(12, 10), {"X": (8, 12)})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("dims,bad", [(("N", "S", 16), 1), ((1, 16, "T"), 2)])
def test_symbolic_non_leading_dim_is_an_error(dims, bad):
    with pytest.raises(UserError) as info:
        M.resolve_input_shapes(gx.symbolic_model(dims), {})
    msg = str(info.value)
    assert "X" in msg and f"dim {bad}" in msg and "--input-shape" in msg
    assert dims[bad] in msg                 # the dim's symbolic name


def test_symbolic_non_leading_dim_resolved_by_the_flag():
    assert M.resolve_input_shapes(gx.symbolic_model(("N", "S", 16)), {"X": (2, 9, 16)}) == {"X": (2, 9, 16)}


def test_unknown_dim_without_name_is_an_error():
    m = gx.symbolic_model((1, "S", 4))
    m.graph.input[0].type.tensor_type.shape.dim[1].Clear()   # neither value nor name
    with pytest.raises(UserError) as info:
        M.resolve_input_shapes(m, {})
    assert "dim 1" in str(info.value) and "--input-shape" in str(info.value)


# ------------------------------------------------------------------------------------------- load

def test_load_fields(tmp_path):
    path = graphs.save(graphs.matmul(12, 10, lead=("N", "S"), bias=True), tmp_path / "m.onnx")
    loaded = loading.load(path, {"X": (2, 5, 12)})
    assert loaded.path == path
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.input_shapes == {"X": (2, 5, 12)}
    assert loaded.shapes["X"] == (2, 5, 12) and loaded.shapes["H"] == (2, 5, 10)
    assert loaded.shapes["Y"] == (2, 5, 10) and loaded.shapes["W"] == (12, 10)
    assert loaded.external_data is False
    assert loaded.opset == 17 and loaded.ir_version == 8
    assert loaded.byte_size == (120 + 10) * 4


def test_load_bundled_mlp_default_batch(caplog):
    with caplog.at_level(logging.WARNING, logger="denseflex_onnx"):
        loaded = loading.load(MLP)
    assert loaded.input_shapes == {"x": (1, 784)}
    assert loaded.shapes["logits"] == (1, 10)
    assert any("x" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ bad files

def _bad_files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "folder.onnx"
    folder.mkdir()
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file, not an ONNX model\n" * 20)
    data = MLP.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    return {"missing": tmp_path / "missing.onnx", "folder": folder, "empty": empty, "text": text,
            "truncated": truncated}


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "text", "truncated"])
def test_read_model_bad_files(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(UserError) as info:
        M.read_model(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_read_model_missing_external_data(tmp_path):
    m = gx.mlp((64, 32, 4))
    path = tmp_path / "ext.onnx"
    M.write_model(m, path, external=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(UserError) as info:
        M.read_model(path)
    assert str(path) in str(info.value)


def test_read_model_invalid_graph(tmp_path):
    """A well-formed protobuf that fails the checker (a node reads a tensor nobody makes)."""
    m = graphs.gemm()
    m.graph.node[0].input[0] = "ghost"
    path = tmp_path / "invalid.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(UserError) as info:
        M.read_model(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------- weight bytes

def test_weight_bytes():
    assert M.weight_bytes(graphs.gemm(12, 10)) == (120 + 10) * 4
    assert M.weight_bytes(graphs.gemm(12, 10, dtype=np.float16)) == (120 + 10) * 2
    assert M.weight_bytes(graphs.gemm(12, 10, bias=None)) == 120 * 4
    assert M.weight_bytes(graphs.matmul(12, 10, weight_via="Constant")) == 120 * 4
    assert M.weight_bytes(graphs.matmul(12, 10, weight_via="Cast")) == 120 * 2


# ---------------------------------------------------------------------------------- writing files

def test_write_model_complete_and_reloadable(tmp_path):
    m = gx.mlp((20, 32, 5))
    path = tmp_path / "out.onnx"
    assert M.write_model(m, path) == [path]
    assert path.read_bytes() == m.SerializeToString()
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]          # no temporary file left behind
    again, external = M.read_model(path)
    assert external is False
    for a, b in zip(m.graph.initializer, again.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_write_model_external_data_beside_it(tmp_path):
    m = gx.mlp((64, 48, 5))
    weights = {i.name: numpy_helper.to_array(i).copy() for i in m.graph.initializer}
    path = tmp_path / "out.onnx"
    files = M.write_model(m, path, external=True)
    assert files == [path, tmp_path / "out.onnx.data"]
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    assert (tmp_path / "out.onnx.data").stat().st_size >= 64 * 48 * 4
    assert path.stat().st_size < 64 * 48 * 4            # the big weight is not inline
    again, external = M.read_model(path)
    assert external is True
    for i in again.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(i), weights[i.name])
    loaded = loading.load(path, {"X": (1, 64)})
    assert loaded.external_data is True


def test_write_model_external_leaves_the_model_in_memory_intact(tmp_path):
    """The caller's proto still holds its weights after writing it with external data
    (api.apply goes on to build an onnxruntime session from it)."""
    m = gx.mlp((64, 48, 5))
    before = m.SerializeToString()
    M.write_model(m, tmp_path / "out.onnx", external=True)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in m.graph.initializer)
    assert m.SerializeToString() == before


def test_write_model_overwrites_atomically(tmp_path):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"old")
    M.write_model(graphs.gemm(), path)
    assert onnx.load(str(path)).graph.node[0].op_type == "Gemm"
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_atomic_write_bytes(tmp_path):
    path = tmp_path / "f.bin"
    M.atomic_write_bytes(path, b"x" * 100_000)
    assert path.read_bytes() == b"x" * 100_000
    M.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        M.atomic_write_bytes(path, "not bytes")        # the write itself fails
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_interrupted_before_the_rename_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(M.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        M.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        M.atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").stat().st_mode & 0o777 == 0o644     # mkstemp made it 0o600


# --------------------------------------------------------------------------------- output paths

@pytest.fixture
def model_file(tmp_path):
    return graphs.save(graphs.gemm(), tmp_path / "in.onnx")


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): (b"<dir>" if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def test_check_output_path_accepts_a_new_file(tmp_path, model_file, monkeypatch):
    """A path that does not exist yet, in a writable folder, passes with or without --force, and
    the check itself writes nothing; once the file exists, only --force lets it through."""
    out, plan = tmp_path / "out.onnx", tmp_path / "out.plan.json"
    before = _tree(tmp_path)
    for force in (False, True):
        assert M.check_output_path(out, [model_file], force) is None
        assert M.check_output_path(out, [model_file], force, plan) is None
    (tmp_path / "sub").mkdir()
    before["sub"] = b"<dir>"
    assert M.check_output_path(tmp_path / "sub" / "out.onnx", [model_file], False) is None
    monkeypatch.chdir(tmp_path)                     # a bare file name: the folder is "."
    assert M.check_output_path(Path("out.onnx"), [model_file], False) is None
    assert _tree(tmp_path) == before                # nothing created (no temp, no probe), input intact
    assert not out.exists() and not plan.exists()
    # the same path, once something is there
    out.write_bytes(b"keep me")
    with pytest.raises(UserError) as info:
        M.check_output_path(out, [model_file], False)
    assert str(out) in str(info.value) and "--force" in str(info.value)
    assert M.check_output_path(out, [model_file], True) is None
    assert out.read_bytes() == b"keep me"           # checking is not writing, even with --force


@pytest.mark.parametrize("force", [False, True])
def test_check_output_path_refuses_the_input(tmp_path, model_file, force):
    with pytest.raises(UserError) as info:
        M.check_output_path(model_file, [model_file], force)
    assert "input" in str(info.value)
    # another spelling of the same file
    other = tmp_path / "sub" / ".." / "in.onnx"
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError):
        M.check_output_path(other, [model_file], force)
    assert model_file.read_bytes() == graphs.gemm().SerializeToString()


def test_check_output_path_existing_needs_force(tmp_path, model_file):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"x")
    with pytest.raises(UserError) as info:
        M.check_output_path(out, [model_file], False)
    assert "--force" in str(info.value) and str(out) in str(info.value)
    M.check_output_path(out, [model_file], True)


def test_check_output_path_related_files(tmp_path, model_file):
    out, plan = tmp_path / "out.onnx", tmp_path / "out.plan.json"
    plan.write_text("{}")
    with pytest.raises(UserError) as info:
        M.check_output_path(out, [model_file], False, plan)
    assert str(plan) in str(info.value)
    M.check_output_path(out, [model_file], True, plan)


def test_check_output_path_missing_folder(tmp_path, model_file):
    out = tmp_path / "nowhere" / "out.onnx"
    with pytest.raises(UserError) as info:
        M.check_output_path(out, [model_file], True)
    assert "nowhere" in str(info.value)
    assert not (tmp_path / "nowhere").exists()


def test_check_output_path_folder_as_output(tmp_path, model_file):
    with pytest.raises(UserError):
        M.check_output_path(tmp_path, [model_file], True)
