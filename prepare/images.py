"""Resize the raw images once into the prepared directory (spec 2.2-2.4); the training crop's box (spec 2.5).

Flickr30k / MSCOCO: shorter side to S, aspect kept ("short_side"); CUHK-PEDES: S x S ("square").
Pillow BICUBIC, RGB (grayscale / CMYK / palette converted), JPEG quality 95. Large JPEGs (at least 2x the
needed size on both axes) are decoded with ``Image.draft`` asking for at least 2x the target, so Pillow only
picks a reduced DCT scale (1/2, 1/4, 1/8) that keeps the draft >= 2x the target and the final bicubic step still
down-samples by >= 2 (mean abs. difference < 1.5 grey levels in the tests). It therefore only gains when the
original is >= 4x the target, e.g. 640x480 COCO at S=64 (159 images: 0.8 s instead of 1.4 s); ~500-px Flickr
images at S=256 or 128 decode exactly as without it.
EXIF orientation is ignored, as MATLAB's imread (used by the original code) ignores it.

``resize_many`` runs a list of jobs serially or in a process pool; a benchmark can call it directly.
"""
from __future__ import annotations

import math
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from prepare.core import PrepareError

RESIZE_MODES = ("short_side", "square")
JPEG_QUALITY = 95
_BATCH = 16  # images per pool task (amortises inter-process overhead)


def target_size(width: int, height: int, size: int, mode: str = "short_side") -> tuple[int, int]:
    """Output (width, height): shorter side = size with aspect kept, or size x size for mode 'square'."""
    if mode == "square":
        return size, size
    if mode != "short_side":
        raise PrepareError(f"unknown resize mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")
    if width <= height:
        return size, max(1, round(height * size / width))
    return max(1, round(width * size / height)), size


def load_resized(src: str | Path, size: int, mode: str = "short_side",
                 draft: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``src`` and return (RGB image resized to the target size, original (width, height)).

    Raises PrepareError naming the file when it is missing, truncated or not an image.
    """
    try:
        with Image.open(src) as img:
            orig = img.size
            tw, th = target_size(orig[0], orig[1], size, mode)
            if draft and img.format == "JPEG" and orig[0] >= 2 * tw and orig[1] >= 2 * th:
                img.draft("RGB", (2 * tw, 2 * th))  # DCT-domain reduction, result still >= 2x the target
            rgb = img.convert("RGB")  # decodes the whole file: a truncated JPEG fails here
        out = rgb if rgb.size == (tw, th) else rgb.resize((tw, th), Image.Resampling.BICUBIC)
    except FileNotFoundError:
        raise PrepareError(f"image {src}: no such file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PrepareError(f"image {src}: cannot decode it ({e}); expected a complete JPEG/PNG file "
                           f"(truncated or corrupt download?)") from None
    return out, orig


def resize_image(src: str | Path, dst: str | Path, size: int, mode: str = "short_side",
                 draft: bool = True) -> tuple[tuple[int, int], tuple[float, float, float]]:
    """Resize one image to ``dst`` (JPEG quality 95); returns (the original (width, height), the mean R, G, B of the
    resized image in 0-255; the preparers average it over the training images: ``rgb_mean``)."""
    out, orig = load_resized(src, size, mode, draft)
    mean = tuple(float(m) for m in np.asarray(out, dtype=np.float64).reshape(-1, 3).mean(0))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        out.save(dst, "JPEG", quality=JPEG_QUALITY)
    except OSError as e:
        raise PrepareError(f"cannot write {dst}: {e}") from None
    return orig, mean


def _resize_batch(jobs: Sequence[tuple[str, str]], size: int, mode: str, draft: bool) -> list[tuple]:
    return [resize_image(src, dst, size, mode, draft) for src, dst in jobs]


def _ignore_sigint() -> None:
    """Pool workers leave Ctrl-C to the parent, which cancels the pending work and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def resize_many(jobs: Sequence[tuple[str | Path, str | Path]], size: int, mode: str = "short_side", *,
                workers: int = 1, draft: bool = True, progress: bool = False) -> list[tuple]:
    """Resize every (src, dst) job; returns ((width, height) original, mean RGB resized) in job order.

    workers <= 1 runs in this process; otherwise a process pool of that many workers. The first failure
    (PrepareError naming the file) or a KeyboardInterrupt cancels the remaining work and propagates.
    """
    from tqdm import tqdm

    jobs = [(str(s), str(d)) for s, d in jobs]
    bar = tqdm(total=len(jobs), unit="img", desc="images", disable=not progress, leave=False)
    sizes: list[tuple] = []
    try:
        if workers <= 1 or len(jobs) <= _BATCH:
            for src, dst in jobs:
                sizes.append(resize_image(src, dst, size, mode, draft))
                bar.update(1)
            return sizes
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_ignore_sigint)
        try:
            futures = [pool.submit(_resize_batch, jobs[i:i + _BATCH], size, mode, draft)
                       for i in range(0, len(jobs), _BATCH)]
            for fut in futures:
                part = fut.result()
                sizes.extend(part)
                bar.update(len(part))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return sizes
    finally:
        bar.close()


def original_crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Spec 2.5 (vl_imreadjpeg 'CropSize',[0.8,1], 'CropAnisotropy',[3/4,4/3], random location): aspect A
    log-uniform in [3/4, 4/3]; the crop shape (sqrt(A) : 1/sqrt(A)) scaled to the largest size that fits, then by s
    with s^2 ~ U[0.64, 1] (64-100 % of the maximal area); position uniform. Returns the PIL box (x0, y0, x1, y1)."""
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w0, h0 = math.sqrt(aspect), 1 / math.sqrt(aspect)
    s = math.sqrt(rng.uniform(0.64, 1.0)) * min(width / w0, height / h0)
    cw, ch = min(w0 * s, width), min(h0 * s, height)
    x0, y0 = rng.uniform(0, width - cw), rng.uniform(0, height - ch)
    return x0, y0, x0 + cw, y0 + ch
