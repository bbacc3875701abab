"""Constraint strings of CLI.md: --latency, --memory, --flops, --max-accuracy-drop."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

OBJECTIVES = ("latency", "memory", "flops", "accuracy")
METRICS = ("accuracy", "agreement", "cosine")

_UNITS = {
    "latency": {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6},
    "memory": {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30},
    "flops": {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12},
}
_EXAMPLES = {"latency": "5ms, 500us, 0.2s, -30% or 0.7x", "memory": "10MB, 12MiB, -50% or 0.5x",
             "flops": "1.5G, 300M, -40% or 0.6x"}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


@dataclass(frozen=True)
class Limit:
    """An upper bound, absolute (seconds, bytes, FLOPs) or a ratio to the original model."""
    value: float
    relative: bool
    text: str

    def resolve(self, baseline: float) -> float:
        return self.value * baseline if self.relative else self.value


def parse_limit(kind: str, text: str | None) -> Limit | None:
    if text is None:
        return None
    t = text.strip().replace(" ", "")
    if m := re.fullmatch(r"-" + _NUMBER + "%", t):
        fraction = float(m.group(1)) / 100
        if not 0 < fraction < 1:
            raise UserError(f"--{kind} {text}: a reduction must be between 0% and 100%")
        return Limit(1 - fraction, True, text)
    if m := re.fullmatch(_NUMBER + "x", t, flags=re.IGNORECASE):
        ratio = float(m.group(1))
        if ratio <= 0:
            raise UserError(f"--{kind} {text}: the ratio must be positive")
        return Limit(ratio, True, text)
    if m := re.fullmatch(_NUMBER + r"([a-zA-Zµ]*)", t):
        unit = m.group(2).lower()
        if unit in _UNITS[kind]:
            value = float(m.group(1)) * _UNITS[kind][unit]
            if value <= 0:
                raise UserError(f"--{kind} {text}: must be positive")
            return Limit(value, False, text)
    raise UserError(f"--{kind} {text!r}: not understood; use {_EXAMPLES[kind]}")


def parse_memory_budget(text: str, flag: str = "--memory-budget") -> int:
    """--memory-budget (bytes the calibration statistics may hold) or another amount of bytes
    such as --cache-size: 8GB, 512MiB."""
    t = str(text).strip().replace(" ", "")
    m = re.fullmatch(_NUMBER + r"([a-zA-Z]*)", t)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS["memory"] or float(m.group(1)) * _UNITS["memory"][unit] < 1:
        raise UserError(f"{flag} {text!r}: give an amount such as 8GB, 512MiB or 2GiB")
    return int(float(m.group(1)) * _UNITS["memory"][unit])


def parse_accuracy_drop(text: str | float | None) -> float:
    """Points of the metric, 0..100 (`1` or `1%`)."""
    if text is None:
        return 1.0
    t = str(text).strip().rstrip("%")
    try:
        value = float(t)
    except ValueError:
        raise UserError(f"--max-accuracy-drop {text!r}: give points of the metric, e.g. 1 or 1%") from None
    if not 0 <= value <= 100:
        raise UserError(f"--max-accuracy-drop {text}: must be between 0 and 100")
    return value


@dataclass(frozen=True)
class Constraints:
    latency: Limit | None = None
    memory: Limit | None = None
    flops: Limit | None = None
    max_accuracy_drop: float = 1.0
    objective: str = "latency"

    @classmethod
    def parse(cls, latency=None, memory=None, flops=None, max_accuracy_drop=None, objective="latency"):
        if objective not in OBJECTIVES:
            raise UserError(f"--objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        return cls(parse_limit("latency", latency), parse_limit("memory", memory), parse_limit("flops", flops),
                   parse_accuracy_drop(max_accuracy_drop), objective)


def format_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} us"


def format_bytes(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def format_flops(f: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if f >= size:
            return f"{f / size:.2f} {unit}"
    return f"{f:.0f}"
