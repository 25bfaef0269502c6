"""The steps every preparer runs once it has parsed its raw format into ``RawImage``s (``write_prepared``): the
paper's text pipeline over the word2vec file or a given dictionary, the instance-loss classes (one per training
image, or per training identity for CUHK-PEDES), the resized images and the manifest, all written atomically (a
temporary sibling directory renamed into place only when complete); and the flags they share
(``add_common_args``). The prepared directory's contract is the package docstring.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from prepare import images as imgs
from prepare import word2vec
from prepare.core import (DELIMITERS, DICTIONARY_RULES, FORMAT_VERSION, SPLITS, PrepareError, RawImage, Warnings,
                          build_dictionary, dictionary_sha256, dictionary_size_warning, dictionary_text,
                          dictionary_tokens, file_record, index_captions, tokenize)
from prepare.dictionary import given_dictionary_from_args
from utils.files import atomic_dir


# ----------------------------------------------------------------------------------------- atomic output
def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace a prepared (or any non-empty) directory unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and not overwrite:
        if (out / "manifest.json").exists():
            raise PrepareError(f"--out {out}: already holds a prepared dataset (manifest.json); "
                               f"pass --overwrite to replace it")
        if any(out.iterdir()):
            raise PrepareError(f"--out {out}: exists, is not empty and has no manifest.json; "
                               f"pass --overwrite to replace it")


# ----------------------------------------------------------------------------------------- the prepared dir
def assign_labels(images: Sequence[RawImage], match: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(label, person, num_classes) per image for the instance loss.

    match='image': each training image is a class, numbered in image order; person = the image's row.
    match='person': classes = training identities in order of first appearance; person = the raw identity.
    val/test rows get label -1.
    """
    labels = np.full(len(images), -1, dtype=np.int64)
    if match == "image":
        train = [i for i, im in enumerate(images) if im.split == "train"]
        labels[train] = np.arange(len(train))
        return labels, np.arange(len(images), dtype=np.int64), len(train)
    if match != "person":
        raise PrepareError(f"unknown match mode {match!r}; valid: image, person")
    classes: dict[int, int] = {}
    for i, im in enumerate(images):
        if im.person is None:
            raise PrepareError(f"{im.source}: no person identity (match='person' needs one per image)")
        if im.split == "train":
            labels[i] = classes.setdefault(im.person, len(classes))
    return labels, np.array([im.person for im in images], dtype=np.int64), len(classes)


def output_name(source: str) -> str:
    """Path under images/ of a resized image: the raw relative path with a .jpg suffix."""
    return Path(source).with_suffix(".jpg").as_posix()


def _json_safe(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_prepared(dataset: str, images: Sequence[RawImage], args: argparse.Namespace, *, warnings: Warnings,
                   inputs: dict[str, Path], match: str = "image", resize_mode: str = "short_side",
                   delimiters: str = DELIMITERS, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenise, build the dictionary, index, resize and write the prepared directory ``args.out``.

    ``images`` may come in any split order (each split's own order is kept; train, val, test are
    concatenated). Uses args: out, overwrite, max_len, image_size, workers and the word2vec flags.
    Returns the manifest.
    """
    import pandas as pd

    out = Path(args.out)
    check_out_dir(out.absolute(), args.overwrite)
    if args.max_len <= 0 or args.image_size <= 0:
        raise PrepareError(f"--max-len and --image-size must be positive (got {args.max_len}, {args.image_size})")
    bad = [im for im in images if im.split not in SPLITS]
    if bad:
        raise PrepareError(f"{bad[0].source}: unknown split {bad[0].split!r}; valid: {', '.join(SPLITS)}")
    images = sorted(images, key=lambda im: SPLITS.index(im.split))  # stable: keeps each split's order
    if not any(im.split == "train" for im in images):
        counts = ", ".join(f"{k} {v['count']}" for k, v in warnings.as_dict().items()) or "none"
        raise PrepareError(f"{dataset}: no training image left to prepare (warnings: {counts})")
    files = [output_name(im.source) for im in images]
    dups = [f for f, n in Counter(files).items() if n > 1]
    if dups:
        dup = dups[0]
        raise PrepareError(f"two images would both be written as images/{dup} (each image may appear once)")
    labels, persons, num_classes = assign_labels(images, match)

    rows = [(i, k, raw) for i, im in enumerate(images) for k, raw in enumerate(im.captions)]
    token_lists = [tokenize(raw, delimiters) for _, _, raw in rows]
    is_train = np.array([images[i].split == "train" for i, _, _ in rows], dtype=bool)
    train_tokens = [t for t, tr in zip(token_lists, is_train) if tr]
    rule = getattr(args, "dictionary_rule", "train")
    if getattr(args, "dictionary", None) is not None:  # a given dictionary (e.g. the authors'): no dictionary built
        if rule != "train":
            raise PrepareError(f"--dictionary-rule {rule} builds a dictionary; --dictionary gives one: use one of them")
        rule = "given"
        dictionary, matrix, vectors_info, dictionary_source = given_dictionary_from_args(args)
        if vectors_info.get("source") == "file":  # a word list: the vectors came from --word2vec
            inputs = {**inputs, "word2vec": Path(args.word2vec)}
    else:
        if args.word2vec is None:
            raise PrepareError("--word2vec FILE|train is required (unless --dictionary gives the words and vectors)")
        captions = [(images[i].split, raw) for i, _, raw in rows]
        dict_tokens, dictionary_source = dictionary_tokens(dataset, rule, captions, token_lists)
        if rule == "original" and word2vec.is_trained(args):
            raise PrepareError("--dictionary-rule original needs a word2vec file (GoogleNews), not --word2vec train")
        vectors = word2vec.vectors_from_args(args, dict_tokens)
        if not word2vec.is_trained(args):
            inputs = {**inputs, "word2vec": Path(args.word2vec)}
        dictionary = build_dictionary(dict_tokens, vectors.words)
        if not dictionary:
            raise PrepareError(f"no token of the training captions is a key of {args.word2vec} "
                               f"(keys are case-sensitive; wrong file?)")
        size_warning = dictionary_size_warning(dataset, rule, len(dictionary), vectors.info)
        if size_warning:
            warnings.add("dictionary_size", size_warning)
        row_of = {w: i for i, w in enumerate(vectors.words)}
        matrix = np.ascontiguousarray(vectors.vectors[[row_of[w] for w in dictionary]], dtype=np.float32)
        vectors_info = vectors.info
    tokens, lengths, full = index_captions(token_lists, dictionary, args.max_len)
    for r in np.flatnonzero(lengths == 0):
        i, k, raw = rows[r]
        warnings.add("empty_caption", f"{images[i].source}#{k}: {raw[:80]!r}")

    img_split = [im.split for im in images]
    cap_image = np.array([i for i, _, _ in rows], dtype=np.int64)
    images_df = pd.DataFrame({"file": files, "source": [im.source for im in images], "split": img_split,
                              "label": labels, "person": persons})
    for key in sorted({k for im in images for k in im.extra}):
        images_df[key] = [im.extra.get(key) for im in images]
    captions_df = pd.DataFrame({"image": cap_image, "k": np.array([k for _, k, _ in rows], dtype=np.int64),
                                "split": [img_split[i] for i in cap_image], "label": labels[cap_image],
                                "person": persons[cap_image], "raw": [raw for _, _, raw in rows],
                                "length": lengths.astype(np.int64)})
    splits = {}
    for s in SPLITS:
        m = captions_df["split"].to_numpy() == s
        splits[s] = {"images": img_split.count(s), "captions": int(m.sum()),
                     "mean_length": round(float(lengths[m].mean()), 4) if m.any() else 0.0,
                     "empty_captions": int((lengths[m] == 0).sum()), "truncated": int((full[m] > args.max_len).sum())}
    train_occ = sum(len(t) for t in train_tokens)
    dict_set = set(dictionary)
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": dataset, "num_classes": int(num_classes),
        "vocab_size": len(dictionary), "max_len": int(args.max_len), "embedding_dim": int(matrix.shape[1]),
        "match": match, "image_resize": {"mode": resize_mode, "size": int(args.image_size)},
        "splits": splits, "warnings": {}, "args": {k: _json_safe(v) for k, v in sorted(vars(args).items())},
        "inputs": {role: file_record(p) for role, p in inputs.items()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "image_dir": "images", "word2vec": vectors_info,
        "dictionary_source": dictionary_source,
        "dictionary_sha256": dictionary_sha256(dictionary),
        "text": {"delimiters": delimiters + " (and whitespace)", "delimiter_chars": delimiters, "case_sensitive": True,
                 "dictionary_rule": rule,
                 "dictionary_from": dictionary_source if isinstance(dictionary_source, str) else "given (--dictionary)",
                 "train_token_types": len({t for x in train_tokens for t in x}),
                 "train_tokens": train_occ,
                 "train_tokens_in_dictionary": int(sum(t in dict_set for x in train_tokens for t in x))},
        "counts": {"images": len(images), "captions": len(rows), "dictionary": len(dictionary)},
        **(extra or {}),
    }
    check_out_dir(out.absolute(), args.overwrite)  # again: another process may have written it meanwhile
    with atomic_dir(out) as tmp:
        captions_df.to_parquet(tmp / "captions.parquet", index=False)
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "word2vec.npy", matrix)
        (tmp / "dictionary.txt").write_bytes(dictionary_text(dictionary))
        jobs = [(im.path, tmp / "images" / f) for im, f in zip(images, files)]
        done = imgs.resize_many(jobs, args.image_size, resize_mode, workers=args.workers,
                                progress=sys.stderr.isatty())
        images_df["orig_width"] = np.array([w for (w, _), _ in done], dtype=np.int64)
        images_df["orig_height"] = np.array([h for (_, h), _ in done], dtype=np.int64)
        # The original subtracts imdb.rgbMean, the mean RGB of the training images (getImageStats on 256x256
        # resizes): here the mean over training images of each prepared image's mean (0-255). Caffe style only.
        train_means = np.array([m for (_, m), im in zip(done, images) if im.split == "train"], dtype=np.float64)
        manifest["rgb_mean"] = [round(float(v), 4) for v in train_means.mean(0)]
        images_df.to_parquet(tmp / "images.parquet", index=False)
        manifest["warnings"] = warnings.as_dict()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


# ----------------------------------------------------------------------------------------- command line
def add_common_args(parser: argparse.ArgumentParser, *, max_len: int) -> None:
    """Flags every preparer shares: output, text length, image size, workers, word2vec."""
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="prepared directory to create (written to DIR.tmp-XXXX, renamed when complete)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    parser.add_argument("--max-len", type=int, default=max_len, metavar="L",
                        help=f"L_max: kept dictionary words stored per caption (default {max_len}, spec 2.1)")
    parser.add_argument("--image-size", type=int, default=256, metavar="S",
                        help="resize target S in pixels (default 256, the paper's; the demo uses 72)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="image-resizing processes (default: number of CPUs, here %(default)s; 1 = no pool)")
    parser.add_argument("--dictionary-rule", choices=DICTIONARY_RULES, default="train",
                        help="train (default): dictionary = training-caption tokens found in word2vec (no val/test "
                             "leak); original: as the original code (Flickr30k: train + val captions split on "
                             "whitespace, 20,074 words with GoogleNews; MSCOCO / CUHK-PEDES: the same as train)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="an image named by the split that is missing on disk or has no captions is skipped "
                             "and counted (warnings split_image_missing / split_image_no_captions) instead of "
                             "being an error")
    parser.add_argument("--dictionary", type=Path, default=None, metavar="FILE",
                        help="index the captions with this dictionary instead of building one: the authors' "
                             "make_dictionary.m output (flickr30k_dictionary.mat, COCO_dictionary.mat, "
                             "CUHK-PEDES_dictionary.mat: words and vectors), or a one-word-per-line text file "
                             "(vectors from --word2vec); needed to evaluate the released MatConvNet models")
    word2vec.add_arguments(parser)
