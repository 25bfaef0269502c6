"""What every preparer shares and what the rest of the project reads of preparation: the errors (``PrepareError``,
``Warnings``), a raw image (``RawImage``), the paper's text pipeline (spec 2.1: ``tokenize`` on the delimiter set,
``build_dictionary`` = training tokens found in word2vec in word2vec-file order, ``index_captions`` = the first
``max_len`` kept words), input-file checks, digests and the dictionary's identity (``dictionary_sha256``), and the
command-line glue ``run_cli``. It imports no other module of ``prepare``; ``prepare.pipeline`` (which writes the
prepared directory) sits on top of it and of ``word2vec``, ``images`` and ``dictionary``.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from utils.cli import UserError, run_guarded

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
DELIMITERS = "-.,()"  # spec 2.1, plus any whitespace; consecutive delimiters collapse
COCO_DELIMITERS = DELIMITERS + "?"
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
MAX_EXAMPLES = 5
DICTIONARY_RULES = ("train", "original")
WHITESPACE_DICTIONARY = ("flickr30k", "flickr8k")  # make_dictionary.m splits on whitespace only for these
# MSCOCO's make_dictionary.m splits the training captions on DELIMITERS, without the '?' its indexing adds
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
    train_txt.m) the raw captions of train AND val split on whitespace only; for MSCOCO the training captions split
    on the delimiters WITHOUT the '?' its indexing adds (MSCOCO-prepare/make_dictionary.m: a word seen only as
    "giraffe?" is not in it); for CUHK-PEDES the original already is the "train" rule."""
    if rule not in DICTIONARY_RULES:
        raise PrepareError(f"unknown --dictionary-rule {rule!r}; valid: {', '.join(DICTIONARY_RULES)}")
    if rule == "original" and dataset in WHITESPACE_DICTIONARY:
        return ([raw.split() for split, raw in captions if split != "test"],
                "train + val captions split on whitespace (the original make_dictionary.m)")
    if rule == "original" and dataset == "coco":
        return ([tokenize(raw, DELIMITERS) for split, raw in captions if split == "train"],
                "train captions split without '?' (the original make_dictionary.m; indexing splits on '?' too)")
    train = [t for (split, _), t in zip(captions, token_lists) if split == "train"]
    same = " (= the original code's rule for this dataset)" if dataset == "cuhk_pedes" else ""
    return train, "train captions only" + same


def dictionary_size_warning(dataset: str, rule: str, size: int, word2vec_info: dict) -> str | None:
    """A message when the full GoogleNews file gave a dictionary whose size differs from the original code's."""
    expected = EXPECTED_DICTIONARY.get(dataset)
    full = (word2vec_info.get("vectors_in_file") == GOOGLENEWS_WORDS
            and word2vec_info.get("vectors_scanned") == GOOGLENEWS_WORDS)
    original_rule = rule == "original" or dataset == "cuhk_pedes"
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


# ----------------------------------------------------------------------------------------- command line
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
