"""onnxruntime, as every stage uses it: providers, sessions, the IR versions it reads."""
from __future__ import annotations

import functools
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import UserError
from .model import PROTOBUF_LIMIT, first_line, save_external

log = logging.getLogger("denseflex_onnx")

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}


def resolve_provider(name: str) -> str:
    """`cpu`, `cuda`, `tensorrt` or a full EP name -> the EP name; UserError if not installed."""
    full = PROVIDER_ALIASES.get(name.lower(), name)
    available = ort.get_available_providers()
    if not full.endswith("ExecutionProvider"):
        raise UserError(f"unknown provider {name!r}: use cpu, cuda, tensorrt or a full name such as "
                        f"CPUExecutionProvider (installed: {', '.join(available)})")
    if full not in available:
        raise UserError(f"provider {full} is not installed in this onnxruntime {ort.__version__}; "
                        f"installed: {', '.join(available)}")
    return full


def device_of(provider: str) -> str:
    return "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"


def create_session(model: onnx.ModelProto | str | os.PathLike, provider: str = "CPUExecutionProvider",
                   threads: int = 1, engine_cache: Path | None = None) -> ort.InferenceSession:
    """A session on exactly this provider: a silent fallback (TensorRT to CUDA, say) is an error."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4      # errors come back as exceptions, shown as one line: no duplicate log
    provider_options: dict = {}
    if provider == "TensorrtExecutionProvider" and engine_cache is not None:
        engine_cache.mkdir(parents=True, exist_ok=True)
        provider_options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache)}
    providers = [(provider, provider_options)]
    if provider != "CPUExecutionProvider":
        providers.append(("CPUExecutionProvider", {}))   # for nodes the device cannot run
    try:
        if isinstance(model, onnx.ModelProto) and model.ByteSize() >= PROTOBUF_LIMIT:
            session = _session_by_path(model, options, providers)   # protobuf cannot hold it as bytes
        else:
            source = for_runtime(model).SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
            session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:
        raise UserError(f"onnxruntime cannot load the model on {provider}: {first_line(exc)}") from None
    if session.get_providers()[0] != provider:
        raise UserError(f"provider {provider} is listed by onnxruntime but could not start (it fell back to "
                        f"{session.get_providers()[0]}); check its libraries, or pick another --provider")
    return session


def _session_by_path(model: onnx.ModelProto, options, providers) -> ort.InferenceSession:
    """A model over 2 GB goes to onnxruntime as a file with external data, in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="denseflex-big-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        ir = model.ir_version
        model.ir_version = min(ir, max_ir_version())
        try:
            save_external(model, path, "model.onnx.data")
        finally:
            model.ir_version = ir
        return ort.InferenceSession(path, options, providers=providers)


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """The highest IR version the installed onnxruntime loads, found by trying."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    for version in range(onnx.IR_VERSION, 6, -1):
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        model.ir_version = version
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return version
        except Exception:
            continue
    return 7


def for_runtime(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with an IR version the installed onnxruntime reads (onnx may write a newer one)."""
    if model.ir_version > max_ir_version():
        model = onnx.ModelProto.FromString(model.SerializeToString()) if model.ByteSize() < PROTOBUF_LIMIT else model
        model.ir_version = max_ir_version()
    return model


def input_dtypes(session: ort.InferenceSession) -> dict[str, np.dtype]:
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
             "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}
    return {i.name: np.dtype(table.get(i.type, np.float32)) for i in session.get_inputs()}
