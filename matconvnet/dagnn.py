"""A MatConvNet DagNN (as ``DagNN.saveobj`` writes it) checked against the original networks and mapped, BY NAME,
to PyTorch state-dict tensors (reference: /work/shared/reference/matconvnet_models.md, sections 2-6 and 9).

``parse_dagnn`` turns the plain struct of ``prepare.matfile`` into a ``DagNN`` (layers by name, params by
name, unknown block fields such as the vendored ``init`` ignored). ``matconvnet.layout`` lists the ``Entry``s
of the original networks (every parameter, its owning layer, the shape and geometry it must have) and their ``Node``s
(every layer from the inputs to the features and the classifier, with what it reads).
``check_inventory``, ``check_wiring`` and ``convert`` check the names (exactly those), the wiring, every shape and
every geometry, then build:

    conv filter  h x w x Cin x Cout  -> Conv2d (Cout, Cin, h, w) / Conv1d (Cout, Cin, w) / Linear (Cout, Cin)
    BatchNorm    mult, bias, moments = [mu, sigma]  -> weight, bias, running_mean = mu,
                 running_var = sigma^2 - eps (the module's eps; clamped at 0 with a warning)

MatConvNet's test-mode BN computes mult / sigma * (x - mu) + bias with the stored sigma = sqrt(var + eps_train);
PyTorch computes weight / sqrt(running_var + eps) * (x - running_mean) + bias, so the rule above is exact.
Nothing here uses torch: the result is a dict of NumPy arrays (views of the file's arrays where possible).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models import spec
from prepare.matfile import describe
from utils.cli import UserError


class ConvertError(UserError):
    """The file is not the network the converter expects; the message names the file, layer/param and the rule."""


@dataclass
class Layer:
    name: str
    type: str
    inputs: list[str]
    outputs: list[str]
    params: list[str]
    block: dict[str, Any]


@dataclass
class DagNN:
    path: Path
    layers: dict[str, Layer]  # file order
    params: dict[str, np.ndarray]
    meta: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def fail(self, what: str) -> ConvertError:
        return ConvertError(f"{self.path}: {what}")

    def layer(self, name: str, kind: str) -> Layer:
        layer = self.layers.get(name)
        if layer is None:
            raise self.fail(f"layer {name!r} is missing (expected a {kind} layer of that name)")
        if layer.type != kind:
            raise self.fail(f"layer {name!r} is a {layer.type}, expected {kind}")
        return layer

    def number(self, layer: Layer, key: str, size: int | None = None) -> list[float]:
        value = np.asarray(layer.block.get(key, np.zeros(0)), dtype=np.float64).ravel()
        if value.size == 0:
            raise self.fail(f"layer {layer.name!r}: block field {key!r} is missing or empty")
        if size is not None and value.size == 1 and size > 1:
            value = np.repeat(value, size)  # MatConvNet expands a scalar stride / pad / pool size
        if size is not None and value.size != size:
            raise self.fail(f"layer {layer.name!r}: block.{key} has {value.size} values, expected {size}")
        return [float(v) for v in value]


# ------------------------------------------------------------------------------------------------ parsing
def _names(value: Any, where: str) -> list[str]:
    if isinstance(value, str):  # a 1-element cell written without the cell level
        return [value] if value else []
    if isinstance(value, np.ndarray) and value.size == 0:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConvertError(f"{where}: expected a cell array of names, got {describe(value)}")


def parse_dagnn(path: str | Path, net: dict[str, Any]) -> DagNN:
    """``net`` = {"layers", "params", "meta", ...} (the ``net`` variable, or the top-level variables)."""
    path = Path(path)
    layers_raw, params_raw = net.get("layers"), net.get("params")
    if isinstance(layers_raw, list) and layers_raw and not all(isinstance(x, dict) for x in layers_raw):
        raise ConvertError(f"{path}: 'layers' is a cell array: this is a MatConvNet SimpleNN file (e.g. "
                           f"imagenet-vgg-verydeep-16/19.mat), not a DagNN; SimpleNN/VGG files are not supported "
                           f"yet (expected the struct arrays layers/params of dagnn.DagNN.saveobj)")
    if not isinstance(layers_raw, list) or not isinstance(params_raw, list) or not layers_raw:
        raise ConvertError(f"{path}: not a MatConvNet DagNN (expected struct arrays 'layers' and 'params', got "
                           f"layers: {describe(layers_raw)}, params: {describe(params_raw)})")
    layers: dict[str, Layer] = {}
    for i, raw in enumerate(layers_raw):
        where = f"{path}: layers({i + 1})"
        missing = [k for k in ("name", "type", "inputs", "outputs", "params", "block") if k not in raw]
        if missing:
            raise ConvertError(f"{where}: missing field(s) {missing} (expected the fields written by "
                               f"DagNN.saveobj: name, type, inputs, outputs, params, block)")
        name = raw["name"]
        if not isinstance(name, str) or not isinstance(raw["type"], str):
            raise ConvertError(f"{where}: name and type must be strings")
        if name in layers:
            raise ConvertError(f"{where}: duplicate layer name {name!r}")
        block = raw["block"]
        block = {} if isinstance(block, (np.ndarray, list)) and len(block) == 0 else block
        if isinstance(block, list) and len(block) == 1:
            block = block[0]
        if block is None:  # a struct without fields (e.g. dagnn.SoftMax), as scipy reads it
            block = {}
        if not isinstance(block, dict):
            raise ConvertError(f"{where} ({name}): block must be a struct, got {describe(block)}")
        layers[name] = Layer(name, raw["type"], _names(raw["inputs"], f"{where} ({name}).inputs"),
                             _names(raw["outputs"], f"{where} ({name}).outputs"),
                             _names(raw["params"], f"{where} ({name}).params"), block)
    params: dict[str, np.ndarray] = {}
    for i, raw in enumerate(params_raw):
        if not isinstance(raw, dict) or "name" not in raw or "value" not in raw:
            raise ConvertError(f"{path}: params({i + 1}) has no name/value fields")
        name, value = raw["name"], raw["value"]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            raise ConvertError(f"{path}: param {name!r}: expected a single/double array, got {describe(value)}")
        if name in params:
            raise ConvertError(f"{path}: duplicate param name {name!r}")
        params[name] = value
    meta = net.get("meta")
    meta = meta[0] if isinstance(meta, list) and len(meta) == 1 else meta
    return DagNN(path, layers, params, meta if isinstance(meta, dict) else {})


# ------------------------------------------------------------------------------------------------ the spec
@dataclass
class Entry:
    """One tensor group of the target: a conv filter (+ bias) or a BatchNorm (3 params)."""
    kind: str  # conv2d | conv1d | linear | embed | bn
    layer: str  # the owning MatConvNet layer
    params: tuple[str, ...]  # its MatConvNet param names, in order
    key: str  # target module prefix (torch key without .weight)
    size: tuple[int, ...]  # conv: [h w Cin Cout]; bn: (C,)
    stride: int = 1
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    group: str = "new"  # "backbone" | "new" (BN eps source)


@dataclass(frozen=True)
class Node:
    """One layer of the original network's DAG: its name, type and what it reads, each input named by the layer
    that writes it (or a network input, ``data`` / ``data2``). ``var``: the output variable's name where the
    original code reads it by name (``pool5``, the test features ``fc1_1bn`` and ``fc5_2bn``)."""
    layer: str
    type: str  # dagnn.Conv, dagnn.BatchNorm, dagnn.ReLU, dagnn.Pooling, dagnn.Sum, dagnn.DropOut
    inputs: tuple[str, ...]
    var: str | None = None


NETWORK_INPUTS = ("data", "data2")  # the image and the one-hot sentence (test/getFeature2.m and the text loop)


# ------------------------------------------------------------------------------------------------ wiring
def check_wiring(dag: DagNN, nodes: list[Node]) -> None:
    """Every layer on the way from the network inputs to the features and the classifier has the original's type and
    reads what the original's reads. A variable is compared by the layer that writes it (the backbone's variable
    names come from MatConvNet's importer and are not known for certain), by name for the network inputs and
    ``Node.var``. Layers off that way (losses, LRN, RankLoss) are not read by the conversion and not checked."""
    producer: dict[str, str] = {}
    for layer in dag.layers.values():
        for var in layer.outputs:
            if var in producer:
                raise dag.fail(f"variable {var!r} is written by layers {producer[var]!r} and {layer.name!r}; in the "
                               f"original network one layer writes each variable")
            producer[var] = layer.name

    def source(var: str) -> str:  # who writes var, in the words of the message
        return f"the output of layer {producer[var]!r}" if var in producer else f"the network input {var!r}"

    for node in nodes:
        layer = dag.layers.get(node.layer)
        if layer is None:
            raise dag.fail(f"layer {node.layer!r} ({node.type}) of the original network is missing")
        if layer.type != node.type:
            raise dag.fail(f"layer {node.layer!r} is a {layer.type}, the original's is a {node.type}")
        if len(layer.outputs) != 1 or (node.var is not None and layer.outputs != [node.var]):
            want = repr(node.var) if node.var is not None else "one variable"
            raise dag.fail(f"layer {node.layer!r} writes {layer.outputs}, the original writes {want}")
        if len(layer.inputs) != len(node.inputs):
            raise dag.fail(f"layer {node.layer!r} reads {len(layer.inputs)} variables {layer.inputs}, the original "
                           f"reads {len(node.inputs)}")
        got = [(source(v), v) for v in layer.inputs]
        want = [f"the network input {w!r}" if w in NETWORK_INPUTS else f"the output of layer {w!r}"
                for w in node.inputs]
        if node.type == "dagnn.Sum":  # a sum does not depend on the order of its inputs: pair what differs
            unmatched, wrong = list(want), []
            for src, var in got:
                if src in unmatched:
                    unmatched.remove(src)
                else:
                    wrong.append((src, var))
            diff = list(zip(wrong, unmatched))
        else:
            diff = [(g, w) for g, w in zip(got, want) if g[0] != w]
        if diff:
            (src, var), expected = diff[0]
            raise dag.fail(f"layer {node.layer!r} reads variable {var!r} ({src}), the original reads {expected}")
        if node.type == "dagnn.ReLU" and "leak" in layer.block and dag.number(layer, "leak", 1) != [0.0]:
            raise dag.fail(f"layer {node.layer!r}: leak {dag.number(layer, 'leak', 1)[0]:g}, the original's ReLU has "
                           f"leak 0")


# ------------------------------------------------------------------------------------------------ geometry
def check_resnet_geometry(dag: DagNN) -> None:
    """pool1 = max 3x3 stride 2 pad [0 1 0 1] (Caffe ceil rounding); pool5 = avg 7x7 stride 1 pad 0."""
    for name, method, size, stride, pad in (("pool1", "max", [3, 3], [2, 2], [0, 1, 0, 1]),
                                            ("pool5", "avg", [7, 7], [1, 1], [0, 0, 0, 0])):
        layer = dag.layer(name, "dagnn.Pooling")
        got = (str(layer.block.get("method", "max")), dag.number(layer, "poolSize", 2),
               dag.number(layer, "stride", 2), dag.number(layer, "pad", 4))
        if got != (method, size, stride, pad):
            raise dag.fail(f"layer {name!r}: expected {method} pooling {size} stride {stride} pad {pad}, got "
                           f"{got[0]} {got[1]} stride {got[2]} pad {got[3]}")


def check_conv_block(dag: DagNN, e: Entry) -> None:
    """A conv layer's block (params, size, stride, pad, dilate, hasBias) against the target entry."""
    layer = dag.layer(e.layer, "dagnn.Conv")
    has_bias = len(e.params) == 2
    want = list(e.params)
    if layer.params != want:
        raise dag.fail(f"layer {e.layer!r} has params {layer.params}, expected {want}")
    size = dag.number(layer, "size", 4)
    if size != [float(v) for v in e.size]:
        raise dag.fail(f"layer {e.layer!r}: block.size {[int(v) for v in size]}, expected {list(e.size)}")
    stride, pad = dag.number(layer, "stride", 2), dag.number(layer, "pad", 4)
    if stride != [float(e.stride)] * 2 or pad != [float(p) for p in e.pad]:
        raise dag.fail(f"layer {e.layer!r}: stride {[int(s) for s in stride]} pad {[int(p) for p in pad]}, expected "
                       f"stride {[e.stride] * 2} pad {list(e.pad)} [top bottom left right]")
    if "dilate" in layer.block and dag.number(layer, "dilate", 2) != [1.0, 1.0]:
        raise dag.fail(f"layer {e.layer!r}: dilate {[int(d) for d in dag.number(layer, 'dilate', 2)]}, the original "
                       f"network's convolutions have dilate [1, 1]")
    if "hasBias" in layer.block and bool(np.asarray(layer.block["hasBias"]).ravel()[0]) != has_bias:
        raise dag.fail(f"layer {e.layer!r}: block.hasBias disagrees with its params {layer.params}")


def _shape_check(dag: DagNN, name: str, value: np.ndarray, want: tuple[int, ...]) -> None:
    if len(want) == 1 and value.size == want[0] and sum(d != 1 for d in value.shape) <= 1:
        return  # a vector: C x 1 as MatConvNet writes it, or 1 x C
    got = tuple(value.shape) + (1,) * (len(want) - value.ndim)
    while len(got) > len(want) and got[-1] == 1:
        got = got[:-1]
    if got != want:
        raise dag.fail(f"param {name!r} has size {list(value.shape)}, expected {list(want)}")


def check_inventory(dag: DagNN, entries: list[Entry], optional: tuple[str, ...] = ()) -> None:
    want = [p for e in entries for p in e.params]
    have = set(dag.params)
    missing = [p for p in want if p not in have]
    extra = sorted(have - set(want) - set(optional))
    if missing or extra:
        raise dag.fail(f"parameter inventory differs from the original network: expected {len(want)} params, the "
                       f"file has {len(have)}; missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
                       f"unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}")


# ------------------------------------------------------------------------------------------------ conversion
def bn_eps(dag: DagNN, entries: list[Entry]) -> float:
    """The one epsilon of the backbone BNs (read from every BN's block)."""
    # 6 significant digits: 1e-5 stored in single precision (9.99999974738e-06) is 1e-5
    distinct = sorted({float(f'{dag.number(dag.layer(e.layer, "dagnn.BatchNorm"), "epsilon", 1)[0]:.6g}')
                       for e in entries if e.kind == "bn" and e.group == "backbone"})
    if len(distinct) != 1:
        raise dag.fail(f"backbone BatchNorm layers use different epsilons {distinct}; the caffe-style backbone "
                       f"has one bn_eps")
    return distinct[0]


def convert(dag: DagNN, entries: list[Entry], backbone_eps: float) -> dict[str, np.ndarray]:
    """Check each entry's layer and shapes, then map to {torch key: array}. Pops the params it used."""
    out: dict[str, np.ndarray] = {}
    for e in entries:
        values = [dag.params.pop(p) for p in e.params]
        if e.kind == "bn":
            layer = dag.layer(e.layer, "dagnn.BatchNorm")
            if layer.params != list(e.params):
                raise dag.fail(f"layer {e.layer!r} has params {layer.params}, expected {list(e.params)}")
            c = e.size[0]
            for p, v, want in zip(e.params, values, ((c,), (c,), (c, 2))):
                _shape_check(dag, p, v, want)
            file_eps = dag.number(layer, "epsilon", 1)[0]
            eps = backbone_eps if e.group == "backbone" else spec.NEW_BN_EPS
            if e.group != "backbone" and not np.isclose(file_eps, spec.NEW_BN_EPS):
                dag.warnings.append(f"layer {e.layer!r}: epsilon {file_eps:g} (PyTorch module uses "
                                    f"{spec.NEW_BN_EPS:g}; running_var is set so that test-mode outputs are exact)")
            mult, bias, moments = values
            sigma = moments.reshape(c, 2, order="F")[:, 1].astype(np.float64)
            var = sigma ** 2 - eps
            # sigma stored as float32(sqrt(var + eps)): a zero-variance channel reads back ~1e-7 eps below eps, which
            # is rounding, not a short sigma (a never-updated new BN has sigma 0: var = -eps)
            short = var < -1e-4 * eps
            if short.any():
                dag.warnings.append(f"layer {e.layer!r}: {int(short.sum())} of {c} channels have sigma^2 < eps "
                                    f"({eps:g}); their running_var is clamped to 0")
            var = np.maximum(var, 0.0)
            out.update({f"{e.key}.weight": mult.ravel(order="F"), f"{e.key}.bias": bias.ravel(order="F"),
                        f"{e.key}.running_mean": moments.reshape(c, 2, order="F")[:, 0],
                        f"{e.key}.running_var": var.astype(np.float32),
                        f"{e.key}.num_batches_tracked": np.zeros((), dtype=np.int64)})
            continue
        check_conv_block(dag, e)
        f = values[0]
        _shape_check(dag, e.params[0], f, e.size)
        f = f.reshape(e.size, order="F")  # a view: restores trailing singleton dimensions
        h, w, cin, cout = e.size
        if e.kind == "conv2d":
            out[f"{e.key}.weight"] = f.transpose(3, 2, 0, 1)  # (Cout, Cin, h, w)
        elif e.kind == "conv1d":
            out[f"{e.key}.weight"] = f[0].transpose(2, 1, 0)  # (Cout, Cin, w); tap 0 <-> position t-1
        elif e.kind == "linear":
            out[f"{e.key}.weight"] = f.reshape(cin, cout, order="F").T  # (Cout, Cin), a C-contiguous view
        elif e.kind == "embed":
            table = np.zeros((cin + 1, cout), dtype=np.float32)  # row 0 = padding (all-zero one-hot column)
            table[1:] = f.reshape(cin, cout, order="F")
            out[f"{e.key}.weight"] = table
        if len(values) == 2:
            _shape_check(dag, e.params[1], values[1], (cout,))
            bias_key = spec.TEXT_EMBED_BIAS if e.kind == "embed" else f"{e.key}.bias"
            out[bias_key] = values[1].ravel(order="F")
    return out


def average_rgb(dag: DagNN) -> list[float]:
    """Per-channel mean (0-255 RGB) of meta.normalization.averageImage (1x1x3, 3x1 or an HxWx3 mean image)."""
    norm = dag.meta.get("normalization")
    norm = norm[0] if isinstance(norm, list) and len(norm) == 1 else norm
    img = norm.get("averageImage") if isinstance(norm, dict) else None
    if not isinstance(img, np.ndarray) or img.size == 0 or img.size % 3:
        raise dag.fail(f"meta.normalization.averageImage: expected a 1x1x3 RGB mean (or an HxWx3 mean image), "
                       f"got {describe(img) if img is not None else 'nothing'}")
    a = np.asarray(img, dtype=np.float64)
    if a.size == 3:
        return [float(v) for v in a.ravel(order="F")]
    if a.shape[-1] != 3:
        raise dag.fail(f"meta.normalization.averageImage: size {list(a.shape)}, expected HxWx3 (RGB last)")
    return [float(v) for v in a.reshape(-1, 3, order="F").mean(axis=0)]
