"""The conversion itself: a MatConvNet DagNN file -> a caffe-style backbone state dict + sidecar, or a DualPath
checkpoint, after every check of ``matconvnet.dagnn`` against ``matconvnet.layout`` (the command line is
``matconvnet/__main__.py``, which imports this module only after parsing its arguments).
"""
from __future__ import annotations

import datetime
import re
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from matconvnet import dagnn as mn
from matconvnet import layout
from models import spec
from prepare import matfile
from prepare.core import check_file, dictionary_sha256, file_digest, load_json
from prepare.dictionary import GivenDictionary, read_given_dictionary
from utils.files import atomic_write, write_json

CONVERTER = "matconvnet"
CONVERTER_VERSION = 1


# ------------------------------------------------------------------------------------------------ helpers
def load_dagnn(path: Path):
    """Read only what the converter needs: ``net`` (a trained checkpoint) or layers/params/meta (ImageNet file)."""
    check_file(path, "MatConvNet file")
    names = matfile.variables(path)
    if "net" in names:
        struct = matfile.one(matfile.load(path, ["net"])["net"], f"{path}: net")
    elif "layers" in names:
        struct = matfile.load(path, [n for n in ("layers", "params", "meta") if n in names])
    else:
        raise mn.ConvertError(f"{path}: not a MatConvNet network (variables {names}; expected 'net' as in "
                              f"net-epoch-N.mat, or 'layers'/'params'/'meta' as in imagenet-resnet-50-dag.mat)")
    return mn.parse_dagnn(path, struct)


def _to_torch(arrays: dict[str, Any]) -> dict[str, Any]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays from the reader: copied by load_state_dict
        for k in list(arrays):
            a = arrays.pop(k)
            a = np.ascontiguousarray(a, dtype=np.int64 if a.dtype == np.int64 else np.float32)
            out[k] = torch.from_numpy(a)
    return out


def backbone_key(key: str) -> str:
    """torchvision ResNet key -> the DualPath key (image.backbone = Sequential of ``models.spec.BACKBONE_SEQUENCE``)."""
    head, dot, rest = key.partition(".")
    return f"image.backbone.{spec.BACKBONE_SEQUENCE.index(head)}{dot}{rest}"


def _refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    for p in paths:
        if p.exists() and not overwrite:
            raise mn.ConvertError(f"--out {p}: exists; pass --overwrite to replace it")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ commands
def backbone_state(dag: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check and convert an ImageNet ResNet DagNN: (torchvision-key state dict of tensors, sidecar fields)."""
    entries, nodes, info = layout.resnet_spec(dag)
    if "fc1000_filter" in dag.params:  # the ImageNet classifier: kept as fc.* (the image CNN ignores it)
        f = dag.params["fc1000_filter"]
        names = ("fc1000_filter", "fc1000_bias") if "fc1000_bias" in dag.params else ("fc1000_filter",)
        entries.append(mn.Entry("linear", "fc1000", names, "fc", (1, 1, info["backbone_channels"], int(f.shape[-1]))))
        nodes.append(mn.Node("fc1000", "dagnn.Conv", ("pool5",)))
    mn.check_inventory(dag, entries)
    mn.check_wiring(dag, nodes)
    mn.check_resnet_geometry(dag)
    eps = mn.bn_eps(dag, entries)
    mean = mn.average_rgb(dag)
    state = _to_torch(mn.convert(dag, entries, eps))
    sidecar = {"format": "dualpath-backbone", "style": "caffe", "arch": info["arch"], "bn_eps": eps,
               "backbone_width": info["backbone_width"], "pixel_mean": mean,
               "input": "RGB 0-255 minus pixel_mean, no std", "source": str(dag.path), "md5": None,
               "converter": CONVERTER, "converter_version": CONVERTER_VERSION, "created": _now(),
               "warnings": dag.warnings}
    return state, sidecar


def convert_backbone(path: Path, out: Path, overwrite: bool = False) -> dict[str, Any]:
    """imagenet-resnet-*-dag.mat -> OUT (state dict) + OUT.json (sidecar). Returns the sidecar."""
    sidecar_path = Path(str(out) + ".json")
    _refuse_existing([out, sidecar_path], overwrite)
    state, sidecar = backbone_state(load_dagnn(path))
    sidecar.update(source=str(path.resolve()), md5=file_digest(path, "md5"))
    with atomic_write(out) as f:  # the state dict written, the sidecar written and renamed, the state dict renamed
        torch.save(state, f)
        write_json(sidecar, sidecar_path)  # (were the last step to fail, a sidecar alone describes no file: harmless)
    return sidecar


def _infer_dataset(max_len: int, classifier_bias: bool) -> str:
    return "cuhk_pedes" if max_len == 56 else "flickr30k" if classifier_bias else "coco"


MIN_ROW_COSINE = 0.5  # median over words; the trained network's rows stay near their word2vec start (~1.0)


def check_dictionary_rows(dag: mn.DagNN, given: GivenDictionary, vocab: int) -> float | None:
    """fc2f starts as the dictionary's vectors, row v = word v (resnet52_new_hope_word2_pool.m) and trains at a 1e-3
    multiplier, so its rows stay close to them: a dictionary of the right size in another order (or another one)
    has rows pointing elsewhere. The median cosine of row v with word v's vector, or None for a word list without
    vectors (nothing to compare)."""
    if given.vectors is None:
        dag.warnings.append(f"the dictionary {given.info['path']} has no vectors: its word order could not be "
                            f"checked against the network's word2vec layer")
        return None
    rows = np.asarray(dag.params["fc2f"], dtype=np.float64).reshape(vocab, -1, order="F")  # (V, 300)
    vecs = np.asarray(given.vectors, dtype=np.float64)
    cos = (rows * vecs).sum(1) / np.maximum(np.linalg.norm(rows, axis=1) * np.linalg.norm(vecs, axis=1), 1e-12)
    median = float(np.median(cos))
    if median < MIN_ROW_COSINE:
        raise dag.fail(f"the word2vec layer fc2f does not match the dictionary {given.info['path']} row by row "
                       f"(median cosine {median:.2f} between row v and word v's vector, expected near 1): not the "
                       f"dictionary this network was trained with, or its words in another order")
    return median


def model_checkpoint(dag: Any, given: Any, manifest: dict[str, Any] | None = None, dataset: str | None = None,
                     where: str = "--data") -> dict[str, Any]:
    """Check and convert a trained DualPath DagNN: the full checkpoint dict (``model`` = tensors)."""
    backbone, nodes, info = layout.resnet_spec(dag)
    head, head_nodes, head_info = layout.head_spec(dag, info["backbone_channels"])
    dim = head_info["feature_dim"]
    text, text_nodes, text_info = layout.text_spec(dag, dim)
    classifier, cls_nodes, cls_info = layout.classifier_spec(dag, dim)
    entries = [replace(e, key=backbone_key(e.key)) for e in backbone] + head + text + classifier
    mn.check_inventory(dag, entries)
    mn.check_wiring(dag, nodes + head_nodes + text_nodes + cls_nodes)
    mn.check_resnet_geometry(dag)
    vocab, max_len = text_info["vocab_size"], text_info["max_len"]
    sha = dictionary_sha256(given.words)
    if len(given.words) != vocab:
        raise dag.fail(f"the network's word2vec layer fc2f has {vocab} words but the dictionary "
                       f"{given.info['path']} has {len(given.words)}; give the dictionary the network was trained with")
    check_dictionary_rows(dag, given, vocab)
    if manifest is not None:
        want = {"vocab_size": vocab, "dictionary_sha256": sha, "max_len": max_len,
                "num_classes": cls_info["num_classes"]}
        diff = [f"{k} {manifest.get(k)!r} (prepared) vs {v!r} (network + dictionary)" for k, v in want.items()
                if manifest.get(k) != v]
        if diff:
            raise dag.fail(f"does not match the prepared directory {where}: {'; '.join(diff)}. Prepare the data with "
                           f"--dictionary {given.info['path']} --max-len {max_len} and the original split (its number "
                           f"of training classes)")
    dataset = dataset or (manifest or {}).get("dataset") or _infer_dataset(max_len, cls_info["classifier_bias"])
    eps = mn.bn_eps(dag, backbone)
    mean = mn.average_rgb(dag)
    dropouts = sorted({float(dag.number(layer, "rate", 1)[0]) for layer in dag.layers.values()
                       if layer.type == "dagnn.DropOut"})
    if len(dropouts) > 1:
        dag.warnings.append(f"dropout rates differ {dropouts}; the config records {dropouts[0]}")
    stage = 2 if any(layer.type in ("dagnn.RankLoss", "dagnn.LRN") for layer in dag.layers.values()) else 1
    match = re.search(r"net-epoch-(\d+)\.mat$", dag.path.name)
    model = _to_torch(mn.convert(dag, entries, eps))
    model["image.pixel_mean"] = torch.tensor(mean, dtype=torch.float32)
    model["image.pixel_std"] = torch.ones(3)
    config = {"dataset": dataset, "stage": stage, "arch": info["arch"], "pretrained": "none", "train_crop": 224,
              "text_depth": layout.TEXT_DEPTH, "text_pool": text_info["text_pool"], "feature_dim": dim,
              "text_width": text_info["text_width"], "dropout": dropouts[0] if dropouts else 0.75,
              "classifier_bias": cls_info["classifier_bias"], "backbone_style": "caffe", "backbone_bn_eps": eps,
              "backbone_width": info["backbone_width"]}
    return {"model": model, "config": config, "stage": stage, "epoch": int(match.group(1)) if match else None,
            "complete": True, "pretrained_source": f"matconvnet {dag.path}",
            "data": {"dataset": dataset, "num_classes": cls_info["num_classes"], "vocab_size": vocab,
                     "max_len": max_len, "dictionary_sha256": sha},
            "provenance": {"source": str(dag.path), "md5": None, "converter": CONVERTER,
                           "converter_version": CONVERTER_VERSION, "dictionary": given.info,
                           "dictionary_sha256": sha, "pixel_mean": mean, "created": _now(),
                           "warnings": list(dag.warnings)},
            "history": [], "best": {"rsum": None, "epoch": None}}


def convert_model(path: Path, dictionary: Path, out: Path, data: Path | None = None, dataset: str | None = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """A trained net-epoch-N.mat -> a DualPath checkpoint at ``out``. Returns the checkpoint without tensors."""
    _refuse_existing([out], overwrite)
    given = read_given_dictionary(dictionary)
    manifest = load_json(data / "manifest.json", "--data manifest") if data is not None else None
    ckpt = model_checkpoint(load_dagnn(path), given, manifest, dataset, where=f"--data {data}")
    md5 = file_digest(path, "md5")
    ckpt["pretrained_source"] = f"matconvnet {path.resolve()} (md5 {md5})"
    ckpt["provenance"].update(source=str(path.resolve()), md5=md5)
    with atomic_write(out) as f:
        torch.save(ckpt, f)
    return {k: v for k, v in ckpt.items() if k != "model"}


def inspect(path: Path) -> list[str]:
    """Lines describing the file (MAT version, variables, layers, params, what it converts to); a file that does not
    convert raises the converter's error after these lines are printed."""
    lines = [f"{path}: MAT {matfile.mat_version(path)}, variables {matfile.variables(path)}"]
    print(lines[0], flush=True)
    dag = load_dagnn(path)
    types = Counter(layer.type.replace("dagnn.", "") for layer in dag.layers.values())
    values = sum(int(v.size) for v in dag.params.values())
    lines.append(f"  {len(dag.layers)} layers ({', '.join(f'{k} {n}' for k, n in types.most_common())}), "
                 f"{len(dag.params)} params ({values:,} values)")
    if "fc2f" in dag.params:
        vocab = int(dag.params["fc2f"].shape[2])
        ckpt = model_checkpoint(dag, GivenDictionary([f"w{i}" for i in range(vocab)], None, {"path": "-"}))
        c, d = ckpt["config"], ckpt["data"]
        lines.append(f"  converts with `model`: {c['arch']} (caffe style, width {c['backbone_width']:g}, BN eps "
                     f"{c['backbone_bn_eps']:g}), Stage {ckpt['stage']}, {d['num_classes']} classes, vocabulary "
                     f"{d['vocab_size']}, max_len {d['max_len']}, feature {c['feature_dim']}, text width "
                     f"{c['text_width']:g}, dropout {c['dropout']}, classifier bias {c['classifier_bias']}")
    else:
        _, side = backbone_state(dag)
        lines.append(f"  converts with `backbone`: {side['arch']} (caffe style, width {side['backbone_width']:g}, "
                     f"BN eps {side['bn_eps']:g}), pixel_mean {[round(v, 3) for v in side['pixel_mean']]}")
    lines += [f"  warning: {w}" for w in dag.warnings]
    return lines
