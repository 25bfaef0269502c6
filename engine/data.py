"""Datasets over the prepared cache: the original crop, position shift, and the Stage I / Stage II batches.

Determinism: every random choice of a sample (crop, flip, caption, shift) is drawn from a generator seeded by
``(seed, epoch, global position in the epoch)``, and the epoch's image order from ``(seed, epoch)``. A batch is thus
a pure function of (seed, epoch, batch index) whatever the worker count or the DDP rank count, which is what makes
resume bit-identical and lets N processes see disjoint shards of the very same global batch. One exception: the
hard-negative candidate pool is drawn per rank (each rank mines for its own anchors, as each GPU ran ``getBatch`` on
its own share in the original), so mined negatives depend on the rank count.

Epochs (spec 7.1, 7.5): the last batch of an epoch holds the images left over (``last_batch: keep``, the original's
``cnn_train_dag*.m``), in Stage II reduced to an even size (the original: "reduced by one"); with R ranks to a
multiple of R (2R in Stage II). Flickr30k: 931 batches per epoch, the last of 23 images (Stage II: 22).

Images leave the workers as uint8 tensors; the model's ``image.normalize`` converts them on the device (less to
transfer, and the input convention travels with the checkpoint: ``models/image_cnn.py``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from prepare.images import original_crop_box  # spec 2.5's crop (prepare.synthetic_backbone cuts it too)
from utils.cli import InvalidValue, UserError

from .config import CHOICES

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


class PreparedDataError(UserError, RuntimeError):
    pass


class Prepared:
    """Read-only view of a prepared directory (format: ``prepare/__init__.py``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.is_file():
            raise PreparedDataError(f"{self.root}: no manifest.json; is this a prepared directory? "
                                    f"Run python -m prepare.<dataset> first.")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise PreparedDataError(f"{mpath}: format_version {self.manifest.get('format_version')!r}, "
                                    f"expected {FORMAT_VERSION}; prepare the data again")
        self.images = pd.read_parquet(self.root / "images.parquet")
        self.captions = pd.read_parquet(self.root / "captions.parquet")
        self.tokens = np.load(self.root / "tokens.npy", mmap_mode="r")  # (M, max_len) int32
        self.max_len = int(self.manifest["max_len"])
        self.num_classes = int(self.manifest["num_classes"])
        self.vocab_size = int(self.manifest["vocab_size"])
        if self.tokens.shape != (len(self.captions), self.max_len):
            raise PreparedDataError(f"{self.root}/tokens.npy: shape {self.tokens.shape}, expected "
                                    f"({len(self.captions)}, {self.max_len})")

    def word2vec(self) -> torch.Tensor:
        return torch.from_numpy(np.load(self.root / "word2vec.npy")).float()  # (V, 300)

    def split_images(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return np.flatnonzero(self.images["split"].to_numpy() == split)

    def split_captions(self, split: str, first_k: int | None = None) -> np.ndarray:
        mask = self.captions["split"].to_numpy() == split
        if first_k is not None:
            mask &= self.captions["k"].to_numpy() < first_k
        return np.flatnonzero(mask)

    def image_path(self, row: int) -> Path:
        return self.root / "images" / self.images["file"].iat[row]


# ---------------------------------------------------------------------------------------------- image pipeline
def train_image(path: Path, rng: np.random.Generator, size: int) -> torch.Tensor:
    """Decode, crop (spec 2.5), resize to size x size bicubic, flip with p = 0.5. -> (3, size, size) uint8."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        box = original_crop_box(im.width, im.height, rng)
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
    arr = np.asarray(im)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def test_image(path: Path) -> torch.Tensor:
    """The whole prepared image (spec 8.1: no crop, no resize). -> (3, H, W) uint8."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).transpose(2, 0, 1).copy())


# ---------------------------------------------------------------------------------------------- training batches
@dataclass(frozen=True)
class TrainSpec:
    stage: int
    batch_size: int  # global
    crop: int
    seed: int
    position_shift: bool = True
    negatives: str = "hard"
    num_candidates: int = 256
    world_size: int = 1
    rank: int = 0
    last_batch: str = "keep"  # "keep": the leftover images form a last, smaller batch; "drop": they are skipped


def epoch_batches(n_images: int, batch_size: int, stage: int, world_size: int = 1, last_batch: str = "keep"
                  ) -> tuple[int, int]:
    """(full batches, size of the extra last batch or 0) of an epoch over ``n_images`` training images. The
    leftover images form the last batch (the original's ``cnn_train_dag*.m``), in Stage II reduced to an even size
    ("reduced by one", spec 7.5), with R ranks to a multiple of R (Stage II: 2R); fewer than 2 per rank are dropped
    (training-mode BatchNorm needs two values per channel). Flickr30k: (930, 23) in Stage I, (930, 22) in Stage II."""
    full, rest = divmod(n_images, batch_size)
    unit = world_size * (2 if stage == 2 else 1)  # Stage II: anchor/negative halves on every rank
    last = rest - rest % unit if last_batch == "keep" else 0
    return full, (last if last >= 2 * world_size else 0)


class TrainBatches(Dataset):
    """Item b of epoch e = this rank's share of global batch b (use with ``DataLoader(batch_size=None)``).

    Stage I: B images (each training image once per epoch) + one random caption of its class each.
    Stage II: images [Xp (B/2); Xn (B/2)], texts [Yp; Yn placeholder] and the candidate pool for mining
    (hard negatives), or Yn drawn directly (random negatives of another identity, CUHK-PEDES).
    The last batch of an epoch may be smaller (``batch_size_of``); every caption of a class is drawn, the empty
    ones (no dictionary word: an all-padding input) included, as the original's ``randi`` over a class's captions."""

    def __init__(self, data: Prepared, spec: TrainSpec, epoch: int = 0) -> None:
        self.data, self.spec, self.epoch = data, spec, epoch
        if spec.batch_size % spec.world_size or (spec.stage == 2 and spec.batch_size % (2 * spec.world_size)):
            raise InvalidValue(f"batch_size {spec.batch_size} must split evenly over {spec.world_size} rank(s)"
                             f"{' into anchor/negative halves' if spec.stage == 2 else ''}")
        self.train_rows = data.split_images("train")  # image rows; label = class
        self.image_class = data.images["label"].to_numpy()
        if spec.last_batch not in CHOICES["last_batch"]:
            raise InvalidValue(f"last_batch must be one of {list(CHOICES['last_batch'])}, got {spec.last_batch!r}")
        caps = data.captions
        train_caps = np.flatnonzero(caps["split"].to_numpy() == "train")
        cap_class = caps["label"].to_numpy()[train_caps]
        order = np.argsort(cap_class, kind="stable")
        self.class_caps = train_caps[order]  # caption rows grouped by class (CSR)
        self.cap_class = cap_class[order]  # (M_train,) the class of each entry of class_caps
        counts = np.bincount(cap_class, minlength=data.num_classes)
        if (counts == 0).any():
            bad = np.flatnonzero(counts == 0)[:5].tolist()
            raise PreparedDataError(f"{data.root}: training classes {bad} have no caption")
        self.class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.class_count = counts
        self.lengths = caps["length"].to_numpy()
        full, last = epoch_batches(len(self.train_rows), spec.batch_size, spec.stage, spec.world_size,
                                   spec.last_batch)
        if full == 0:
            raise InvalidValue(f"{data.root}: {len(self.train_rows)} training images < one batch of {spec.batch_size} "
                             f"(lower batch_size)")
        self.last_size = last  # the size of an extra last batch (0: none)
        self.n_batches = full + (last > 0)
        # hard negatives come from training images outside the batch (Flickr30k: the whole batch); MSCOCO's
        # original removes only the B/2 anchors (spec 7.5; train_coco_Rankloss_shift_hard.m)
        self.pool_excludes_anchors_only = data.manifest.get("dataset") == "coco"
        if spec.stage == 2 and spec.negatives == "hard" and len(self.train_rows) <= spec.batch_size:
            raise InvalidValue(f"{data.root}: hard negatives come from training images outside the batch: "
                               f"{len(self.train_rows)} training images leave none outside a batch of "
                               f"{spec.batch_size}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def batch_size_of(self, b: int) -> int:
        """The global size of batch ``b``: ``batch_size``, or the leftover images for the last one."""
        return self.last_size if self.last_size and b == self.n_batches - 1 else self.spec.batch_size

    def permutation(self) -> np.ndarray:
        """The epoch's image order (cached per epoch: 113,287 rows for MSCOCO)."""
        if getattr(self, "_perm_epoch", None) != self.epoch:
            self._perm = np.random.default_rng([self.spec.seed, self.epoch]).permutation(self.train_rows)
            self._perm_epoch = self.epoch
        return self._perm

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, self.epoch, *key])

    def _caption(self, cls: int, rng: np.random.Generator) -> int:
        return int(self.class_caps[self.class_start[cls] + rng.integers(self.class_count[cls])])

    def _tokens(self, cap: int, rng: np.random.Generator) -> np.ndarray:
        tok = np.zeros(self.data.max_len, dtype=np.int64)
        n = int(self.lengths[cap])
        off = int(rng.integers(self.data.max_len - n + 1)) if self.spec.position_shift else 0
        tok[off:off + n] = self.data.tokens[cap, :n]  # position shift (spec 2.1 item 5)
        return tok

    def _sample(self, row: int, pos: int) -> tuple[torch.Tensor, np.ndarray, int]:
        """Global position ``pos`` -> (image, shifted caption tokens of its class, class)."""
        rng = self._rng(pos)
        cls = int(self.image_class[row])
        img = train_image(self.data.image_path(row), rng, self.spec.crop)
        return img, self._tokens(self._caption(cls, rng), rng), cls

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """``key``: a batch index of the current epoch, or ``(epoch, b)`` (``RunSampler``; the batch then carries
        ``key`` = [epoch, b], which the trainer checks against its own position)."""
        if isinstance(key, tuple):
            self.epoch, b = key  # in a worker: this process's copy of the dataset
            batch = self._batch(b)
            batch["key"] = torch.tensor(key)
            return batch
        return self._batch(key)

    def _batch(self, b: int) -> dict[str, torch.Tensor]:
        s = self.spec
        perm = self.permutation()
        start, size = b * s.batch_size, self.batch_size_of(b)
        if s.stage == 1:
            local = size // s.world_size
            positions = list(range(start + s.rank * local, start + (s.rank + 1) * local))
        else:  # keep anchor i and its negative B/2 + i on the same rank
            half, lhalf = size // 2, size // (2 * s.world_size)
            anchors = list(range(start + s.rank * lhalf, start + (s.rank + 1) * lhalf))
            positions = anchors + [p + half for p in anchors]
        rows = perm[positions]
        samples = [self._sample(int(r), p) for r, p in zip(rows, positions)]
        batch = {"images": torch.stack([x[0] for x in samples]),  # (b, 3, crop, crop) uint8
                 "tokens": torch.from_numpy(np.stack([x[1] for x in samples])),  # (b, L)
                 "labels": torch.tensor([x[2] for x in samples])}  # (b,)
        batch["text_labels"] = batch["labels"].clone()  # Stage I: caption i belongs to image i
        if s.stage == 2:
            batch.update(self._negatives(b, perm[start:start + size], positions))
            if "replace_at" in batch:  # random negatives: an Xn of the anchor's own identity was redrawn
                at = batch.pop("replace_at")
                batch["images"][at] = batch.pop("replace_images")
                batch["labels"][at] = batch.pop("replace_labels")
            h = len(positions) // 2  # texts: [Yp; Yn]; Yn is filled in by mining (hard) or given (random)
            batch["text_labels"] = batch["labels"].clone()  # after the Xn replacement above
            if "neg_tokens" in batch:
                batch["tokens"][h:] = batch.pop("neg_tokens")
                batch["text_labels"][h:] = batch.pop("neg_labels")
        return batch

    def _negatives(self, b: int, global_rows: np.ndarray, positions: list[int]) -> dict[str, torch.Tensor]:
        """Stage II (spec 7.5), for this rank's anchors (``positions``: its images' places in the epoch, anchors
        first). Hard: a pool of candidate captions, one per random training image outside the global batch (MSCOCO:
        outside its anchors), each with its own shift; the trainer picks Yn by mining; one pool per rank. Random
        (CUHK-PEDES): Yn = a uniformly random training caption of another identity (``rand_diff_class2.m``); Xn
        replaced by a random training image of another identity when it shares the anchor's
        (``rand_diff_class3.m``); drawn for the whole global batch, so every rank count trains on the same."""
        s = self.spec
        half = len(global_rows) // 2
        if s.negatives == "hard":
            rng = self._rng(1_000_000_000 + b, s.rank)
            excluded = np.isin(self.train_rows, global_rows[:half] if self.pool_excludes_anchors_only else global_rows)
            pool_rows = self.train_rows[~excluded]
            picks = pool_rows[rng.integers(len(pool_rows), size=s.num_candidates)]
            cls = self.image_class[picks]
            tokens = np.stack([self._tokens(self._caption(int(c), rng), rng) for c in cls])
            return {"cand_tokens": torch.from_numpy(tokens), "cand_labels": torch.from_numpy(cls.astype(np.int64))}
        if self.data.num_classes < 2:
            raise InvalidValue("random negatives need at least two training classes")
        rng = self._rng(1_000_000_000 + b)
        start = b * s.batch_size  # the global batch's first position in the epoch
        neg_tokens, neg_labels, replace = [], [], {}
        for i in range(half):  # every anchor of the global batch, in order (B/2 draws, cheap)
            anchor = int(self.image_class[global_rows[i]])
            j = int(rng.integers(len(self.class_caps)))
            while self.cap_class[j] == anchor:  # Yn: a random training caption of a different identity
                j = int(rng.integers(len(self.class_caps)))
            neg_tokens.append(self._tokens(int(self.class_caps[j]), rng))
            neg_labels.append(int(self.cap_class[j]))
            if int(self.image_class[global_rows[half + i]]) == anchor:  # Xn shares the anchor's identity: replace
                row = int(self.train_rows[rng.integers(len(self.train_rows))])
                while int(self.image_class[row]) == anchor:
                    row = int(self.train_rows[rng.integers(len(self.train_rows))])
                replace[i] = row
        mine = [p - start for p in positions[:len(positions) // 2]]  # this rank's anchors, as global indices
        h = len(mine)
        out = {"neg_tokens": torch.from_numpy(np.stack([neg_tokens[i] for i in mine])),
               "neg_labels": torch.tensor([neg_labels[i] for i in mine])}
        at = [k for k, i in enumerate(mine) if i in replace]
        if at:
            out["replace_at"] = torch.tensor([h + k for k in at])
            rows = [replace[mine[k]] for k in at]  # each crop drawn from its place in the epoch, like any image
            out["replace_images"] = torch.stack([train_image(self.data.image_path(r), self._rng(positions[h + k], 1),
                                                             s.crop) for r, k in zip(rows, at)])
            out["replace_labels"] = torch.from_numpy(self.image_class[rows].astype(np.int64))
        return out


class RunSampler:
    """The ``(epoch, batch)`` keys from a position to the end of the run, in order: ONE DataLoader iterator (and one
    set of workers) serves every remaining epoch, prefetching across epoch ends and validation. A batch being a pure
    function of (seed, epoch, batch), resuming at (epoch, batch) continues exactly."""

    def __init__(self, n_batches: int, epochs: int, epoch: int, batch: int) -> None:
        self.n_batches, self.epochs, self.epoch, self.batch = n_batches, epochs, epoch, batch

    def __iter__(self):
        for e in range(self.epoch, self.epochs):
            for b in range(self.batch if e == self.epoch else 0, self.n_batches):
                yield e, b

    def __len__(self) -> int:
        return max(0, (self.epochs - self.epoch) * self.n_batches - self.batch)


MAX_AUTO_WORKERS = 16


def resolve_workers(workers: int | str, device: torch.device, cores: int | None = None,
                    local_processes: int | None = None) -> int:
    """The config's ``workers`` as a number. ``auto``: 1 on CPU (the model's own computation needs the cores and is
    far slower than one worker's decoding); on CUDA the usable cores of this process (the node's, divided among the
    ``torchrun`` processes on it) minus 2 (the main process and pinning), between 1 and 16."""
    if workers != "auto":
        return int(workers)
    if device.type != "cuda":
        return 1
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, cores // max(1, local_processes) - 2))


# ---------------------------------------------------------------------------------------------- evaluation data
class TestImages(Dataset):
    """Whole prepared images of one split, batched by identical size (spec 8.1 is fully convolutional)."""

    def __init__(self, data: Prepared, rows: np.ndarray, batch_size: int) -> None:
        self.data, self.rows = data, rows
        sizes = []
        for r in rows:
            with Image.open(data.image_path(int(r))) as im:
                sizes.append(im.size)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            by_size.setdefault(size, []).append(i)
        self.batches = [idx[k:k + batch_size] for idx in by_size.values() for k in range(0, len(idx), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batches[b]
        imgs = torch.stack([test_image(self.data.image_path(int(self.rows[i]))) for i in idx])
        return imgs, torch.tensor(idx)  # (n, 3, H, W) uint8, positions within ``rows``
