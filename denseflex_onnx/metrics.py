"""The end-to-end metric a plan is judged by (CLI.md: --metric, --output)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .data import Dataset, feeds
from .errors import UserError
from .model import LoadedModel


def default_metric(data: Dataset) -> str:
    return "accuracy" if data.labels is not None else "cosine"


def output_index(session: ort.InferenceSession, name: str | None) -> int:
    names = [o.name for o in session.get_outputs()]
    if name is None:
        return 0
    if name not in names:
        raise UserError(f"--output {name}: the model has no such output; its outputs are {', '.join(names)}")
    return names.index(name)


def outputs(session: ort.InferenceSession, data: Dataset, model: LoadedModel, output: str | None) -> np.ndarray:
    """One output over every chunk of the data, concatenated along the sample dim."""
    name = session.get_outputs()[output_index(session, output)].name
    parts = [session.run([name], chunk)[0] for chunk in feeds(data, model)]
    return np.concatenate(parts) if parts else np.zeros((0,))


def score(kind: str, result: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> float:
    """0..100: top-1 accuracy on labels, top-1 agreement with the original, or 100 x mean cosine."""
    if kind == "accuracy":
        if labels is None:
            raise UserError("--metric accuracy needs `labels` in the --data file")
        n = min(len(result), len(labels))
        return float(100.0 * np.mean(np.argmax(result[:n].reshape(n, -1), axis=-1) == labels[:n]))
    if kind == "agreement":
        n = len(result)
        return float(100.0 * np.mean(np.argmax(result.reshape(n, -1), axis=-1)
                                     == np.argmax(reference.reshape(n, -1), axis=-1)))
    a = result.reshape(len(result), -1).astype(np.float64)
    b = reference.reshape(len(reference), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300), 1.0)
    return float(100.0 * np.mean(cos))
