"""Flickr30k (spec 2.2): ``python -m prepare.flickr30k --images DIR --captions results_20130124.token ...``.

Instance loss classes: every training image (with its 5 captions) is one class, numbered in sorted file-name
order (the original code's directory order). Split, one of:

* ``--split-json dataset_flickr30k.json`` (Karpathy): the JSON decides the image set; restval counts as train.
* ``--flickr8k-lists DIR`` (the original code's split, spec 2.2): images whose Flickr photo id is in
  Flickr8k's dev list are val, those in its test list are test, every other captioned image on disk is train.

``prepare.flickr8k`` reuses this module (same formats) and adds ``--split-lists`` (train/dev/test lists).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from utils.cli import ArgumentParser
from prepare.core import (PrepareError, RawImage, Warnings, check_dir, check_file, read_karpathy_json, read_lines,
                          run_cli)
from prepare.pipeline import add_common_args, write_prepared

CAPTION_LINE = re.compile(r"^(?P<name>[^\t#]+)#(?P<k>\d+)\t(?P<text>.*)$")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LIST_DEFAULTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                 "test": "Flickr_8k.testImages.txt"}


def read_token_file(path: str | Path, warnings: Warnings) -> dict[str, list[tuple[int, str]]]:
    """Captions per image name, in file order: ``name.jpg#k<TAB>caption`` lines -> {name: [(line, caption)]}.

    A line that does not parse raises PrepareError with file:line; blank lines are counted and skipped.
    """
    captions: dict[str, list[tuple[int, str]]] = {}
    for no, line in enumerate(read_lines(path, "caption file"), 1):
        if not line.strip():
            warnings.add("blank_caption_line", f"{path}:{no}")
            continue
        m = CAPTION_LINE.match(line)
        if m is None:
            raise PrepareError(f"{path}:{no}: expected 'name.jpg#k<TAB>caption', got {line[:80]!r}")
        captions.setdefault(m["name"], []).append((no, m["text"]))
    if not captions:
        raise PrepareError(f"{path}: no caption lines")
    return captions


def read_name_list(path: str | Path, what: str) -> list[tuple[int, str]]:
    """(line, image name) of a one-name-per-line split list (blank lines skipped)."""
    return [(no, line.strip()) for no, line in enumerate(read_lines(path, what), 1) if line.strip()]


def photo_id(name: str) -> str:
    """Flickr photo id of an image name: '2513260012_03d33305cf.jpg' and '2513260012.jpg' -> '2513260012'."""
    return Path(name).name.split(".")[0].split("_")[0]


def list_images(root: Path) -> set[str]:
    """Image file names directly in ``root``."""
    return {p.name for p in check_dir(root, "--images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}


def _listed_split(args: argparse.Namespace, inputs: dict[str, Path]) -> dict[str, tuple[str, str]]:
    """name -> (split, where) from the Karpathy JSON or from the three --split-lists files."""
    listed: dict[str, tuple[str, str]] = {}

    def put(name: str, split: str, where: str) -> None:
        if name in listed and listed[name][0] != split:
            raise PrepareError(f"{where}: {name} is also in split {listed[name][0]!r} ({listed[name][1]})")
        listed.setdefault(name, (split, where))

    if args.split_json:
        inputs["split_json"] = Path(args.split_json)
        for split, entry, where in read_karpathy_json(args.split_json):
            put(entry["filename"], split, where)
    else:
        for split in ("train", "val", "test"):
            path = check_file(Path(args.split_lists) / getattr(args, f"{split}_list"), f"{split} list")
            inputs[f"{split}_list"] = path
            for no, name in read_name_list(path, f"{split} list"):
                put(name, split, f"{path}:{no}")
    return listed


def collect(args: argparse.Namespace, warnings: Warnings) -> tuple[list[RawImage], dict[str, Path]]:
    """Raw images with captions and splits, plus the input files to record in the manifest."""
    root = Path(args.images)
    inputs = {"captions": check_file(args.captions, "caption file")}
    on_disk = list_images(root)
    captions = read_token_file(args.captions, warnings)
    chosen: dict[str, str] = {}  # name -> split
    for name in [n for n in captions if n not in on_disk and Path(n).suffix.lower() not in IMAGE_SUFFIXES]:
        lines = captions.pop(name)  # e.g. Flickr8k's '2258277193_586949ec62.jpg.1#k' lines
        warnings.add("caption_odd_image_name", f"{args.captions}:{lines[0][0]}: {name!r} is not an image file name "
                                               f"({len(lines)} captions skipped)")

    def missing(kind: str, message: str) -> None:
        if not args.skip_missing:
            raise PrepareError(f"{message} (pass --skip-missing to skip such images and count them)")
        warnings.add(kind, message)

    if args.flickr8k_lists:
        by_id: dict[str, str] = {}
        for split in ("val", "test"):
            path = check_file(Path(args.flickr8k_lists) / getattr(args, f"{split}_list"), f"{split} list")
            inputs[f"{split}_list"] = path
            for no, name in read_name_list(path, f"{split} list"):
                if by_id.get(photo_id(name), split) != split:
                    raise PrepareError(f"{path}:{no}: {name} is listed for both val and test")
                by_id[photo_id(name)] = split
        found: set[str] = set()
        for name, lines in captions.items():
            if name not in on_disk:
                warnings.add("caption_image_missing", f"{args.captions}:{lines[0][0]}: {name} not in {root}")
                continue
            chosen[name] = by_id.get(photo_id(name), "train")
            found.add(photo_id(name))
        for pid in by_id:
            if pid not in found:
                missing("split_image_missing",
                        f"{by_id[pid]} image with Flickr id {pid} has no captioned image in {root}")
    else:
        listed = _listed_split(args, inputs)
        for name, lines in captions.items():
            if name not in listed:
                warnings.add("caption_image_not_in_split", f"{args.captions}:{lines[0][0]}: {name}")
        for name, (split, where) in listed.items():
            if name not in on_disk:
                missing("split_image_missing", f"{where}: {split} image {name} not found in {root}")
            elif name not in captions:
                missing("split_image_no_captions", f"{where}: {split} image {name} has no captions in {args.captions}")
            else:
                chosen[name] = split
    for name in sorted(on_disk - set(captions)):
        warnings.add("image_no_captions", f"{root / name}: no caption lines; not used")
    images = [RawImage(source=name, path=root / name, split=chosen[name], captions=[c for _, c in captions[name]])
              for name in sorted(chosen)]
    return images, inputs


def prepare(args: argparse.Namespace, dataset: str = "flickr30k") -> dict:
    """Run the whole preparation for parsed arguments; returns the manifest."""
    warnings = Warnings()
    images, inputs = collect(args, warnings)
    mode = "karpathy_json" if args.split_json else "flickr8k_lists" if args.flickr8k_lists else "split_lists"
    return write_prepared(dataset, images, args, warnings=warnings, inputs=inputs,
                          extra={"split_mode": mode})


def build_parser(dataset: str = "flickr30k", split_lists: bool = False,
                 description: str | None = None) -> argparse.ArgumentParser:
    """The command line of prepare.flickr30k (and, with split_lists=True, of prepare.flickr8k)."""
    p = ArgumentParser(prog=f"python -m prepare.{dataset}", description=description or __doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, metavar="DIR",
                   help="folder holding the .jpg files (flickr30k-images/ or Flicker8k_Dataset/)")
    p.add_argument("--captions", required=True, type=Path, metavar="FILE",
                   help="token file: 'name.jpg#k<TAB>caption' lines (results_20130124.token or Flickr8k.token.txt)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--split-json", type=Path, metavar="FILE",
                   help="Karpathy split JSON (dataset_flickr30k.json): its train(+restval)/val/test images")
    g.add_argument("--flickr8k-lists", type=Path, metavar="DIR",
                   help="original code's split: names in DIR/--val-list are val, DIR/--test-list test "
                        "(matched by Flickr photo id), every other captioned image on disk train")
    if split_lists:
        g.add_argument("--split-lists", type=Path, metavar="DIR",
                       help="DIR/--train-list, --val-list, --test-list give the three splits directly")
        p.add_argument("--train-list", default=LIST_DEFAULTS["train"], metavar="NAME",
                       help="train list file name inside the lists DIR (--split-lists only; default %(default)s)")
    p.add_argument("--val-list", default=LIST_DEFAULTS["val"], metavar="NAME",
                   help="val list file name inside the lists DIR (default %(default)s; "
                        "e.g. Flickr_8k.devImages.subset1k.txt)")
    p.add_argument("--test-list", default=LIST_DEFAULTS["test"], metavar="NAME",
                   help="test list file name inside the lists DIR (default %(default)s)")
    add_common_args(p, max_len=32)
    p.set_defaults(split_lists=None, train_list=LIST_DEFAULTS["train"])
    return p


def main(argv: Sequence[str] | None = None, dataset: str = "flickr30k", split_lists: bool = False,
         description: str | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    return run_cli(lambda a: prepare(a, dataset), build_parser(dataset, split_lists, description), argv)


if __name__ == "__main__":
    sys.exit(main())
