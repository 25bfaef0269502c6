"""CUHK-PEDES (spec 2.4): ``python -m prepare.cuhk_pedes --root DIR --word2vec FILE --out DIR``.

DIR holds ``reid_raw.json`` (a list of {"split", "captions", "file_path", "id", ...}) and ``imgs/``.
Instance loss classes are person identities: the training identities numbered 0..N-1 in order of first
appearance (11,003 on the full data); the ``person`` column keeps the raw ``id`` (a caption matches every image
of its person at evaluation). Official split from each entry's "split" field (34,054 / 3,078 / 3,074 images);
file order kept within a split. Images resized to S x S (aspect not kept, as the original code); L_max = 56.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from utils.cli import ArgumentParser
from prepare.core import (SPLITS, PrepareError, RawImage, Warnings, check_dir, check_file, load_json, require,
                          run_cli)
from prepare.pipeline import add_common_args, write_prepared


def collect(args: argparse.Namespace, warnings: Warnings) -> tuple[list[RawImage], dict[str, Path]]:
    """Raw images (one per reid_raw.json entry) with captions, split and identity; plus the input files."""
    root = Path(args.root)
    check_dir(root, "--root")
    json_path = check_file(root / args.json_name, "CUHK-PEDES annotation file")
    img_root = check_dir(root / args.image_dir, "CUHK-PEDES image folder")
    entries = load_json(json_path, "CUHK-PEDES annotation file")
    if not isinstance(entries, list):
        raise PrepareError(f"{json_path}: expected a JSON list of image entries, got {type(entries).__name__}")
    images = []
    for i, entry in enumerate(entries):
        where = f"{json_path}: [{i}]"
        split = require(entry, "split", where, str)
        if split not in SPLITS:
            raise PrepareError(f"{where}: unknown split {split!r}; valid: {', '.join(SPLITS)}")
        rel = require(entry, "file_path", where, str)
        person = require(entry, "id", where, int)
        captions = require(entry, "captions", where, list)
        for j, c in enumerate(captions):
            if not isinstance(c, str):
                raise PrepareError(f"{where}.captions[{j}]: expected a string, got {type(c).__name__}")
        path = img_root / rel
        if not path.is_file() or not captions:
            kind = "split_image_missing" if not path.is_file() else "split_image_no_captions"
            msg = f"{where}: {split} image {rel} " + ("not found in " + str(img_root) if not path.is_file()
                                                      else "has no captions")
            if not args.skip_missing:
                raise PrepareError(msg + " (pass --skip-missing to skip such images and count them)")
            warnings.add(kind, msg)
            continue
        images.append(RawImage(source=rel, path=path, split=split, captions=list(captions), person=person))
    return images, {"reid_raw": json_path}


def prepare(args: argparse.Namespace) -> dict:
    """Run the whole preparation for parsed arguments; returns the manifest."""
    warnings = Warnings()
    images, inputs = collect(args, warnings)
    identities = {s: len({im.person for im in images if im.split == s}) for s in SPLITS}
    return write_prepared("cuhk_pedes", images, args, warnings=warnings, inputs=inputs, match="person",
                          resize_mode="square", extra={"split_mode": "official", "identities": identities})


def build_parser() -> argparse.ArgumentParser:
    """The command line (every flag explained by --help)."""
    p = ArgumentParser(prog="python -m prepare.cuhk_pedes", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, type=Path, metavar="DIR", help="CUHK-PEDES folder (reid_raw.json, imgs/)")
    p.add_argument("--json-name", default="reid_raw.json", metavar="NAME",
                   help="annotation file name inside DIR (default reid_raw.json)")
    p.add_argument("--image-dir", default="imgs", metavar="NAME",
                   help="image folder inside DIR; file_path is relative to it (default imgs)")
    add_common_args(p, max_len=56)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    return run_cli(prepare, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
