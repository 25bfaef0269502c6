"""Synthetic MatConvNet DagNN files, written the way MatConvNet does, at reduced widths (tests only).

``resnet_net`` builds the Caffe ResNet-50 of ``imagenet-resnet-50-dag.mat`` (layer/param names, block fields with
the vendored ``init``, pool1 pad [0 1 0 1], stride 2 in branch2a); ``dual_path_net`` adds the authors' image head,
text CNN and shared classifier (reference section 4) for "flickr30k", "coco" (no fcshareb, 415 params) or "cuhk"
(L_max 56, fc5_1 pool [1 14]), with the Stage II LRN / RankLoss layers. Weights are random but well scaled; BN
moments are [mu, sigma] with sigma > 0. Block counts, widths and epsilons are ``models/spec.py``'s; the MatConvNet
names and the wiring are written out here from the reference, independently of the converter.

Writers: ``save_v5`` (scipy.io.savemat: struct arrays, cell arrays, ``oned_as='column'``, compressed) and
``save_v73`` (MATLAB's HDF5 layout: 512-byte user block with the MAT header, MATLAB_class attributes, cells and
struct-array fields as object references into ``#refs#``, axes reversed).
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import numpy as np

from models import spec


class Cell(list):
    """A MATLAB cell array (row)."""


class StructArray(list):
    """A MATLAB 1xN struct array (a list of dicts with the same keys)."""


# ------------------------------------------------------------------------------------------------ network builder
class NetBuilder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.layers: list[dict] = []
        self.params: dict[str, np.ndarray] = {}

    def add(self, name: str, type_: str, inputs: list[str], outputs: list[str], params: list[str],
            block: dict) -> None:
        self.layers.append({"name": name, "type": f"dagnn.{type_}", "inputs": Cell(inputs),
                            "outputs": Cell(outputs), "params": Cell(params), "block": block})

    def conv(self, name: str, x: str, out: str, size: tuple[int, int, int, int], pvar: list[str], *, bias: bool = False,
             stride: int = 1, pad: tuple[int, int, int, int] = (0, 0, 0, 0)) -> str:
        h, w, cin, cout = size
        self.params[pvar[0]] = (self.rng.standard_normal(size) * np.sqrt(2.0 / (h * w * cin))).astype(np.float32)
        if bias:
            self.params[pvar[1]] = (self.rng.standard_normal((cout, 1)) * 0.1).astype(np.float32)
        self.add(name, "Conv", [x], [out], pvar[:2 if bias else 1],
                 {"size": np.array([size], dtype=np.float64), "hasBias": bias, "opts": Cell([]),
                  "init": np.zeros((0, 0)), "pad": np.array([pad], dtype=np.float64),
                  "stride": np.array([[stride, stride]], dtype=np.float64), "dilate": np.array([[1.0, 1.0]])})
        return out

    def bn(self, name: str, x: str, out: str, c: int, pvar: list[str], eps: float) -> str:
        rng = self.rng
        self.params[pvar[0]] = rng.uniform(0.5, 1.5, (c, 1)).astype(np.float32)
        self.params[pvar[1]] = (rng.standard_normal((c, 1)) * 0.1).astype(np.float32)
        mu = rng.standard_normal(c) * 0.2
        sigma = rng.uniform(0.6, 1.6, c)
        self.params[pvar[2]] = np.asfortranarray(np.stack([mu, sigma], 1).astype(np.float32))  # C x 2
        self.add(name, "BatchNorm", [x], [out], pvar,
                 {"numChannels": float(c), "epsilon": eps, "opts": Cell([])})
        return out

    def relu(self, name: str, x: str, out: str) -> str:
        self.add(name, "ReLU", [x], [out], [], {"useShortCircuit": True, "leak": 0.0, "opts": Cell([])})
        return out

    def pool(self, name: str, x: str, out: str, size: tuple[int, int], method: str, stride: int,
             pad: tuple[int, int, int, int]) -> str:
        self.add(name, "Pooling", [x], [out], [],
                 {"method": method, "poolSize": np.array([size], dtype=np.float64), "opts": Cell([]),
                  "pad": np.array([pad], dtype=np.float64), "stride": np.array([[stride, stride]], dtype=np.float64)})
        return out

    def sum(self, name: str, a: str, b: str, out: str) -> str:
        self.add(name, "Sum", [a, b], [out], [], {"numInputs": 2.0})
        return out


def _ids(n: int) -> list[str]:
    """Caffe block names: a, b, c, ... (ResNet-50); a, b1, b2, ... for the long stages of ResNet-101/152."""
    return list(string.ascii_lowercase[:n]) if n <= 6 else ["a"] + [f"b{i}" for i in range(1, n)]


def resnet_net(width: float = 1 / 8, seed: int = 0, eps: float = spec.CAFFE_BN_EPS, fc1000: bool = True,
               blocks: tuple[int, ...] = spec.RESNET_BLOCKS["resnet50"]) -> NetBuilder:
    """imagenet-resnet-50-dag.mat (or -152 with spec.RESNET_BLOCKS["resnet152"]) at ``width`` (64*width channels
    after conv1)."""
    nb = NetBuilder(seed)
    base = spec.resnet_stem(width)
    x = nb.conv("conv1", "data", "conv1", (7, 7, 3, base), ["conv1_filter", "conv1_bias"], bias=True, stride=2,
                pad=(3, 3, 3, 3))
    x = nb.bn("bn_conv1", x, "bn_conv1", base, ["bn_conv1_mult", "bn_conv1_bias", "bn_conv1_moments"], eps)
    x = nb.relu("conv1_relu", x, "conv1x")
    x = nb.pool("pool1", x, "pool1", (3, 3), "max", 2, (0, 1, 0, 1))
    cin = base
    for s, (stage, n) in enumerate(zip((2, 3, 4, 5), blocks)):
        mid = base * 2 ** s
        out = spec.EXPANSION * mid
        for k, b in enumerate(_ids(n)):
            first = 2 if (k == 0 and stage > 2) else 1
            inp = x
            y = inp
            for branch, size, stride, pad in (("2a", (1, 1, cin, mid), first, 0), ("2b", (3, 3, mid, mid), 1, 1),
                                              ("2c", (1, 1, mid, out), 1, 0)):
                conv, bn = f"res{stage}{b}_branch{branch}", f"bn{stage}{b}_branch{branch}"
                y = nb.conv(conv, y, conv, size, [f"{conv}_filter"], stride=stride, pad=(pad,) * 4)
                y = nb.bn(bn, y, bn, size[3], [f"{bn}_mult", f"{bn}_bias", f"{bn}_moments"], eps)
                if branch != "2c":
                    y = nb.relu(f"{conv}_relu", y, f"{conv}x")
            if k == 0:
                conv, bn = f"res{stage}a_branch1", f"bn{stage}a_branch1"
                sc = nb.conv(conv, inp, conv, (1, 1, cin, out), [f"{conv}_filter"], stride=1 if stage == 2 else 2)
                sc = nb.bn(bn, sc, bn, out, [f"{bn}_mult", f"{bn}_bias", f"{bn}_moments"], eps)
            else:
                sc = inp
            x = nb.sum(f"res{stage}{b}", sc, y, f"res{stage}{b}")
            x = nb.relu(f"res{stage}{b}_relu", x, f"res{stage}{b}x")
            cin = out
    x = nb.pool("pool5", x, "pool5", (7, 7), "avg", 1, (0, 0, 0, 0))
    if fc1000:
        nb.conv("fc1000", x, "fc1000", (1, 1, cin, 10), ["fc1000_filter", "fc1000_bias"], bias=True)
        nb.add("prob", "SoftMax", ["fc1000"], ["prob"], [], {})
    nb.channels = cin  # type: ignore[attr-defined]
    return nb


def dual_path_net(kind: str = "flickr30k", *, width: float = 1 / 8, text_width: float = 1 / 8, dim: int = 32,
                  vocab: int = 12, classes: int = 7, stage: int = 2, seed: int = 0) -> NetBuilder:
    """A released network (Stage I or II) of ``kind`` flickr30k | coco | cuhk, at reduced widths."""
    nb = resnet_net(width, seed, fc1000=False)
    nb.layers = [layer for layer in nb.layers if layer["name"] not in ("fc1000", "prob")]
    e = spec.NEW_BN_EPS
    bnp = (lambda n: [f"{n}_w", f"{n}_b", f"{n}_m"])
    x = nb.conv("fc1", "pool5", "fc1", (1, 1, nb.channels, dim), ["fc1f"])  # type: ignore[attr-defined]
    x = nb.bn("fc1bn", x, "fc1bn", dim, bnp("fc1bn"), e)
    x = nb.relu("fc1x", x, "fc1bnx")
    x = nb.conv("fc1_1", x, "fc1_1", (1, 1, dim, dim), ["fc1_1f"])
    x = nb.bn("fc1_1bn", x, "fc1_1bn", dim, bnp("fc1_1bn"), e)
    img = nb.relu("fc1_1x", x, "fc1_1bnx")
    rate = {"flickr30k": 0.75, "coco": 0.5, "cuhk": 0.8}[kind]
    nb.add("dropout", "DropOut", [img], ["fc1_1bnxd"], [], {"rate": rate, "frozen": False})
    # text CNN
    emb = spec.EMBED_DIM
    t = nb.conv("fc2", "data2", "fc2", (1, 1, vocab, emb), ["fc2f", "fc2b"], bias=True)
    t = nb.bn("fc2bn", t, "fc2bn", emb, bnp("fc2bn"), e)

    def branch(main: str, x: str, cin: int, mid: int, cout: int, stride: int, first_bn_suffix: str) -> str:
        y = nb.conv(f"{main}_1", x, f"{main}_1", (1, 1, cin, mid), [f"{main}_1f"])
        y = nb.bn(f"{main}_1bn{first_bn_suffix}", y, f"{main}_1bn", mid, bnp(f"{main}_1bn"), e)
        y = nb.relu(f"{main}_1x", y, f"{main}_1bnx")
        y = nb.conv(f"{main}_2", y, f"{main}_2", (1, 2, mid, mid), [f"{main}_2f"], stride=stride, pad=(0, 0, 1, 0))
        y = nb.bn(f"{main}_2bn", y, f"{main}_2bn", mid, bnp(f"{main}_2bn"), e)
        y = nb.relu(f"{main}_2x", y, f"{main}_2bnx")
        y = nb.conv(f"{main}_3", y, f"{main}_3", (1, 1, mid, cout), [f"{main}_3f"])
        return nb.bn(f"{main}_3bn", y, f"{main}_3bn", cout, bnp(f"{main}_3bn"), e)

    def projection(prefix: str, main: str, x: str, cin: int, mid: int, cout: int, stride: int, out: str) -> str:
        y = branch(main, x, cin, mid, cout, stride, "")
        sc = nb.conv(f"{prefix}b", x, f"{prefix}b", (1, 1, cin, cout), [f"{prefix}bf"], stride=stride)
        sc = nb.bn(f"{prefix}bbn", sc, f"{prefix}bbn", cout, bnp(f"{prefix}bbn"), e)
        s = nb.sum(f"{prefix}sum", y, sc, f"{prefix}sum")
        return nb.relu(f"{prefix}x", s, out)

    stages = [(n, spec.text_width(m, text_width), spec.text_width(c, text_width), s)
              for n, m, c, s in spec.TEXT_STAGES["res50"]]  # (blocks, projection mid, out, stride)
    (_, m1, c1, s1), (n2, _, c2, _), (n3, _, c3, _), (_, _, c5, s5) = stages
    t = projection("fc2_1", "fc2_1", t, emb, m1, c1, s1, "fc2_1sumx")
    cin = c1
    for stage_i, (prefix, n_id, cout) in enumerate((("fc2", stages[0][0] - 1, c1), ("fc3", n2 - 1, c2),
                                                    ("fc4", n3 - 1, c3))):
        if stage_i > 0:  # the projection block into this stage
            q = {1: "fc2_4", 2: "fc3_5"}[stage_i]
            t = projection(q, f"{q}a", t, cin, cout, cout, stages[stage_i][3], f"{prefix}_1sumx")
            cin = cout
        for i in range(2, 2 + n_id):
            p = f"{prefix}_{i}"
            y = branch(p, t, cout, cout // 4, cout, 1, "_1")
            s = nb.sum(f"{p}sum", t, y, f"{p}sum")
            t = nb.relu(f"{p}x", s, f"{p}sumx")
    t = projection("fc4_7", "fc4_7a", t, cin, c5, c5, s5, "fc5_1sumx")
    max_len = 56 if kind == "cuhk" else 32
    t = nb.pool("fc5_1", t, "fc5_1bnx", (1, max_len // spec.text_downsample("res50")), "max", 1, (0, 0, 0, 0))
    t = nb.conv("fc5_2", t, "fc5_2", (1, 1, c5, dim), ["fc5_2f"])
    t = nb.bn("fc5_2bn", t, "fc5_2bn", dim, bnp("fc5_2bn"), e)
    txt = nb.relu("fc5_2x", t, "fc5_2bnx")
    nb.add("dropout2", "DropOut", [txt], ["fc5_2bnxd"], [], {"rate": rate, "frozen": False})
    bias = kind != "coco"
    share = ["fcsharef", "fcshareb"] if bias else ["fcsharef"]
    nb.conv("fc_img", "fc1_1bnxd", "prediction_img", (1, 1, dim, classes), share, bias=bias)
    nb.add("fc_txt", "Conv", ["fc5_2bnxd"], ["prediction_txt"], share, dict(nb.layers[-1]["block"]))
    for path, pred in (("img", "prediction_img"), ("txt", "prediction_txt")):
        nb.add(f"softmaxloss_{path}", "Loss", [pred, "label"], [f"objective_{path}"], [],
               {"loss": "softmaxlog", "opts": Cell([])})
    if stage == 2:
        lrn = {"param": np.array([[4096, 1e-8, 1, 0.5]])}
        nb.add("lrn1", "LRN", [img], ["fc1bn_n"], [], lrn)
        nb.add("lrn2", "LRN", [txt], ["fc2bn_n"], [], lrn)
        nb.add("RankLoss", "RankLoss", ["fc1bn_n", "fc2bn_n"], ["objective_f"], [],
               {"loss": "rankloss", "opts": Cell([]), "rate": 1.0})
    nb.kind, nb.max_len, nb.vocab = kind, max_len, vocab  # type: ignore[attr-defined]
    return nb


def net_struct(nb: NetBuilder, mean: np.ndarray) -> dict[str, Any]:
    """The saveobj struct: layers, vars, params, meta."""
    vars_ = sorted({v for layer in nb.layers for v in list(layer["inputs"]) + list(layer["outputs"])})
    return {"vars": StructArray({"name": v, "precious": False} for v in vars_),
            "params": StructArray({"name": k, "value": v, "learningRate": 1.0, "weightDecay": 1.0}
                                  for k, v in nb.params.items()),
            "layers": StructArray(nb.layers),
            "meta": {"normalization": {"averageImage": mean, "imageSize": np.array([[224.0, 224, 3]])},
                     "classes": {"name": Cell(["a", "b"])}}}


def plain(value: Any) -> Any:
    """The fixture structures in the readers' plain form (what the .mat readers return)."""
    if isinstance(value, StructArray):
        return [{k: plain(v) for k, v in item.items()} for item in value]
    if isinstance(value, Cell):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return [{k: plain(v) for k, v in value.items()}]
    if isinstance(value, (bool, float)):
        return np.array([[value]])
    return value


# ------------------------------------------------------------------------------------------------ v5 (scipy)
def _v5(value: Any) -> Any:
    if isinstance(value, StructArray):
        keys = list(value[0].keys()) if value else []
        arr = np.zeros((1, len(value)), dtype=[(k, object) for k in keys])
        for i, item in enumerate(value):
            for k in keys:
                arr[0, i][k] = _v5(item[k])
        return arr
    if isinstance(value, Cell):
        arr = np.zeros((1, len(value)), dtype=object)
        for i, item in enumerate(value):
            arr[0, i] = _v5(item)
        return arr
    if isinstance(value, dict):
        return {k: _v5(v) for k, v in value.items()}
    if isinstance(value, bool):
        return np.array([[value]])
    return value


def save_v5(path: Path, variables: dict[str, Any]) -> Path:
    from scipy.io import savemat
    savemat(str(path), {k: _v5(v) for k, v in variables.items()}, do_compression=True, oned_as="column")
    return path


# ------------------------------------------------------------------------------------------------ v7.3 (h5py)
MAT73_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 2026 HDF5 schema 1.00 ."


class _H5Writer:
    def __init__(self, f: Any) -> None:
        import h5py
        self.h5py, self.f, self.n = h5py, f, 0
        self.refs = f.require_group("#refs#")

    def _ref(self, value: Any) -> Any:
        self.n += 1
        name = f"r{self.n}"
        self.write(self.refs, name, value)
        return self.refs[name].ref

    def _refs(self, group: Any, name: str, refs: list, cls: str | None) -> None:
        data = np.empty((len(refs), 1), dtype=self.h5py.ref_dtype)  # MATLAB 1xN, axes reversed
        for i, r in enumerate(refs):
            data[i, 0] = r
        ds = group.create_dataset(name, data=data)
        if cls:
            ds.attrs["MATLAB_class"] = np.bytes_(cls)

    def _empty(self, group: Any, name: str, cls: str) -> None:
        ds = group.create_dataset(name, data=np.array([0, 0], dtype=np.uint64))
        ds.attrs["MATLAB_class"] = np.bytes_(cls)
        ds.attrs["MATLAB_empty"] = np.uint8(1)

    def write(self, group: Any, name: str, value: Any) -> None:
        if isinstance(value, StructArray):
            g = group.create_group(name)
            g.attrs["MATLAB_class"] = np.bytes_("struct")
            for k in value[0].keys():
                self._refs(g, k, [self._ref(item[k]) for item in value], None)
        elif isinstance(value, Cell):
            if not value:
                self._empty(group, name, "cell")
            else:
                self._refs(group, name, [self._ref(v) for v in value], "cell")
        elif isinstance(value, dict):
            g = group.create_group(name)
            g.attrs["MATLAB_class"] = np.bytes_("struct")
            for k, v in value.items():
                self.write(g, k, v)
        elif isinstance(value, str):
            if not value:
                self._empty(group, name, "char")
                return
            ds = group.create_dataset(name, data=np.array([[ord(c)] for c in value], dtype=np.uint16))
            ds.attrs["MATLAB_class"] = np.bytes_("char")
            ds.attrs["MATLAB_int_decode"] = np.int32(2)
        elif isinstance(value, bool):
            ds = group.create_dataset(name, data=np.array([[int(value)]], dtype=np.uint8))
            ds.attrs["MATLAB_class"] = np.bytes_("logical")
        else:
            arr = np.asarray(value, dtype=np.float64 if isinstance(value, (int, float)) else None)
            if arr.ndim < 2:
                arr = arr.reshape(-1, 1) if arr.ndim == 1 else arr.reshape(1, 1)
            cls = {np.dtype(np.float32): "single", np.dtype(np.float64): "double"}[arr.dtype]
            if arr.size == 0:
                self._empty(group, name, cls)
                return
            ds = group.create_dataset(name, data=np.ascontiguousarray(arr.T))  # MATLAB column-major = reversed
            ds.attrs["MATLAB_class"] = np.bytes_(cls)


def save_v73(path: Path, variables: dict[str, Any]) -> Path:
    import h5py
    with h5py.File(path, "w", userblock_size=512) as f:
        w = _H5Writer(f)
        for k, v in variables.items():
            w.write(f, k, v)
    with open(path, "r+b") as f:
        f.write(MAT73_HEADER.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")
    return path


def dictionary_struct(words: list[str], dim: int = 300, seed: int = 1, net: Any = None) -> dict[str, Any]:
    """make_dictionary.m's ``subset``: names (1xV cell), features (300xV single), is_appear. With ``net`` (a
    dual_path_net), the dictionary that net was trained from: its fc2f row v started as word v's vector and moved a
    little (here: 1 % noise), as the converter's check expects."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((dim, len(words)))
    if net is not None:
        rows = np.asarray(net.params["fc2f"], dtype=np.float64).reshape(len(words), dim, order="F")
        feats = rows.T + 0.01 * rows.std() * feats
    return {"is_appear": np.ones((1, 20), dtype=np.float32), "names": Cell(words),
            "features": np.asfortranarray(feats.astype(np.float32))}
