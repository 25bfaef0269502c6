"""What the retrieval browser shows (``python -m retrieval.browse``), without any web code: a trained model's features of
a gallery of images and of a split's captions, encoded once, and the three views computed from them.

Two galleries:

``from_split``   the images and captions of a prepared split, encoded by ``engine.encode.encode_split`` (the code
                 evaluate.py runs); the split knows which caption belongs to which image (equal ``person`` labels),
                 so correct items are marked and the evaluation view's numbers come from
                 ``engine.metrics.evaluate_retrieval`` (the function evaluate.py calls) with the same directions.
``from_folder``  a folder of the user's own images (``retrieval.index.encode_folder``, with its feature cache)
                 searched by sentence; an image's captions are those of the split (``encode_captions``, cached). There
                 is no ground truth, so nothing is marked and there is no evaluation view.

Scores are cosine similarities of the test-time features (L2-normalised as ``engine.metrics`` does); a rank is
``1 + #items scoring strictly higher`` (ties in the item's favour, the convention of ``engine.metrics``).
Requests name images and captions by their position in the loaded gallery / caption list only (never a path).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import models  # noqa: F401  (first: installs the torchvision guard)
import numpy as np
import torch

from engine.data import Prepared
from engine.encode import encode_split
from engine.metrics import DIRECTIONS, evaluate_retrieval, fold_members, retrieval_ranks
from utils.vectors import top_indices, unit_rows

from .browse_limits import MAX_K, MAX_PER_PAGE, MAX_QUERY_CHARS, THUMB_CACHE, THUMB_SIDE
from .cache import CACHE_VERSION, checkpoint_key, read_npz, save_npz
from .index import QueryError, encode_captions, encode_folder, encode_query, tokenize_query, vocabulary



class BrowseError(ValueError):
    """A bad request; the message says what was given and what was expected (HTTP 400)."""

    status = 400


class NotFound(BrowseError):
    """A request for an item or page that does not exist (HTTP 404)."""

    status = 404


def _rank(scores: torch.Tensor, item: int) -> int:
    """1 + number of items scoring strictly higher than ``item``."""
    return int((scores > scores[item]).sum()) + 1


@dataclass
class BrowseIndex:
    """Features and texts of one gallery of images and one split's captions (see the module docstring)."""

    model: Any
    data: Prepared
    split: str
    mode: str  # "split" or "folder"
    image_paths: list[Path]  # (N,) files served by id
    image_names: list[str]  # (N,) names shown
    image_feats: torch.Tensor  # (N, D) L2-normalised
    caption_rows: np.ndarray  # (M,) rows of the prepared captions table
    caption_feats: torch.Tensor  # (M, D) L2-normalised
    image_labels: np.ndarray | None  # (N,) equal labels = a match; None: no ground truth (folder)
    caption_labels: np.ndarray | None  # (M,)
    device: torch.device
    precision: str = "auto"
    top_k: int = 10
    evaluation: dict[str, Any] | None = None  # engine.metrics.evaluate_retrieval's result
    ranks: dict[str, np.ndarray] = field(default_factory=dict)  # per-query ranks of each evaluated direction
    source: str = ""  # the checkpoint, for the page's header
    image_rows: np.ndarray | None = None  # (N,) rows of the prepared images table (split mode)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _thumbs: "OrderedDict[int, bytes]" = field(default_factory=OrderedDict, repr=False)

    def __post_init__(self) -> None:
        # absolute: a --data or --images given relative to the working directory must still be served (Flask's
        # send_file would resolve a relative path against the package, not the working directory)
        self.image_paths = [Path(p).absolute() for p in self.image_paths]
        raw = self.data.captions["raw"].to_numpy()
        self.caption_texts = [str(raw[r]) for r in self.caption_rows]
        self._by_text: dict[str, list[int]] = {}
        for i, t in enumerate(self.caption_texts):
            self._by_text.setdefault(t.strip(), []).append(i)
        self.caption_image = None  # (M,) the image id of each caption, split mode only
        if self.image_rows is not None:
            pos = {int(r): i for i, r in enumerate(self.image_rows)}
            owner = self.data.captions["image"].to_numpy()[self.caption_rows]
            self.caption_image = np.array([pos.get(int(o), -1) for o in owner], dtype=np.int64)

    # -------------------------------------------------------------------------------------------- sizes, checks
    @property
    def has_truth(self) -> bool:
        return self.image_labels is not None

    def info(self) -> dict[str, Any]:
        return {"mode": self.mode, "split": self.split, "dataset": self.data.manifest.get("dataset"),
                "images": len(self.image_paths), "captions": len(self.caption_rows), "top_k": self.top_k,
                "has_truth": self.has_truth, "evaluation": self.evaluation is not None,
                "directions": list(self.ranks), "source": self.source,
                "limits": {"query_chars": MAX_QUERY_CHARS, "k": MAX_K, "per_page": MAX_PER_PAGE}}

    def _k(self, k: int | None) -> int:
        k = self.top_k if k is None else k
        if not 1 <= k <= MAX_K:
            raise BrowseError(f"k={k}: expected a number of results from 1 to {MAX_K}")
        return k

    def _image_id(self, iid: int) -> int:
        if not 0 <= iid < len(self.image_paths):
            raise NotFound(f"image {iid} is not in the loaded gallery (image ids are 0..{len(self.image_paths) - 1})")
        return iid

    def _caption_id(self, cid: int) -> int:
        if not 0 <= cid < len(self.caption_rows):
            raise NotFound(f"caption {cid} is not in the {self.split} split (caption ids are "
                           f"0..{len(self.caption_rows) - 1})")
        return cid

    def _image_item(self, i: int, scores: torch.Tensor, correct: set[int] | None) -> dict[str, Any]:
        """``correct``: the ground-truth images of the view, None when it has none (then nothing is right or wrong:
        ``"correct": null``)."""
        return {"id": int(i), "name": self.image_names[i], "score": float(scores[i]),
                "correct": None if correct is None else int(i) in correct}

    def _images_of_label(self, label) -> set[int]:
        return set() if not self.has_truth else set(np.flatnonzero(self.image_labels == label).tolist())

    def _words(self, text: str) -> dict[str, Any]:
        """Kept and out-of-dictionary words of a sentence (with case hints), as the preparer tokenises it."""
        vocab = vocabulary(self.data)
        try:
            q = tokenize_query(self.data, text)
        except QueryError:
            return {"words": [], "ignored": [], "hints": {}, "truncated": 0}
        hints = {w: vocab.lower[w.lower()] for w in q.ignored if vocab.lower.get(w.lower(), w) != w}
        return {"words": q.words, "ignored": q.ignored, "hints": hints, "truncated": q.truncated}

    # -------------------------------------------------------------------------------------------- the views
    def search(self, text: str, k: int | None = None) -> dict[str, Any]:
        """A typed sentence -> the top-K images. Correct ones are marked when the sentence is, exactly, a caption of
        the split (then that caption's image is its ground truth)."""
        k = self._k(k)
        if len(text) > MAX_QUERY_CHARS:
            raise BrowseError(f"the query has {len(text)} characters; the limit is {MAX_QUERY_CHARS}")
        if not text.strip():
            raise BrowseError("empty query: type a sentence, e.g. \"a dog runs on the grass\"")
        try:
            with self._lock:
                feat, q = encode_query(self.model, self.data, text, self.device, self.precision)
        except QueryError as e:
            raise BrowseError(str(e)) from None
        scores = self.image_feats @ unit_rows(feat[None])[0]  # (N,)
        same = self._by_text.get(text.strip(), []) if self.has_truth else []
        correct = set().union(*(self._images_of_label(self.caption_labels[c]) for c in same)) if same else None
        out = {"query": text, **self._words(text), "results": [self._image_item(i, scores, correct)
                                                               for i in top_indices(scores, k)],
               "same_captions": same,
               "truth": [{"id": i, "name": self.image_names[i], "rank": _rank(scores, i)}
                         for i in sorted(correct or ())]}
        return out

    def caption(self, cid: int, k: int | None = None) -> dict[str, Any]:
        """A caption of the split -> the top-K images, by its stored test-time feature (as evaluated)."""
        k, cid = self._k(k), self._caption_id(cid)
        scores = self.image_feats @ self.caption_feats[cid]  # (N,)
        correct = self._images_of_label(self.caption_labels[cid]) if self.has_truth else None
        text = self.caption_texts[cid]
        return {"caption": cid, "query": text, **self._words(text),
                "results": [self._image_item(i, scores, correct) for i in top_indices(scores, k)],
                "truth": [{"id": i, "name": self.image_names[i], "rank": _rank(scores, i)}
                          for i in sorted(correct or ())]}

    def image(self, iid: int, k: int | None = None) -> dict[str, Any]:
        """An image -> the top-K captions of the split, and (split mode) its ground-truth captions with their ranks."""
        k, iid = self._k(k), self._image_id(iid)
        scores = self.caption_feats @ self.image_feats[iid]  # (M,)
        truth = (np.flatnonzero(self.caption_labels == self.image_labels[iid]).tolist() if self.has_truth else [])
        truth_set = set(truth)

        def item(c: int) -> dict[str, Any]:
            owner = int(self.caption_image[c]) if self.caption_image is not None else None
            return {"id": int(c), "text": self.caption_texts[c], "score": float(scores[c]),
                    "correct": int(c) in truth_set if self.has_truth else None, "image": owner}
        gt = sorted(({**item(c), "rank": _rank(scores, c)} for c in truth), key=lambda g: (g["rank"], g["id"]))
        return {"image": iid, "name": self.image_names[iid], "results": [item(c) for c in top_indices(scores, k)],
                "truth": gt}

    def worst(self, direction: str, page: int = 0, per_page: int = 20) -> dict[str, Any]:
        """The evaluation's numbers and one page of the direction's queries, worst rank first (ties: lower id)."""
        if self.evaluation is None:
            raise NotFound("no evaluation view: the browser was started with --images FOLDER, whose images have no "
                           "ground truth; start it without --images to evaluate the split")
        if direction not in self.ranks:
            raise BrowseError(f"direction {direction!r}: expected one of {list(self.ranks)}")
        if not 1 <= per_page <= MAX_PER_PAGE:
            raise BrowseError(f"per_page={per_page}: expected 1 to {MAX_PER_PAGE}")
        ranks = self.ranks[direction]
        pages = max(1, -(-len(ranks) // per_page))
        if not 0 <= page < pages:
            raise NotFound(f"page {page} does not exist: {pages} pages of {per_page} (pages are 0..{pages - 1})")
        order = np.lexsort((np.arange(len(ranks)), -ranks))[page * per_page:(page + 1) * per_page]
        if direction == "i2t":
            items = [{"kind": "image", "id": int(i), "name": self.image_names[i], "rank": int(ranks[i])}
                     for i in order]
        else:
            items = [{"kind": "caption", "id": int(c), "text": self.caption_texts[c], "rank": int(ranks[c]),
                      "image": int(self.caption_image[c])} for c in order]
        return {"metrics": self.evaluation, "direction": direction, "page": page, "pages": pages,
                "per_page": per_page, "queries": len(ranks), "items": items}

    # -------------------------------------------------------------------------------------------- image files
    def image_file(self, iid: int) -> Path:
        return self.image_paths[self._image_id(iid)]

    def thumbnail(self, iid: int) -> bytes:
        """A JPEG of the image with its longest side at most THUMB_SIDE (kept in a small in-memory LRU)."""
        import io

        from PIL import Image

        path = self.image_file(iid)
        with self._lock:
            if iid in self._thumbs:
                self._thumbs.move_to_end(iid)
                return self._thumbs[iid]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((THUMB_SIDE, THUMB_SIDE))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
        except OSError as e:
            raise NotFound(f"image {iid} ({self.image_names[iid]}) cannot be read: {e}") from None
        with self._lock:
            self._thumbs[iid] = buf.getvalue()
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return buf.getvalue()


# ------------------------------------------------------------------------------------------------ building
def from_split(model, data: Prepared, split: str, device: torch.device, *, top_k: int = 10, precision: str = "auto",
               batch_size: int = 64, directions: tuple[str, ...] | None = None, progress: bool = True,
               source: str = "", cache: Path | None = None, cache_key: str | None = None,
               fold: tuple[int, int] | None = None) -> BrowseIndex:
    """Encode a prepared split as evaluate.py does and evaluate it with the same function and directions
    (``directions`` None: t2i only for person-matched data such as CUHK-PEDES, else both). With ``cache`` (an .npz
    path) and ``cache_key`` (the checkpoint's identity), the encoded features are saved there and reused by a later
    start-up for the same checkpoint, prepared directory, split and precision. ``fold`` (i, k): only fold i (0-based)
    of k, the images and captions ``evaluate.py --folds k`` scores as its fold i (``engine.metrics.fold_members``)."""
    if cache is not None and cache_key is None:
        raise ValueError("a split feature cache needs cache_key (e.g. retrieval.index.checkpoint_key(CKPT))")
    key = split_cache_key(cache_key, data, split, precision, model.text.fc.out_features)
    feats = _cached_split(cache, key, data, split)
    if feats is None:
        feats = encode_split(model, data, split, device, batch_size=batch_size, precision=precision,
                             progress=progress)
        if cache is not None:
            write_split_cache(cache, key, feats)
    if fold is not None:  # the whole split is encoded (and cached) once; the fold is a view of it
        rows_, keep = fold_members(feats["image_labels"], feats["text_labels"], fold[1], fold[0])
        keep = keep.numpy()
        feats = {k: v[rows_] if k in ("images", "image_labels", "image_rows") else v[keep] for k, v in feats.items()}
    if directions is None:
        directions = ("t2i",) if data.manifest.get("match") == "person" else DIRECTIONS
    t = {k: torch.as_tensor(np.asarray(feats[k])) for k in ("images", "texts", "image_labels", "text_labels")}
    args = (t["images"].float(), t["texts"].float(), t["image_labels"], t["text_labels"])
    evaluation = evaluate_retrieval(*args, directions=directions)
    ranks = {d: r.numpy() for d, r in retrieval_ranks(*args, directions=directions).items()}
    rows = feats["image_rows"]
    idx = BrowseIndex(model=model, data=data, split=split, mode="split",
                      image_paths=[data.image_path(int(r)) for r in rows],
                      image_names=[str(data.images["file"].iat[int(r)]) for r in rows],
                      image_feats=unit_rows(feats["images"]), caption_rows=feats["caption_rows"],
                      caption_feats=unit_rows(feats["texts"]), image_labels=np.asarray(feats["image_labels"]),
                      caption_labels=np.asarray(feats["text_labels"]), device=device, precision=precision,
                      top_k=top_k, evaluation=evaluation, ranks=ranks, source=source, image_rows=rows)
    return idx


def split_cache_key(cache_key: str, data: Prepared, split: str, precision: str, dim: int) -> str:
    """What a split feature cache is valid for: checkpoint identity, prepared directory, split, precision, size."""
    return f"{cache_key}|{data.root.resolve()}|{data.manifest.get('created')}|{split}|{precision}|{dim}"


def write_split_cache(cache: Path, key: str, feats: dict[str, np.ndarray]) -> bool:
    """Save encode_split's arrays atomically (False, with a note, when the file cannot be written)."""
    return save_npz(cache, version=np.array(CACHE_VERSION), key=np.array(key), **feats)


def _cached_split(cache: Path | None, key: str, data: Prepared, split: str) -> dict[str, np.ndarray] | None:
    """encode_split's arrays from a cache written for ``key``, when its rows are still the split's rows."""
    old = read_npz(cache, key)
    if old is None:
        return None
    if not (np.array_equal(old.get("image_rows"), data.split_images(split))
            and np.array_equal(old.get("caption_rows"), data.split_captions(split))):
        return None
    return {k: old[k] for k in ("images", "texts", "image_labels", "text_labels", "image_rows", "caption_rows")}


def default_split_cache(checkpoint: Path, data: Prepared, split: str) -> Path:
    """Next to the checkpoint (the prepared directory stays read-only), named by checkpoint, data and split."""
    key = f"{checkpoint_key(checkpoint)}|{data.root.resolve()}|{split}"
    name = f".dualpath_browse_{split}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    return Path(checkpoint).resolve().parent / name


def from_folder(model, data: Prepared, split: str, folder: Path, device: torch.device, *, top_k: int = 10,
                precision: str = "auto", batch_size: int = 32, image_cache: Path | None = None,
                caption_cache: Path | None = None, cache_key: str | None = None, source: str = "") -> BrowseIndex:
    """A folder of images (cached features) as the gallery; the split's captions (cached) for the image view."""
    resize = data.manifest["image_resize"]
    paths, feats = encode_folder(model, folder, int(resize["size"]), resize["mode"], device, image_cache,
                                 cache_key=cache_key, precision=precision, batch_size=batch_size)
    rows, cfeats = encode_captions(model, data, split, device, caption_cache, cache_key=cache_key,
                                   precision=precision)
    return BrowseIndex(model=model, data=data, split=split, mode="folder", image_paths=list(paths),
                       image_names=[p.relative_to(folder).as_posix() for p in paths], image_feats=unit_rows(feats),
                       caption_rows=rows, caption_feats=unit_rows(cfeats), image_labels=None, caption_labels=None,
                       device=device, precision=precision, top_k=top_k, source=source)
