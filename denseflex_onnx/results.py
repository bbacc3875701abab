"""Results cache: what a run computed that the same inputs would compute again.

Layer-candidate errors, sensitivity probes and verified plans are pure functions of the model,
the data, the options that shape them and this package's code, and they are what a second run
of `optimize` spends its minutes on (MiniLM-L6: 47 s of errors, 65 s of probes, 25 s of
verifications in a 170 s run); so are the calibration statistics, the original model's outputs
and the report's held-out errors, what a warm run spent most of its remaining 25 s on. Each is
stored as one file named by the sha256 of its key (JSON; arrays as .npz), the key material
stored beside the value: an entry whose stored key is not the one asked for
(a hash collision, another tool's file), or that does not parse (a truncated write from a killed
run), is recomputed with a warning, never trusted. Writes are atomic (a reader never sees half a
file), so runs sharing a folder only ever race to write the same value.

The folder is capped (`--cache-size`, default 2 GB, with the profile timings beside it):
`trim` removes the least recently used entries (reads refresh a file's time) until it fits.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import threading
import zipfile
from pathlib import Path

import numpy as np

from .model import atomic_write_bytes

log = logging.getLogger("denseflex_onnx")

DEFAULT_SIZE = 2 << 30
FORMAT = 1


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of this package's and the passes' sources: a result computed by other code is
    another result (a version number does not change between a developer's edits)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("*.py"), *(root.parent / "passes").glob("*.py")]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class Results:
    """JSON values on disk under `folder`, keyed by `context` (what every entry of the run shares)
    plus what each one is; `None` folder: nothing is stored or read. `hits` counts reads served,
    by kind, of entries this object did not write (what an earlier run computed: a search that
    meets the same solver problem twice is not served by the cache's past)."""

    def __init__(self, folder: Path | None, context: dict):
        self.folder = folder
        self.context = {**context, "format": FORMAT, "code": code_digest()}
        self.hits: dict[str, int] = {}
        self._written: set[Path] = set()
        self._counting = threading.Lock()       # probes read entries from several threads (--jobs)

    def _key(self, kind: str, what: dict) -> dict:
        return {"kind": kind, **self.context, **what}

    def _path(self, key: dict, suffix: str = ".json") -> Path:
        text = json.dumps(key, sort_keys=True, default=str)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()}{suffix}"

    def _served(self, kind: str, path: Path) -> None:
        try:
            os.utime(path)               # recently used: the last to be trimmed
        except OSError:
            pass
        with self._counting:
            if path not in self._written:
                self.hits[kind] = self.hits.get(kind, 0) + 1

    def get(self, kind: str, what: dict):
        """The stored value, or None (absent, unreadable or foreign: then computed again)."""
        if self.folder is None:
            return None
        key = self._key(kind, what)
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("results cache: %s is unreadable (%s); computing it again", path, type(exc).__name__)
            return None
        if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key, default=str)):
            log.warning("results cache: %s holds another entry than its name says; computing it again", path)
            return None
        self._served(kind, path)
        return data["value"]

    def put(self, kind: str, what: dict, value) -> None:
        if self.folder is None:
            return
        key = self._key(kind, what)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        atomic_write_bytes(path, json.dumps({"key": key, "value": value}, default=str).encode())
        with self._counting:
            self._written.add(path)

    def get_arrays(self, kind: str, what: dict) -> dict[str, np.ndarray] | None:
        """Like `get`, for a value that is named arrays (put_arrays)."""
        if self.folder is None:
            return None
        key = self._key(kind, what)
        path = self._path(key, ".npz")
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("results cache: %s is unreadable (%s); computing it again", path, type(exc).__name__)
            return None
        stored_key = arrays.pop(KEY_ARRAY, None)
        if stored_key is None or json.loads(str(stored_key)) != json.loads(json.dumps(key, default=str)):
            log.warning("results cache: %s holds another entry than its name says; computing it again", path)
            return None
        self._served(kind, path)
        return arrays

    def put_arrays(self, kind: str, what: dict, arrays: dict[str, np.ndarray]) -> None:
        if self.folder is None:
            return
        key = self._key(kind, what)
        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{KEY_ARRAY: np.array(json.dumps(key, default=str))}, **arrays)
        path = self._path(key, ".npz")
        atomic_write_bytes(path, buf.getvalue())
        with self._counting:
            self._written.add(path)


KEY_ARRAY = "__key__"


def entries(folder: Path) -> list[Path]:
    """The cache's files (timings in `folder`, results in folder/results), temporary ones left by
    a killed write included; nothing else, so a mistyped --cache-dir loses no one's files."""
    out = []
    for where in (folder, folder / "results"):
        if where.is_dir():
            out += [p for pattern in ("*.json", "*.npz", ".*.tmp") for p in where.glob(pattern) if p.is_file()]
    return out


def size(folder: Path) -> int:
    return sum(_stat_size(p) for p in entries(folder))


def trim(folder: Path, limit: int) -> int:
    """Remove the least recently used files until the folder holds at most `limit` bytes;
    returns how many were removed. Files another run removes meanwhile are skipped."""
    files = []
    for p in entries(folder):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        files.append((st.st_mtime, st.st_size, p))
    total = sum(s for _, s, _ in files)
    removed = 0
    for _, s, p in sorted(files, key=lambda f: f[0]):
        if total <= limit:
            break
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        total -= s
        removed += 1
    return removed


def clear(folder: Path) -> int:
    return trim(folder, -1)


def _stat_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
