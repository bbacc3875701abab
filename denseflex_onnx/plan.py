"""Plans: which method and config each layer gets; specs and plan.json (CLI.md)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .passes import PASSES

from .errors import UserError

PLAN_FORMAT = "denseflex-plan/1"
FACTORIZATIONS = ("plain", "scaled", "whitened")
CALIBRATIONS = ("independent", "sequential")
# the INT8 modifier of a spec (`svd:64+int8`, `dense+int8`) and how its layers are quantized
INT8_SUFFIX = "+int8"
INT8_MODES = ("dynamic", "static")


@dataclass(frozen=True)
class Choice:
    method: str          # a key of passes.PASSES, or "dense"
    config: dict
    consumer: str | None = None   # a pair pass (prune): the pair's second layer, refitted with it
    int8: bool = False            # weights quantized to INT8 after the rewrite (rewrite.quantize)

    @property
    def spec(self) -> str:
        base = "dense" if self.method == "dense" else PASSES[self.method].spec(self.config)
        return base + INT8_SUFFIX if self.int8 else base

    @property
    def changes(self) -> bool:
        """Whether the layer differs from the original: a rewrite, INT8 weights, or both."""
        return self.method != "dense" or self.int8


DENSE = Choice("dense", {})


@dataclass
class Plan:
    layers: dict[str, Choice]                 # layers not listed stay dense
    factorization: str = "plain"
    model_sha256: str = ""
    notes: list[str] = field(default_factory=list)
    # data-aware plans: each layer fitted on the original model's inputs, or stage by stage on
    # the inputs of the model rewritten so far (sequential.py)
    calibration: str = "independent"
    int8: str = "dynamic"           # how the `+int8` layers are quantized (INT8_MODES; static needs data)

    def to_json(self) -> dict:
        out = {"format": PLAN_FORMAT, "model_sha256": self.model_sha256,
               "factorization": self.factorization, "calibration": self.calibration,
               "layers": {name: {"method": c.method, "config": c.config,
                                 **({"consumer": c.consumer} if c.consumer else {}),
                                 **({"int8": True} if c.int8 else {})}
                          for name, c in sorted(self.rewritten().items())}}
        if self.quantized():
            out["int8"] = self.int8
        return out

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json()["layers"], sort_keys=True).encode()).hexdigest()

    def rewritten(self) -> dict[str, Choice]:
        """The layers the plan changes (a `dense+int8` layer too)."""
        return {n: c for n, c in self.layers.items() if c.changes}

    def factorized(self) -> dict[str, Choice]:
        """The layers a pass rewrites (INT8 or not): what has factors to fit."""
        return {n: c for n, c in self.layers.items() if c.method != "dense"}

    def quantized(self) -> dict[str, Choice]:
        return {n: c for n, c in self.layers.items() if c.int8}

    def check_pairs(self) -> None:
        """A pruned pair rewrites two layers: neither may take another choice, nor be in a
        second pruned pair (the consumer is refitted on the original model's statistics)."""
        taken: dict[str, str] = {}
        for name, choice in sorted(self.rewritten().items()):
            if choice.consumer:
                for layer in (name, choice.consumer):
                    if layer in taken:
                        raise UserError(f"layer {layer} is in two pruned pairs ({taken[layer]} and "
                                        f"{name} -> {choice.consumer}): prune one of them")
                    taken[layer] = f"{name} -> {choice.consumer}"
        for name, choice in self.rewritten().items():
            if not choice.consumer and name in taken:
                raise UserError(f"layer {name} is in the pruned pair {taken[name]}: it cannot also take "
                                f"{choice.spec}")


def parse_spec(layer, text: str, pairs=None) -> Choice:
    """`svd:64`, `tt:0.25`, `conv_tt:16x32`, `prune:960`, `dense`... for this layer; UserError if
    it cannot take it. `pairs` (pairs.PairDiscovery) is where a pair pass finds the layer's pair."""
    text = text.strip()
    if text.endswith(INT8_SUFFIX):
        base = text[:-len(INT8_SUFFIX)]
        if not base or base.endswith(INT8_SUFFIX):
            raise UserError(f"{text!r}: {INT8_SUFFIX} follows one method spec, e.g. svd:64{INT8_SUFFIX} or dense{INT8_SUFFIX}")
        choice = parse_spec(layer, base, pairs)
        target = _target(PASSES[choice.method], layer, pairs) if choice.method != "dense" else layer
        reason = int8_refusal(target, choice.method)
        if reason:
            raise UserError(f"{text} cannot take layer {layer.name}: {reason}")
        return dataclasses.replace(choice, int8=True)
    if text == "dense":
        return DENSE
    method, _, body = text.partition(":")
    if method not in PASSES:
        raise UserError(f"{text!r}: unknown method {method!r}; use one of {', '.join(PASSES)} or dense")
    if not body:
        raise UserError(f"{text!r}: give a rank or fraction after the colon, e.g. {method}:0.25")
    module = PASSES[method]
    target = _target(module, layer, pairs)
    reason = module.applies(target)
    if reason:
        raise UserError(f"{method} cannot take layer {layer.name}: {reason}")
    consumer = target.consumer.name if target is not layer else None
    return Choice(method, module.parse_spec(target, body), consumer)


def int8_refusal(layer, method: str = "dense") -> str | None:
    """Why onnxruntime.quantization cannot give this layer (or pair), rewritten by `method`,
    INT8 weights, or None. Its dynamic quantizer takes a MatMul's weight on the right only."""
    if layer.scope:
        return "INT8 is applied in the main graph only, not inside If/Loop bodies"
    if layer.dtype != np.float32:
        return f"INT8 quantizes float32 weights, not {layer.dtype}"
    if getattr(layer, "side", "right") == "left":
        return "its weight multiplies from the left, which onnxruntime's dynamic quantization leaves in float"
    return UNQUANTIZABLE.get(method)


# methods whose rewrite onnxruntime's dynamic quantizer leaves (partly) in float
UNQUANTIZABLE = {"tt": "a TT chain multiplies its cores from the left, which onnxruntime's dynamic "
                       "quantization leaves in float"}


def _target(module, layer, pairs):
    """What the method rewrites: the layer, or for a pair pass the pair the layer heads."""
    if getattr(module, "TARGET", "layer") != "pair":
        return layer
    pair = pairs.pair(layer.name) if pairs is not None else None
    if pair is None:
        why = pairs.why_not(layer.name) if pairs is not None else "no pairs were searched"
        raise UserError(f"{module.NAME} cannot take layer {layer.name}: it heads no layer pair ({why}); "
                        f"`denseflex-onnx inspect` lists the pairs")
    return pair


def parse_layer_option(text: str) -> tuple[str, str]:
    """`NAME=SPEC`, split on the last `=` (layer names may hold one)."""
    name, sep, spec = text.rpartition("=")
    if not sep or not name or not spec:
        raise UserError(f"--layer {text!r}: expected NAME=SPEC, e.g. --layer fc1=svd:64")
    return name, spec


def read_plan(path: str | Path, layers_by_name: dict, pairs=None) -> Plan:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such plan file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a JSON plan ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT or not isinstance(data.get("layers"), dict):
        raise UserError(f"{path}: not a {PLAN_FORMAT} plan (needs \"format\" and \"layers\")")
    factorization = data.get("factorization", "plain")
    if factorization not in FACTORIZATIONS:
        raise UserError(f"{path}: factorization {factorization!r} is not one of {', '.join(FACTORIZATIONS)}")
    calibration = data.get("calibration", "independent")
    if calibration not in CALIBRATIONS:
        raise UserError(f"{path}: calibration {calibration!r} is not one of {', '.join(CALIBRATIONS)}")
    int8 = data.get("int8", "dynamic")
    if int8 not in INT8_MODES:
        raise UserError(f"{path}: int8 {int8!r} is not one of {', '.join(INT8_MODES)}")
    unknown = sorted(set(data["layers"]) - set(layers_by_name))
    if unknown:
        raise UserError(f"{path}: names layers the model does not have: {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''} (see `denseflex-onnx inspect`)")
    choices = {}
    for name, entry in data["layers"].items():
        try:
            method, config = entry["method"], entry.get("config", {})
        except (TypeError, KeyError):
            raise UserError(f"{path}: layer {name} needs a \"method\" and a \"config\"") from None
        quantized = entry.get("int8", False)
        if not isinstance(quantized, bool):
            raise UserError(f"{path}: layer {name}: \"int8\" must be true or false, not {quantized!r}")
        if method == "dense":
            if quantized:
                choices[name] = parse_spec(layers_by_name[name], "dense" + INT8_SUFFIX, pairs)
            continue
        if method not in PASSES:
            raise UserError(f"{path}: layer {name}: unknown method {method!r}")
        try:
            target = _target(PASSES[method], layers_by_name[name], pairs)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        reason = PASSES[method].applies(target)
        if reason:
            raise UserError(f"{path}: {method} cannot take layer {name}: {reason}")
        # the spec parser validates the config against the layer (ranks within bounds)
        spec = PASSES[method].spec(config) if _config_ok(method, config) else None
        if spec is None:
            raise UserError(f"{path}: layer {name}: malformed config {config!r} for {method}")
        choices[name] = parse_spec(layers_by_name[name], spec + (INT8_SUFFIX if quantized else ""), pairs)
        expected = entry.get("consumer")
        if expected is not None and expected != choices[name].consumer:
            raise UserError(f"{path}: layer {name}: the plan pairs it with {expected}, but in this model "
                            f"it pairs with {choices[name].consumer}")
    return Plan(choices, factorization, data.get("model_sha256", ""), calibration=calibration, int8=int8)


def _config_ok(method: str, config) -> bool:
    keys = {"svd": {"rank"}, "conv_svd": {"rank"}, "conv_tt": {"ranks"},
            "tt": {"in_modes", "out_modes", "ranks"}, "prune": {"keep"}}[method]
    return isinstance(config, dict) and keys <= set(config)


def write_json(data: dict, path: Path) -> None:
    from .model import atomic_write_bytes
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
