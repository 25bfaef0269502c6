"""Datasets over the prepared cache: the original crop, position shift, and the Stage I / Stage II batches.

Determinism: every random choice of a sample (crop, flip, caption, shift) is drawn from a generator seeded by
``(seed, epoch, global position in the epoch)``, and the epoch's image order from ``(seed, epoch)``. A batch is thus
a pure function of (seed, epoch, batch index) whatever the worker count or the DDP rank count, which is what makes
resume bit-identical and lets N processes see disjoint shards of the very same global batch.

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


class TrainBatches(Dataset):
    """Item b of epoch e = this rank's share of global batch b (use with ``DataLoader(batch_size=None)``).

    Stage I: B images (each training image once per epoch) + one random caption of its class each.
    Stage II: images [Xp (B/2); Xn (B/2)], texts [Yp; Yn placeholder] and the candidate pool for mining
    (hard negatives), or Yn drawn directly (random negatives of another identity, CUHK-PEDES)."""

    def __init__(self, data: Prepared, spec: TrainSpec, epoch: int = 0) -> None:
        self.data, self.spec, self.epoch = data, spec, epoch
        if spec.batch_size % spec.world_size or (spec.stage == 2 and spec.batch_size % (2 * spec.world_size)):
            raise InvalidValue(f"batch_size {spec.batch_size} must split evenly over {spec.world_size} rank(s)"
                             f"{' into anchor/negative halves' if spec.stage == 2 else ''}")
        self.train_rows = data.split_images("train")  # image rows; label = class
        self.image_class = data.images["label"].to_numpy()
        caps = data.captions
        train_caps = np.flatnonzero((caps["split"].to_numpy() == "train") & (caps["length"].to_numpy() > 0))
        cap_class = caps["label"].to_numpy()[train_caps]
        order = np.argsort(cap_class, kind="stable")
        self.class_caps = train_caps[order]  # caption rows grouped by class (CSR)
        counts = np.bincount(cap_class, minlength=data.num_classes)
        if (counts == 0).any():
            bad = np.flatnonzero(counts == 0)[:5].tolist()
            raise PreparedDataError(f"{data.root}: training classes {bad} have no non-empty caption")
        self.class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.class_count = counts
        self.lengths = caps["length"].to_numpy()
        n_batches = len(self.train_rows) // spec.batch_size  # an incomplete last batch is dropped
        if n_batches == 0:
            raise InvalidValue(f"{data.root}: {len(self.train_rows)} training images < one batch of {spec.batch_size} "
                             f"(lower batch_size)")
        self.n_batches = n_batches
        if spec.stage == 2 and spec.negatives == "hard" and len(self.train_rows) <= spec.batch_size:
            raise InvalidValue(f"{data.root}: hard negatives come from training images outside the batch: {len(self.train_rows)} "
                             f"training images leave none outside a batch of {spec.batch_size}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

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
        start = b * s.batch_size
        if s.stage == 1:
            local = s.batch_size // s.world_size
            positions = list(range(start + s.rank * local, start + (s.rank + 1) * local))
        else:  # keep anchor i and its negative 16 + i on the same rank
            half, lhalf = s.batch_size // 2, s.batch_size // (2 * s.world_size)
            anchors = list(range(start + s.rank * lhalf, start + (s.rank + 1) * lhalf))
            positions = anchors + [p + half for p in anchors]
        rows = perm[positions]
        samples = [self._sample(int(r), p) for r, p in zip(rows, positions)]
        batch = {"images": torch.stack([x[0] for x in samples]),  # (b, 3, crop, crop) uint8
                 "tokens": torch.from_numpy(np.stack([x[1] for x in samples])),  # (b, L)
                 "labels": torch.tensor([x[2] for x in samples])}  # (b,)
        batch["text_labels"] = batch["labels"].clone()  # Stage I: caption i belongs to image i
        if s.stage == 2:
            batch.update(self._negatives(b, batch["labels"], perm[start:start + s.batch_size]))
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

    def _negatives(self, b: int, labels: torch.Tensor, global_rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Stage II (spec 7.5). Hard: a pool of candidate captions, one per random training image outside the
        global batch, each with its own shift; the trainer picks Yn by mining. Random (CUHK): Yn = a caption of
        another identity; Xn replaced by an image of another identity when it shares the anchor's."""
        s = self.spec
        h = labels.shape[0] // 2
        rng = self._rng(1_000_000_000 + b, s.rank)
        if s.negatives == "hard":
            excluded = np.isin(self.train_rows, global_rows)
            pool_rows = self.train_rows[~excluded]
            picks = pool_rows[rng.integers(len(pool_rows), size=s.num_candidates)]
            cls = self.image_class[picks]
            tokens = np.stack([self._tokens(self._caption(int(c), rng), rng) for c in cls])
            return {"cand_tokens": torch.from_numpy(tokens), "cand_labels": torch.from_numpy(cls.astype(np.int64))}
        if self.data.num_classes < 2:
            raise InvalidValue("random negatives need at least two training classes")
        neg_tokens, neg_labels, replace_at, replace_rows = [], [], [], []
        for i in range(h):  # a loop over the B/2 anchors, in the worker
            anchor = int(labels[i])
            cls = anchor
            while cls == anchor:  # Yn: a random training caption of a different identity
                cls = int(self.image_class[self.train_rows[rng.integers(len(self.train_rows))]])
            neg_tokens.append(self._tokens(self._caption(cls, rng), rng))
            neg_labels.append(cls)
            if int(labels[h + i]) == anchor:  # Xn shares the anchor's identity: replace it
                row = int(self.train_rows[rng.integers(len(self.train_rows))])
                while int(self.image_class[row]) == anchor:
                    row = int(self.train_rows[rng.integers(len(self.train_rows))])
                replace_at.append(h + i)
                replace_rows.append(row)
        out = {"neg_tokens": torch.from_numpy(np.stack(neg_tokens)), "neg_labels": torch.tensor(neg_labels)}
        if replace_at:
            out["replace_at"] = torch.tensor(replace_at)
            out["replace_images"] = torch.stack([train_image(self.data.image_path(r), rng, s.crop)
                                                 for r in replace_rows])
            out["replace_labels"] = torch.from_numpy(self.image_class[replace_rows].astype(np.int64))
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
