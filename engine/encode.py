"""Test-time features of a prepared split (spec 8.1), shared by validation during training and evaluate.py.

Images: the whole prepared image, fully convolutional, pre-ReLU head output summed over positions, plus the same
for the horizontally flipped image. Texts: the pre-ReLU feature summed over every position shift of the caption.
Both are returned un-normalised; the evaluator L2-normalises. The model is put in eval mode for the encoding and
its previous mode is restored afterwards (the vsepp "stuck in eval mode" defect cannot happen here).
"""
from __future__ import annotations

import sys
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from models import DualPath

from .data import Prepared, TestImages


def allow_tf32(device: torch.device, precision: str) -> bool:
    """fp32 on CUDA: let matmuls and convolutions use TF32 tensor cores where the GPU has them (Ampere and later;
    10-bit mantissa products, fp32 accumulation: the "fp32 with TF32" of the paper recipes). Returns True when
    set. CPU and the autocast precisions are left alone."""
    if device.type != "cuda" or precision != "fp32":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast on CUDA unless fp32 was asked for; fp32 on CPU unless bf16 was asked for. ``cache=False``
    inside a CUDA graph capture (PyTorch: autocast's weight-cast cache must not outlive the capture)."""
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16, cache_enabled=cache)
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if use_bf16 else nullcontext()


def _bar(items, show: bool, what: str, total: int, count):
    """``items`` unchanged, or wrapped in a tqdm bar that advances by ``count(item)`` (images / captions)."""
    if not show:
        yield from items
        return
    from tqdm import tqdm
    with tqdm(total=total, desc=f"encoding {what}", unit=" items", file=sys.stderr) as bar:
        for item in items:
            yield item
            bar.update(count(item))


@torch.no_grad()
def encode_split(model: DualPath, data: Prepared, split: str, device: torch.device, *, batch_size: int = 64,
                 precision: str = "auto", channels_last: bool = False, first_k: int | None = None,
                 workers: int = 0, max_images: int | None = None, progress: bool = False
                 ) -> dict[str, np.ndarray]:
    """Returns ``images`` (N, D), ``texts`` (M, D) float32, ``image_labels`` (N,), ``text_labels`` (M,),
    ``image_rows`` / ``caption_rows`` (rows of the prepared tables). Labels follow the ``person`` column: a text
    matches an image when they are equal. ``first_k`` keeps only each image's first k captions (COCO's usual 5);
    ``max_images`` encodes only the first images of the split (quick validation); ``progress`` shows tqdm bars
    (on stderr) for the images and the captions."""
    was_training = model.training
    model.eval()
    allow_tf32(device, precision)
    try:
        rows = data.split_images(split)
        if max_images:
            rows = rows[:max_images]
        img_feats = np.zeros((len(rows), model.text.fc.out_features), dtype=np.float32)
        loader = DataLoader(TestImages(data, rows, batch_size), batch_size=None, num_workers=workers,
                            generator=torch.Generator())
        loader = _bar(loader, progress, f"{split} images", len(rows), lambda b: len(b[1]))  # (n images, positions)
        for imgs, pos in loader:
            x = model.image.normalize(imgs.to(device, non_blocking=True), channels_last)
            with autocast(device, precision):
                img_feats[pos.numpy()] = model.image.test_feature(x).float().cpu().numpy()  # (n, 2048)
        caps = data.split_captions(split, first_k)
        caps = caps[np.isin(data.captions["image"].to_numpy()[caps], rows)]
        txt_feats = encode_captions(model, data, caps, device, batch_size=batch_size * 4, precision=precision,
                                    progress=progress)
        person = data.images["person"].to_numpy()
        return {"images": img_feats, "texts": txt_feats, "image_labels": person[rows],
                "text_labels": data.captions["person"].to_numpy()[caps], "image_rows": rows, "caption_rows": caps}
    finally:
        model.train(was_training)


@torch.no_grad()
def encode_captions(model: DualPath, data: Prepared, rows: np.ndarray, device: torch.device, *,
                    batch_size: int = 256, precision: str = "auto", progress: bool = False) -> np.ndarray:
    """Spec 8.1 text features (sum over all position shifts) of caption ``rows``, in eval mode. -> (M, D)."""
    was_training = model.training
    model.eval()
    try:
        lengths_all = data.captions["length"].to_numpy()
        feats = np.zeros((len(rows), model.text.fc.out_features), dtype=np.float32)
        starts = range(0, len(rows), batch_size)
        for start in _bar(starts, progress, "captions", len(rows), lambda s: len(rows[s:s + batch_size])):
            idx = rows[start:start + batch_size]
            tokens = torch.from_numpy(np.asarray(data.tokens[idx], dtype=np.int64)).to(device)  # (b, L)
            lengths = torch.from_numpy(lengths_all[idx].astype(np.int64)).to(device)  # (b,)
            with autocast(device, precision):
                feats[start:start + len(idx)] = model.text.test_feature(tokens, lengths).float().cpu().numpy()
        return feats
    finally:
        model.train(was_training)
