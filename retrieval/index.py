"""Search building blocks (used by ``python -m retrieval.search``): encode a folder of images once with a feature cache,
tokenise a user's sentence with the prepared dictionary, rank images for a sentence and captions for an image.

Images are prepared as the preparer did (shorter side -> the manifest's ``image_resize.size``, or a square for mode
"square"; bicubic) and encoded with the test-time feature (``ImageCNN.test_feature``: whole image + its mirror).
Folder features are cached in an .npz keyed by file path, modification time and size, so a later run re-encodes
only new or changed images. Sentences are tokenised with the preparer's own functions and the prepared dictionary;
words outside it are dropped and reported. Ranking: cosine similarity of the test-time features.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import models  # noqa: F401  (first: installs the torchvision guard)
import numpy as np
import torch

from utils.cli import UserError
from utils.vectors import top_indices, unit_rows
from prepare.core import COCO_DELIMITERS, DELIMITERS, PrepareError, index_captions, tokenize
from prepare.images import RESIZE_MODES, load_resized

from engine.data import Prepared, PreparedDataError
from engine.encode import autocast
from engine.encode import encode_captions as encode_caption_rows

from .cache import (CACHE_VERSION, checkpoint_key, default_caption_cache, default_image_cache,  # noqa: F401 (API)
                    model_fingerprint, read_npz, save_npz)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_WHITESPACE_NOTE = " (and whitespace)"


class SearchError(UserError):
    """A user error: the message names what was given and what was expected (the CLI exits with code 2)."""


class QueryError(SearchError):
    """A sentence query that cannot be encoded (no word of it is in the dictionary)."""


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def top_k(query: np.ndarray, feats: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the ``k`` rows of ``feats`` (N, D) closest to ``query`` (D,), best first
    (ties: lower index first)."""
    if len(feats) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    scores = (unit_rows(feats) @ unit_rows(query[None])[0]).numpy()  # (N,)
    order = top_indices(scores, k)
    return order, scores[order]


# ------------------------------------------------------------------------------------------------ images
def list_images(folder: str | Path) -> list[Path]:
    """Every .jpg/.jpeg/.png file under ``folder`` (recursive, any case of suffix), sorted by path."""
    folder = Path(folder)
    if not folder.exists():
        raise SearchError(f"--images {folder}: no such folder (expected a folder of .jpg/.jpeg/.png images)")
    if not folder.is_dir():
        raise SearchError(f"--images {folder}: not a folder (expected a folder of .jpg/.jpeg/.png images; "
                          f"use --image for a single image query)")
    paths = sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    if not paths:
        raise SearchError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} file found (searched recursively)")
    return paths


def load_image(path: str | Path, image_size: int, mode: str) -> torch.Tensor:
    """Decode and resize like the preparer (``prepare.images.load_resized``) -> (3, H, W) uint8."""
    if mode not in RESIZE_MODES:
        raise SearchError(f"image resize mode {mode!r}: expected one of {list(RESIZE_MODES)}")
    try:
        img, _ = load_resized(path, image_size, mode)
    except PrepareError as e:
        raise SearchError(str(e)) from None
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy())


@torch.no_grad()
def encode_images(model, images: Sequence[torch.Tensor], device: torch.device, precision: str = "auto",
                  batch_size: int = 32) -> np.ndarray:
    """Test-time features of uint8 (3, H, W) images (batched by identical size) -> (N, D) float32."""
    dim = model.text.fc.out_features
    out = np.zeros((len(images), dim), dtype=np.float32)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape), []).append(i)
    for idx in by_size.values():
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            x = model.image.normalize(torch.stack([images[i] for i in part]).to(device))
            with autocast(device, precision):
                out[part] = model.image.test_feature(x).float().cpu().numpy()
    return out


@torch.no_grad()
def encode_folder(model, folder: str | Path, image_size: int, mode: str, device: str | torch.device | None = None,
                  cache: str | Path | None = None, *, cache_key: str | None = None, precision: str = "auto",
                  batch_size: int = 32, chunk: int = 256, progress: Callable[[str], None] | None = _note
                  ) -> tuple[list[Path], np.ndarray]:
    """Features of every image of ``folder`` (``list_images``): (paths, (N, D) float32).

    With ``cache`` (an .npz path), features already in it for the same file (resolved path, modification time,
    size) and the same key are reused and only the others are encoded; the file is then rewritten with exactly the
    current images. ``cache_key`` identifies the model (default: a hash of its weights). Unreadable images are
    skipped with a note. The model is put in eval mode and its previous mode restored."""
    device = torch.device(device) if device is not None else _device_of(model)
    paths = list_images(folder)
    dim = model.text.fc.out_features
    key = f"{cache_key if cache_key is not None else model_fingerprint(model)}|{image_size}|{mode}|{precision}|{dim}"
    cache = Path(cache) if cache is not None else None
    old = read_npz(cache, key)
    known: dict[str, tuple[int, int, int]] = {}
    if old is not None:
        known = {str(p): (int(m), int(s), i)
                 for i, (p, m, s) in enumerate(zip(old["paths"], old["mtime_ns"], old["size"]))}
    resolved = [str(p.resolve()) for p in paths]
    stats = [p.stat() for p in paths]
    feats = np.zeros((len(paths), dim), dtype=np.float32)
    todo = []
    for i, (r, st) in enumerate(zip(resolved, stats)):
        hit = known.get(r)
        if hit is not None and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
            feats[i] = old["feats"][hit[2]]
        else:
            todo.append(i)
    if progress:
        progress(f"{folder}: {len(paths)} images, {len(paths) - len(todo)} from the cache, encoding {len(todo)}")
    bad: set[int] = set()
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(todo), chunk):
            part, imgs = [], []
            for i in todo[s:s + chunk]:
                try:
                    imgs.append(load_image(paths[i], image_size, mode))
                    part.append(i)
                except SearchError as e:
                    bad.add(i)
                    if progress:
                        progress(f"note: skipping {e}")
            if part:
                feats[part] = encode_images(model, imgs, device, precision, batch_size)
    finally:
        model.train(was_training)
    keep = [i for i in range(len(paths)) if i not in bad]
    if not keep:
        raise SearchError(f"--images {folder}: none of its {len(paths)} images could be decoded")
    paths, feats = [paths[i] for i in keep], feats[keep]
    if cache is not None and (todo or old is None or len(old["paths"]) != len(keep)):
        save_npz(cache, version=np.array(CACHE_VERSION), key=np.array(key),
                      paths=np.array([resolved[i] for i in keep], dtype=str),
                      mtime_ns=np.array([stats[i].st_mtime_ns for i in keep], dtype=np.int64),
                      size=np.array([stats[i].st_size for i in keep], dtype=np.int64), feats=feats)
    return paths, feats


# ------------------------------------------------------------------------------------------------ sentences
@dataclass
class Vocabulary:
    words: list[str]
    delimiters: str
    max_len: int
    index: set[str] = field(default_factory=set)
    lower: dict[str, str] = field(default_factory=dict)  # lower-case -> a dictionary word (for hints)


_VOCABS: dict[tuple[str, int], Vocabulary] = {}


def vocabulary(data: Prepared) -> Vocabulary:
    """The prepared dictionary and the preparer's delimiter set (read once per directory)."""
    path = data.root / "dictionary.txt"
    try:
        stamp = (str(path.resolve()), path.stat().st_mtime_ns)
    except OSError:
        raise PreparedDataError(f"{data.root}: no dictionary.txt; is this a prepared directory?") from None
    if stamp not in _VOCABS:
        words = path.read_text(encoding="utf-8").split("\n")
        if words and words[-1] == "":
            words.pop()
        if len(words) != data.vocab_size:
            raise PreparedDataError(f"{path}: {len(words)} words, but manifest.json says vocab_size "
                                    f"{data.vocab_size}; prepare the data again")
        text = data.manifest.get("text", {}).get("delimiters")
        if isinstance(text, str) and text.endswith(_WHITESPACE_NOTE):
            delimiters = text[:-len(_WHITESPACE_NOTE)]
        else:  # a manifest without the text section: the preparer's defaults
            delimiters = COCO_DELIMITERS if str(data.manifest.get("dataset", "")).startswith("coco") else DELIMITERS
        lower: dict[str, str] = {}
        for w in words:
            lower.setdefault(w.lower(), w)
        _VOCABS[stamp] = Vocabulary(words, delimiters, data.max_len, set(words), lower)
    return _VOCABS[stamp]


@dataclass
class QueryTokens:
    query: str
    tokens: np.ndarray  # (max_len,) int64, 1-based, left-aligned, 0-padded
    length: int  # kept words (<= max_len)
    words: list[str]  # the words kept (in order, before truncation)
    ignored: list[str]  # words not in the dictionary (dropped)
    truncated: int  # kept words beyond max_len (dropped)

    def ignored_message(self, vocab: Vocabulary | None = None) -> str:
        hints = []
        for w in self.ignored:
            alt = vocab.lower.get(w.lower()) if vocab is not None else None
            hints.append(f"{w} (did you mean {alt}?)" if alt and alt != w else w)
        return "ignored words not in the dictionary: " + ", ".join(hints)


def tokenize_query(data: Prepared, query: str) -> QueryTokens:
    """Tokenise like the preparer (delimiter set + whitespace, case kept), keep dictionary words, index the first
    max_len. Raises QueryError when no word is in the dictionary."""
    vocab = vocabulary(data)
    toks = tokenize(query, vocab.delimiters)
    tokens, lengths, full = index_captions([toks], vocab.words, vocab.max_len)
    q = QueryTokens(query=query, tokens=tokens[0].astype(np.int64), length=int(lengths[0]),
                    words=[t for t in toks if t in vocab.index], ignored=[t for t in toks if t not in vocab.index],
                    truncated=int(full[0] - lengths[0]))
    if q.length == 0:
        if not toks:
            raise QueryError(f"query {query!r}: no words (expected a sentence, e.g. \"a dog runs on the grass\")")
        raise QueryError(f"query {query!r}: none of its words is in the dictionary of {data.root} "
                         f"({len(vocab.words)} words from the training captions, case-sensitive); "
                         + q.ignored_message(vocab))
    return q


@torch.no_grad()
def encode_query(model, data: Prepared, query: str | QueryTokens, device: str | torch.device | None = None,
                 precision: str = "auto") -> tuple[np.ndarray, QueryTokens]:
    """(test-time text feature (D,), the tokenisation) of one sentence."""
    device = torch.device(device) if device is not None else _device_of(model)
    q = query if isinstance(query, QueryTokens) else tokenize_query(data, query)
    was_training = model.training
    model.eval()
    try:
        with autocast(device, precision):
            f = model.text.test_feature(torch.from_numpy(q.tokens[None]).to(device),
                                        torch.tensor([q.length], device=device))
    finally:
        model.train(was_training)
    return f.float().cpu().numpy()[0], q


def search_text(model, data: Prepared, query: str | QueryTokens, paths: Sequence[Path], feats: np.ndarray,
                k: int = 5, device: str | torch.device | None = None, precision: str = "auto"
                ) -> list[tuple[Path, float]]:
    """The ``k`` images (of ``encode_folder``'s ``paths`` / ``feats``) closest to a sentence: [(path, cosine)],
    best first."""
    q, _ = encode_query(model, data, query, device, precision)
    idx, scores = top_k(q, feats, k)
    return [(paths[i], float(s)) for i, s in zip(idx, scores)]


# ------------------------------------------------------------------------------------------------ captions
@torch.no_grad()
def encode_captions(model, data: Prepared, split: str = "test", device: str | torch.device | None = None,
                    cache: str | Path | None = None, *, cache_key: str | None = None, precision: str = "auto",
                    batch_size: int = 256, progress: Callable[[str], None] | None = _note
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Test-time features of every caption of a prepared split: (caption rows, (M, D) float32); cached in the
    ``cache`` .npz when given (valid for the same key, prepared directory and rows)."""
    device = torch.device(device) if device is not None else _device_of(model)
    rows = data.split_captions(split)
    if len(rows) == 0:
        raise SearchError(f"{data.root}: the {split!r} split has no captions")
    dim = model.text.fc.out_features
    key = (f"{cache_key if cache_key is not None else model_fingerprint(model)}|{data.root.resolve()}|"
           f"{data.manifest.get('created')}|{split}|{precision}|{dim}")
    cache = Path(cache) if cache is not None else None
    old = read_npz(cache, key)
    if old is not None and np.array_equal(old["rows"], rows):
        return rows, old["feats"]
    if progress:
        progress(f"{data.root}: encoding the {len(rows)} captions of the {split} split")
    feats = encode_caption_rows(model, data, rows, device, batch_size=batch_size, precision=precision)
    if cache is not None:
        save_npz(cache, version=np.array(CACHE_VERSION), key=np.array(key), rows=rows, feats=feats)
    return rows, feats


@torch.no_grad()
def rank_captions(model, data: Prepared, image: str | Path, k: int = 5, split: str = "test",
                  device: str | torch.device | None = None, captions: tuple[np.ndarray, np.ndarray] | None = None,
                  cache: str | Path | None = None, cache_key: str | None = None, precision: str = "auto"
                  ) -> list[dict[str, Any]]:
    """The ``k`` captions of ``split`` closest to an image file: [{"rank", "caption", "score", "caption_row",
    "image_file"}], best first. ``captions`` = a previous ``encode_captions`` result (else encoded / cached)."""
    device = torch.device(device) if device is not None else _device_of(model)
    path = Path(image)
    if not path.is_file():
        raise SearchError(f"--image {path}: no such file (expected a .jpg/.jpeg/.png image)")
    resize = data.manifest["image_resize"]
    query = load_image(path, int(resize["size"]), resize["mode"])  # a bad file is refused before any encoding
    rows, tfeats = captions if captions is not None else encode_captions(
        model, data, split, device, cache, cache_key=cache_key, precision=precision)
    was_training = model.training
    model.eval()
    try:
        q = encode_images(model, [query], device, precision)[0]
    finally:
        model.train(was_training)
    idx, scores = top_k(q, tfeats, k)
    raw, cap_image = data.captions["raw"].to_numpy(), data.captions["image"].to_numpy()
    files = data.images["file"].to_numpy()
    return [{"rank": n + 1, "caption": str(raw[rows[i]]), "score": float(s), "caption_row": int(rows[i]),
             "image_file": str(files[cap_image[rows[i]]])} for n, (i, s) in enumerate(zip(idx, scores))]


def search_image(model, data: Prepared, image: str | Path, k: int = 5, split: str = "test",
                 device: str | torch.device | None = None, captions: tuple[np.ndarray, np.ndarray] | None = None,
                 cache: str | Path | None = None, cache_key: str | None = None, precision: str = "auto"
                 ) -> list[tuple[str, float]]:
    """The ``k`` captions of ``split`` closest to an image file: [(caption text, cosine)], best first."""
    return [(r["caption"], r["score"]) for r in rank_captions(model, data, image, k, split, device, captions,
                                                             cache, cache_key, precision)]
