"""Convert the original MatConvNet networks to PyTorch (issue 11; docs/matconvnet.md): ``python -m matconvnet``.

    # the Stage I starting point of the original code (Caffe ResNet-50 via MatConvNet) -> a caffe-style backbone
    python -m matconvnet backbone imagenet-resnet-50-dag.mat --out data/imagenet-resnet-50-caffe.pth
    # a released trained network + the authors' dictionary -> a checkpoint evaluate.py / retrieval.search /
    # train_stage2.py --init accept like one of ours
    python -m matconvnet model net-epoch-60.mat --dictionary flickr30k_dictionary.mat \\
        --data data/flickr30k_authors --out runs/authors/flickr30k.pt
    # what a file holds and what it would convert to (writes nothing)
    python -m matconvnet inspect net-epoch-60.mat

``backbone`` writes ``FILE.pth`` (a plain state dict with torchvision key names, conv1 with a bias) and the sidecar
``FILE.pth.json`` (format "dualpath-backbone", style "caffe", arch, bn_eps, backbone_width, pixel_mean, source, md5):
train with ``--pretrained FILE.pth`` and the caffe style is chosen from the sidecar. ``model`` writes a checkpoint
with the full DualPath state dict, its config (backbone_style caffe), stage, epoch and provenance.

Every size is read from the file (widths, vocabulary, classes, L_max); names, shapes, strides, pads and pools are
checked against the original network, and so is its wiring; anything else is refused with an error naming the file,
the layer, parameter or variable and what was expected. Only the ``net`` variable (or layers/params/meta) is read,
never ``state``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from utils.cli import ArgumentParser, run_guarded

DATASETS = ("flickr30k", "coco", "cuhk_pedes", "flickr8k")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m matconvnet", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{backbone,model,inspect}")
    b = sub.add_parser("backbone", help="imagenet-resnet-{50,152}-dag.mat -> caffe-style backbone state dict + JSON")
    b.add_argument("file", type=Path, metavar="FILE.mat")
    b.add_argument("--out", type=Path, required=True, metavar="FILE.pth",
                   help="state dict to write; the sidecar FILE.pth.json is written next to it")
    b.add_argument("--overwrite", action="store_true", help="replace existing output files")
    m = sub.add_parser("model", help="a released net-epoch-N.mat + the authors' dictionary -> a DualPath checkpoint")
    m.add_argument("file", type=Path, metavar="NET.mat")
    m.add_argument("--dictionary", type=Path, required=True, metavar="DICT",
                   help="the dictionary the network was trained with: the authors' flickr30k_dictionary.mat / "
                        "COCO_dictionary.mat / CUHK-PEDES_dictionary.mat, or a word list (one word per line)")
    m.add_argument("--data", type=Path, default=None, metavar="PREPARED",
                   help="a directory prepared with --dictionary DICT: checked against the network (vocabulary, "
                        "dictionary hash, max_len, classes) and gives the dataset name")
    m.add_argument("--dataset", choices=DATASETS, default=None,
                   help="dataset name recorded in the checkpoint (default: from --data, else inferred: L_max 56 -> "
                        "cuhk_pedes, no classifier bias -> coco, else flickr30k)")
    m.add_argument("--out", type=Path, required=True, metavar="CKPT.pt")
    m.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    i = sub.add_parser("inspect", help="what a .mat file holds and whether it converts (writes nothing)")
    i.add_argument("file", type=Path, metavar="FILE.mat")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from matconvnet.convert import convert_backbone, convert_model, inspect

    if args.command == "inspect":
        print("\n".join(inspect(args.file)[1:]))
        return 0
    if args.command == "backbone":
        side = convert_backbone(args.file, args.out, args.overwrite)
        print(f"{args.file} -> {args.out} ({side['arch']}, caffe style, bn_eps {side['bn_eps']:g}, "
              f"width {side['backbone_width']:g}, pixel_mean {[round(v, 3) for v in side['pixel_mean']]}) "
              f"+ {args.out}.json")
        warnings = side["warnings"]
    else:
        meta = convert_model(args.file, args.dictionary, args.out, args.data, args.dataset, args.overwrite)
        c, d = meta["config"], meta["data"]
        print(f"{args.file} -> {args.out}: {c['arch']} caffe style, Stage {meta['stage']}, epoch {meta['epoch']}, "
              f"{d['dataset']}: {d['num_classes']} classes, vocabulary {d['vocab_size']}, max_len {d['max_len']}, "
              f"feature {c['feature_dim']}, dropout {c['dropout']}")
        warnings = meta["provenance"]["warnings"]
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
