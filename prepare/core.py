"""Shared preparation logic (see the package docstring for the prepared-directory contract).

Dataset modules only parse their raw formats into a list of ``RawImage``; ``write_prepared`` then applies the
paper's text pipeline (spec 2.1: tokenise on the delimiter set, dictionary = training tokens found in word2vec,
in word2vec-file order; index the first ``max_len`` kept words), assigns the instance-loss classes (one class
per training image, or per training identity for CUHK-PEDES), resizes the images and writes everything
atomically (a temporary sibling directory renamed into place only when complete).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from utils.cli import UserError, run_guarded

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DELIMITERS = "-.,()"  # spec 2.1, plus any whitespace; consecutive delimiters collapse
COCO_DELIMITERS = DELIMITERS + "?"
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MAX_EXAMPLES = 5
DICTIONARY_RULES = ("train", "original")
WHITESPACE_DICTIONARY = ("flickr30k", "flickr8k")  # make_dictionary.m differs from the indexing only for these
EXPECTED_DICTIONARY = {"flickr30k": 20074, "coco": 29972, "cuhk_pedes": 7263}  # the original's V (spec 2.1)
GOOGLENEWS_WORDS = 3_000_000


class PrepareError(UserError):
    """Unusable input or options. The message names the file (and line or key) and what was expected."""


class Warnings:
    """Counted warnings for the manifest: inputs the paper's pipeline would skip, with up to 5 examples each."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Any]] = {}

    def add(self, name: str, example: str, count: int = 1) -> None:
        """Count one occurrence (or ``count``) of warning ``name``; keep the example if fewer than 5 are kept."""
        item = self._items.setdefault(name, {"count": 0, "examples": []})
        item["count"] += count
        if len(item["examples"]) < MAX_EXAMPLES:
            item["examples"].append(example)

    def count(self, name: str) -> int:
        return self._items.get(name, {}).get("count", 0)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"count": v["count"], "examples": list(v["examples"])} for k, v in self._items.items()}


@dataclass
class RawImage:
    """One image of the raw dataset with its captions, as a dataset module parsed it."""

    source: str  # path relative to the image root, as in the raw dataset
    path: Path  # the original file
    split: str  # 'train' | 'val' | 'test'
    captions: list[str]  # raw caption texts; k = position in this list
    person: int | None = None  # CUHK-PEDES identity (classes = identities); None = the image is its own class
    extra: dict[str, Any] = field(default_factory=dict)  # extra images.parquet columns (e.g. coco_id)


# ----------------------------------------------------------------------------------------- text pipeline (2.1)
@functools.lru_cache(maxsize=None)
def _splitter(delimiters: str) -> re.Pattern:
    return re.compile("[" + "".join(re.escape(c) for c in delimiters) + r"\s]+")


def tokenize(text: str, delimiters: str = DELIMITERS) -> list[str]:
    """Split a caption on the delimiter set (and whitespace), collapsing runs; case is kept."""
    return [t for t in _splitter(delimiters).split(text) if t]


def build_dictionary(train_tokens: Sequence[Sequence[str]], word2vec_words: Sequence[str]) -> list[str]:
    """The paper's dictionary: word2vec words (in file order) occurring in a training caption (exact match)."""
    present = {t for toks in train_tokens for t in toks}
    seen: set[str] = set()
    return [w for w in word2vec_words if w in present and not (w in seen or seen.add(w))]


def dictionary_tokens(dataset: str, rule: str, captions: Sequence[tuple[str, str]],
                      token_lists: Sequence[Sequence[str]]) -> tuple[list[Sequence[str]], str]:
    """The token lists the dictionary is built from, and the rule's description for the manifest.

    ``captions`` = (split, raw text) per caption, ``token_lists`` = their delimiter tokenisation (used to index).
    rule "train" (default, leak-free): the indexing tokens of the training captions. rule "original": as the
    original code built the dictionary; for Flickr30k (make_dictionary.m on the train + val captions written by
    train_txt.m) the raw captions of train AND val split on whitespace only; for MSCOCO and CUHK-PEDES the original
    already is the "train" rule (training captions, the indexing delimiters)."""
    if rule not in DICTIONARY_RULES:
        raise PrepareError(f"unknown --dictionary-rule {rule!r}; valid: {', '.join(DICTIONARY_RULES)}")
    if rule == "original" and dataset in WHITESPACE_DICTIONARY:
        return ([raw.split() for split, raw in captions if split != "test"],
                "train + val captions split on whitespace (the original make_dictionary.m)")
    train = [t for (split, _), t in zip(captions, token_lists) if split == "train"]
    same = " (= the original code's rule for this dataset)" if dataset not in WHITESPACE_DICTIONARY else ""
    return train, "train captions only" + same


def dictionary_size_warning(dataset: str, rule: str, size: int, word2vec_info: dict) -> str | None:
    """A message when the full GoogleNews file gave a dictionary whose size differs from the original code's."""
    expected = EXPECTED_DICTIONARY.get(dataset)
    full = (word2vec_info.get("vectors_in_file") == GOOGLENEWS_WORDS
            and word2vec_info.get("vectors_scanned") == GOOGLENEWS_WORDS)
    original_rule = rule == "original" or dataset not in WHITESPACE_DICTIONARY
    if expected is None or not full or not original_rule or size == expected:
        return None
    return (f"{size} words with the full GoogleNews file; the original code's {dataset} dictionary has {expected} "
            f"(rule {rule!r}; the same holds only with the original split and caption files)")


def index_captions(token_lists: Sequence[Sequence[str]], dictionary: Sequence[str],
                   max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32 (N, max_len) 1-based left-aligned 0-padded, kept lengths <= max_len, lengths before truncation).

    Out-of-dictionary tokens are dropped; the first ``max_len`` kept words are stored.
    """
    index = {w: i + 1 for i, w in enumerate(dictionary)}
    tokens = np.zeros((len(token_lists), max_len), dtype=np.int32)
    full = np.zeros(len(token_lists), dtype=np.int64)
    for row, toks in enumerate(token_lists):
        ids = [index[t] for t in toks if t in index]
        full[row] = len(ids)
        ids = ids[:max_len]
        tokens[row, :len(ids)] = ids
    return tokens, np.minimum(full, max_len), full


# ----------------------------------------------------------------------------------------- input files
def check_file(path: str | Path, what: str) -> Path:
    """The path of a readable input file, or PrepareError naming it."""
    path = Path(path)
    if not path.exists():
        raise PrepareError(f"{what} {path}: no such file")
    if not path.is_file():
        raise PrepareError(f"{what} {path}: not a regular file")
    if not os.access(path, os.R_OK):
        raise PrepareError(f"{what} {path}: not readable (permissions)")
    return path


def check_dir(path: str | Path, what: str) -> Path:
    """The path of an existing directory, or PrepareError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise PrepareError(f"{what} {path}: no such directory")
    return path


def read_lines(path: str | Path, what: str) -> list[str]:
    """Lines of a UTF-8 text file (without line ends); decoding errors name file:line."""
    data = check_file(path, what).read_bytes()
    lines = []
    for no, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8-sig" if no == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            raise PrepareError(f"{path}:{no}: not valid UTF-8 text ({e.reason} at byte {e.start})") from None
    return lines


def load_json(path: str | Path, what: str) -> Any:
    """Parsed JSON; syntax errors name file:line."""
    path = check_file(path, what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 JSON ({e.reason})") from None


def require(obj: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """obj[key], or PrepareError naming the location (e.g. 'file.json: images[3]') and the missing key."""
    if not isinstance(obj, dict):
        raise PrepareError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise PrepareError(f"{where}: missing required key {key!r}")
    value = obj[key]
    if kind is not None and not isinstance(value, kind):
        names = "/".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise PrepareError(f"{where}: key {key!r} should be {names}, got {type(value).__name__}")
    return value


def read_karpathy_json(path: str | Path) -> list[tuple[str, dict, str]]:
    """Karpathy split file entries as (split, entry, where); 'restval' counts as train.

    Unknown split names raise PrepareError naming the entry and the valid choices.
    """
    data = load_json(path, "split JSON")
    entries = require(data, "images", f"{path}", list)
    out = []
    for i, entry in enumerate(entries):
        where = f"{path}: images[{i}]"
        name = require(entry, "filename", where, str)
        split = require(entry, "split", where, str)
        if split not in KARPATHY_SPLITS:
            raise PrepareError(f"{where} ({name}): unknown split {split!r}; valid: {', '.join(KARPATHY_SPLITS)}")
        out.append((KARPATHY_SPLITS[split], entry, where))
    return out


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks (a 1 GB .mat file is never held whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """{"path", "sha256", "bytes"} of an input file for the manifest."""
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": file_digest(path), "bytes": path.stat().st_size}


def dictionary_text(words: Sequence[str]) -> bytes:
    """The bytes of a prepared ``dictionary.txt``: word v (1-based) on line v."""
    return "".join(w + "\n" for w in words).encode("utf-8")


def dictionary_sha256(words: Sequence[str]) -> str:
    """The dictionary's identity (manifest and checkpoints): sha256 of its dictionary.txt bytes."""
    return hashlib.sha256(dictionary_text(words)).hexdigest()


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


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling OUT.tmp-XXXX; on success it replaces OUT, on any error it is removed."""
    out = Path(out).absolute()
    check_out_dir(out, overwrite)
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be like any new directory
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # parents we created, innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise


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

    from prepare import images as imgs
    from prepare import word2vec

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
        from prepare.dictionary import given_dictionary_from_args
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
    with atomic_dir(out, args.overwrite) as tmp:
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
    from prepare import word2vec

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


def summary(manifest: dict[str, Any], out: Path) -> str:
    """A few human-readable lines about a finished preparation."""
    lines = [f"prepared {manifest['dataset']} -> {out}: {manifest['num_classes']} classes, "
             f"dictionary {manifest['vocab_size']} words, max_len {manifest['max_len']}"]
    for s, d in manifest["splits"].items():
        lines.append(f"  {s:5s} {d['images']:7d} images {d['captions']:8d} captions  "
                     f"mean length {d['mean_length']:.2f}  empty {d['empty_captions']}")
    for name, w in manifest["warnings"].items():
        lines.append(f"  warning {name}: {w['count']} (e.g. {w['examples'][0]})")
    return "\n".join(lines)


def run_cli(prepare_fn: Callable[[argparse.Namespace], dict], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    """Parse argv, run ``prepare_fn(args)``; errors print one ``error: ...`` line on stderr and return 2
    (the convention of utils/cli.py)."""
    args = parser.parse_args(argv)

    def body() -> None:
        print(summary(prepare_fn(args), args.out))

    # PrepareError names the input file and line; OSError its path. A ValueError here would be a bug: traceback.
    return run_guarded(body, errors=(UserError, OSError),
                       interrupted=f"interrupted: nothing was written to {args.out}")
