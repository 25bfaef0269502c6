"""MSCOCO (spec 2.3): ``python -m prepare.coco --images ROOT (--split-json | --captions-json ...) ...``.

ROOT holds train2014/ val2014/ or train2017/ val2017/ (or all four). Instance loss classes: every training
image is one class; every caption of an image (5-7) is kept and numbered by ``k``. COCO's delimiter set also
contains '?'. Split, one of:

* ``--split-json dataset_coco.json`` (Karpathy; entries carry "filepath", "filename", "cocoid"):
  train + restval = train (113,287), val 5,000, test 5,000; captions = the entries' sentences[].raw.
  An entry whose 2014 file is absent is looked up by its cocoid in the 2017 folders.
* ``--captions-json FILE [FILE ...] --random-split NVAL NTEST [--seed 1]``: the official caption files'
  images are merged in file order (e.g. train then val, as the original code did), then a seeded
  ``numpy.random.default_rng(seed).permutation`` picks NVAL val and NTEST test images (the paper's own
  random split used MATLAB rng(1) and cannot be reproduced outside MATLAB; ours is reproducible).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.cli import ArgumentParser
from prepare.core import (COCO_DELIMITERS, PrepareError, RawImage, Warnings, check_dir, load_json,
                          read_karpathy_json, require, run_cli)
from prepare.pipeline import add_common_args, write_prepared

FOLDERS = ("train2014", "val2014", "train2017", "val2017")


class ImageIndex:
    """The image files under ROOT's COCO folders, by relative path and by COCO id."""

    def __init__(self, root: Path) -> None:
        self.root = check_dir(root, "--images")
        self.paths: set[str] = set()
        self.by_id: dict[int, str] = {}
        self.folders = [f for f in FOLDERS if (root / f).is_dir()]
        if not self.folders:
            raise PrepareError(f"--images {root}: expected COCO folders train2014/ val2014/ or train2017/ val2017/")
        for folder in self.folders:
            for p in (root / folder).iterdir():
                rel = f"{folder}/{p.name}"
                self.paths.add(rel)
                digits = p.stem.rsplit("_", 1)[-1]
                if digits.isdigit():
                    self.by_id.setdefault(int(digits), rel)

    def find(self, file_name: str, coco_id: int | None, folder: str | None = None) -> str | None:
        """Relative path of an image: folder/file_name if present, else any folder's file_name, else by id."""
        for f in ([folder] if folder else []) + self.folders:
            if f"{f}/{file_name}" in self.paths:
                return f"{f}/{file_name}"
        return self.by_id.get(coco_id) if coco_id is not None else None


def from_karpathy(path: Path, index: ImageIndex) -> list[tuple[str, str, int | None, list[str], str]]:
    """(split, file_name, cocoid, captions, where) per Karpathy entry (restval -> train)."""
    out = []
    for split, entry, where in read_karpathy_json(path):
        folder = require(entry, "filepath", where, str)
        sentences = require(entry, "sentences", where, list)
        caps = [require(s, "raw", f"{where}.sentences[{j}]", str) for j, s in enumerate(sentences)]
        coco_id = entry.get("cocoid")
        out.append((split, f"{folder}/{entry['filename']}", coco_id, caps, where))
    return out


def from_caption_files(paths: Sequence[Path], warnings: Warnings) -> list[tuple[str, int, list[str], str]]:
    """(file_name, id, captions, where) of every image of the official caption files, in file order."""
    merged: dict[int, tuple[str, list[str], str]] = {}
    for path in paths:
        data = load_json(path, "captions JSON")
        images = require(data, "images", f"{path}", list)
        annotations = require(data, "annotations", f"{path}", list)
        ids_here = set()
        for i, im in enumerate(images):
            where = f"{path}: images[{i}]"
            image_id = require(im, "id", where, int)
            name = require(im, "file_name", where, str)
            if image_id in merged:
                warnings.add("duplicate_image", f"{where}: id {image_id} already in {merged[image_id][2]}")
                continue
            merged[image_id] = (name, [], where)
            ids_here.add(image_id)
        for j, ann in enumerate(annotations):
            where = f"{path}: annotations[{j}]"
            image_id = require(ann, "image_id", where, int)
            caption = require(ann, "caption", where, str)
            if image_id not in ids_here:
                warnings.add("annotation_unknown_image", f"{where}: image_id {image_id} not in this file's images")
                continue
            merged[image_id][1].append(caption)
    return [(name, image_id, caps, where) for image_id, (name, caps, where) in merged.items()]


def random_split(n: int, n_val: int, n_test: int, seed: int) -> list[str]:
    """Split name per image: a seeded permutation's first n_val are val, the next n_test test, the rest train."""
    if n_val < 0 or n_test < 0 or n_val + n_test >= n:
        raise PrepareError(f"--random-split {n_val} {n_test}: needs 0 <= NVAL + NTEST < {n} (the number of images)")
    perm = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[perm[:n_val]] = "val"
    split[perm[n_val:n_val + n_test]] = "test"
    return split.tolist()


def collect(args: argparse.Namespace, warnings: Warnings) -> tuple[list[RawImage], dict[str, Path]]:
    """Raw images with captions and splits, plus the input files to record in the manifest."""
    index = ImageIndex(Path(args.images))
    inputs: dict[str, Path] = {}
    images: list[RawImage] = []

    def add(split: str, rel: str | None, asked: str, coco_id: int | None, caps: list[str], where: str) -> None:
        if rel is None:
            msg = f"{where}: {split} image {asked} (id {coco_id}) not found under {args.images}"
            if not args.skip_missing:
                raise PrepareError(msg + " (pass --skip-missing to skip such images and count them)")
            warnings.add("split_image_missing", msg)
        elif not caps:
            msg = f"{where}: {split} image {asked} has no captions"
            if not args.skip_missing:
                raise PrepareError(msg + " (pass --skip-missing to skip such images and count them)")
            warnings.add("split_image_no_captions", msg)
        else:
            images.append(RawImage(source=rel, path=index.root / rel, split=split, captions=caps,
                                   extra={"coco_id": coco_id if coco_id is not None else -1}))

    if args.split_json:
        inputs["split_json"] = Path(args.split_json)
        for split, rel, coco_id, caps, where in from_karpathy(args.split_json, index):
            folder, name = rel.split("/", 1)
            add(split, index.find(name, coco_id, folder), rel, coco_id, caps, where)
    else:
        for i, path in enumerate(args.captions_json):
            inputs[f"captions_json_{i}"] = Path(path)
        entries = []
        for name, image_id, caps, where in from_caption_files(args.captions_json, warnings):
            if not caps:  # official files: an image without annotations is simply not usable
                warnings.add("image_no_captions", f"{where}: {name} has no caption annotation; not used")
            else:
                entries.append((name, image_id, caps, where))
        splits = random_split(len(entries), *args.random_split, seed=args.seed)
        for split, (name, image_id, caps, where) in zip(splits, entries):
            add(split, index.find(name, image_id), name, image_id, caps, where)
    return images, inputs


def prepare(args: argparse.Namespace) -> dict:
    """Run the whole preparation for parsed arguments; returns the manifest."""
    if args.split_json is None and args.random_split is None:
        raise PrepareError("--captions-json needs --random-split NVAL NTEST")
    if args.split_json is not None and args.random_split is not None:
        raise PrepareError("--random-split only applies to --captions-json")
    warnings = Warnings()
    images, inputs = collect(args, warnings)
    mode = "karpathy_json" if args.split_json else f"random(seed={args.seed})"
    return write_prepared("coco", images, args, warnings=warnings, inputs=inputs, delimiters=COCO_DELIMITERS,
                          extra={"split_mode": mode})


def build_parser() -> argparse.ArgumentParser:
    """The command line (every flag explained by --help)."""
    p = ArgumentParser(prog="python -m prepare.coco", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, metavar="ROOT",
                   help="folder holding train2014/ val2014/ and/or train2017/ val2017/")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--split-json", type=Path, metavar="FILE",
                   help="Karpathy dataset_coco.json (train + restval = train, val, test)")
    g.add_argument("--captions-json", type=Path, nargs="+", metavar="FILE",
                   help="official annotations/captions_*.json files, merged in the order given "
                        "(use with --random-split)")
    p.add_argument("--random-split", type=int, nargs=2, metavar=("NVAL", "NTEST"), default=None,
                   help="with --captions-json: NVAL val and NTEST test images chosen at random, the rest train "
                        "(the paper: 5000 5000)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random split (numpy default_rng; default 1)")
    add_common_args(p, max_len=32)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    return run_cli(prepare, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
