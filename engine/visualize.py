"""Retrieval examples as PNG grids (Pillow only): what the model returns for a few queries, right or wrong.

``text_to_image_grid``  one row per sentence query: the query (wrapped) on the left, then the top-K images; a correct
                        image has a thick GREEN frame, a wrong one a thin red frame; rank, score and file name under
                        each thumbnail.
``image_to_text_grid``  one row per image query: the thumbnail, then its top-K captions, one line each; correct ones
                        in green marked ``[+]``, wrong ones in black marked ``[-]``.
``retrieval_figures``   both grids for a few deterministic queries of an encoded split (``engine.encode.encode_split``).
``save_png``            writes an (H, W, 3) uint8 array atomically.

The layout is fixed by the arguments (``thumb``, K, the number of queries), not by the text: a text that does not
fit its box is cut with "...". Sizes, with B = ``FRAME`` and P = ``PAD``::

    text_to_image_grid   width  = P + 2*thumb + P + K * (thumb + 2B + P)
                         height = P + n * (thumb + 2B + label_height + P)
    image_to_text_grid   width  = P + (thumb + 2B) + P + text_width + P          (text_width default 6*thumb)
                         height = P + n * (max(thumb + 2B, K * line_height) + P)

(``grid_size_t2i`` / ``grid_size_i2t`` return them.)
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from utils.files import atomic_write
from utils.vectors import top_indices, unit_rows

PAD = 8  # space between cells and around the grid
FRAME = 6  # the frame band around every thumbnail (a correct item fills it)
WRONG_WIDTH = 2  # a wrong item's frame: the innermost 2 px of the band
BACKGROUND = (255, 255, 255)
GREEN = (0, 190, 0)
WRONG = (215, 60, 60)
TEXT = (0, 0, 0)
MUTED = (90, 90, 90)
LETTERBOX = (235, 235, 235)
FONT_SIZE = 13


@lru_cache(maxsize=8)
def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font, at a readable size where this Pillow can scale it (>= 10.1 with FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def line_height(font=None) -> int:
    font = font or _font()
    top, bottom = font.getbbox("Agy|")[1::2]
    return int(bottom - top) + 4


def label_height(font=None) -> int:
    """The space under a thumbnail: two lines (rank + score, file name)."""
    return 2 * line_height(font) + 2


def _fit(text: str, width: int, font) -> str:
    """``text`` cut with '...' to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def wrap(text: str, width: int, font=None, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word longer than a line is cut; the last kept line gets '...' when
    lines were dropped."""
    font = font or _font()
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word if font.getlength(word) <= width else _fit(word, width, font)
    if current:
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max(1, max_lines)]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def _thumbnail(path: str | Path | None, thumb: int) -> Image.Image:
    """The image scaled to fit thumb x thumb (aspect kept, letterboxed); a grey box with 'missing' if unreadable."""
    canvas = Image.new("RGB", (thumb, thumb), LETTERBOX)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im = ImageOps.contain(im, (thumb, thumb), Image.Resampling.BICUBIC)  # up- or down-scaled to fit
            canvas.paste(im, ((thumb - im.width) // 2, (thumb - im.height) // 2))
    except (OSError, ValueError, TypeError, AttributeError):
        ImageDraw.Draw(canvas).text((4, thumb // 2 - 6), "missing", fill=MUTED, font=_font())
    return canvas


def _framed(draw: ImageDraw.ImageDraw, canvas: Image.Image, path, x: int, y: int, thumb: int,
            correct: bool | None) -> None:
    """Thumbnail at (x + FRAME, y + FRAME) inside its frame band: thick green (correct), thin red (wrong),
    none (``None``: a query image)."""
    cell = thumb + 2 * FRAME
    if correct is True:
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=GREEN)
    elif correct is False:
        o = FRAME - WRONG_WIDTH
        draw.rectangle([x + o, y + o, x + cell - 1 - o, y + cell - 1 - o], fill=WRONG)
    canvas.paste(_thumbnail(path, thumb), (x + FRAME, y + FRAME))


def _check_rows(name: str, n: int, *lists: Sequence | None) -> int:
    k = None
    for values in lists:
        if values is None:
            continue
        if len(values) != n:
            raise ValueError(f"{name}: expected {n} rows (one per query), got {len(values)}")
        for row in values:
            if k is None:
                k = len(row)
            elif len(row) != k:
                raise ValueError(f"{name}: every query needs the same number K of results ({k} vs {len(row)})")
    return k or 0


def grid_size_t2i(n_queries: int, k: int, thumb: int = 128) -> tuple[int, int]:
    """(height, width) of ``text_to_image_grid``."""
    cell = thumb + 2 * FRAME
    return (PAD + n_queries * (cell + label_height() + PAD), PAD + 2 * thumb + PAD + k * (cell + PAD))


def grid_size_i2t(n_queries: int, k: int, thumb: int = 128, text_width: int | None = None) -> tuple[int, int]:
    """(height, width) of ``image_to_text_grid``."""
    cell = thumb + 2 * FRAME
    text_width = 6 * thumb if text_width is None else text_width
    return (PAD + n_queries * (max(cell, k * line_height()) + PAD), PAD + cell + PAD + text_width + PAD)


def text_to_image_grid(queries: list[str], ranked_image_paths: list[list[Path]], correct: list[list[bool]],
                       scores: list[list[float]] | None = None, thumb: int = 128) -> np.ndarray:
    """Sentence -> image results. Returns (H, W, 3) uint8 (see ``grid_size_t2i``)."""
    n = len(queries)
    k = _check_rows("text_to_image_grid", n, ranked_image_paths, correct, scores)
    height, width = grid_size_t2i(n, k, thumb)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, lh = _font(), line_height()
    cell = thumb + 2 * FRAME
    row_h = cell + label_height()
    for r, query in enumerate(queries):
        y = PAD + r * (row_h + PAD)
        lines = wrap(query, 2 * thumb, font, max_lines=max(1, row_h // lh))
        for i, line in enumerate(lines):
            draw.text((PAD, y + i * lh), line, fill=TEXT, font=font)
        for j in range(k):
            x = PAD + 2 * thumb + PAD + j * (cell + PAD)
            _framed(draw, canvas, ranked_image_paths[r][j], x, y, thumb, bool(correct[r][j]))
            head = f"#{j + 1}" + (f"  {scores[r][j]:.3f}" if scores is not None else "")
            head += "  [+]" if correct[r][j] else ""
            draw.text((x, y + cell + 1), _fit(head, cell, font), fill=GREEN if correct[r][j] else TEXT, font=font)
            name = Path(ranked_image_paths[r][j]).name if ranked_image_paths[r][j] is not None else "?"
            draw.text((x, y + cell + 1 + lh), _fit(name, cell, font), fill=MUTED, font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def image_to_text_grid(query_image_paths: list[Path], ranked_captions: list[list[str]], correct: list[list[bool]],
                       scores: list[list[float]] | None = None, thumb: int = 128,
                       text_width: int | None = None) -> np.ndarray:
    """Image -> sentence results. Returns (H, W, 3) uint8 (see ``grid_size_i2t``)."""
    n = len(query_image_paths)
    k = _check_rows("image_to_text_grid", n, ranked_captions, correct, scores)
    text_width = 6 * thumb if text_width is None else text_width
    height, width = grid_size_i2t(n, k, thumb, text_width)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, lh = _font(), line_height()
    cell = thumb + 2 * FRAME
    row_h = max(cell, k * lh)
    x_text = PAD + cell + PAD
    for r, path in enumerate(query_image_paths):
        y = PAD + r * (row_h + PAD)
        _framed(draw, canvas, path, PAD, y, thumb, None)
        for j in range(k):
            ok = bool(correct[r][j])
            line = f"{'[+]' if ok else '[-]'} {j + 1}."
            if scores is not None:
                line += f" {scores[r][j]:.3f}"
            line += f"  {' '.join(str(ranked_captions[r][j]).split())}"
            draw.text((x_text, y + j * lh), _fit(line, text_width, font), fill=GREEN if ok else TEXT, font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def retrieval_figures(feats: dict, data, k: int = 5, n_queries: int = 4, seed: int = 0,
                      thumb: int = 128) -> dict[str, np.ndarray]:
    """Both grids for ``n_queries`` queries drawn with ``seed`` (the same queries every call) from an encoded split.

    ``feats`` is ``encode_split``'s output (``images``, ``texts``, ``image_labels``, ``text_labels``,
    ``image_rows``, ``caption_rows``); ``data`` the ``Prepared`` it came from. Ranking: cosine similarity;
    a result is correct when its label equals the query's. Returns {"t2i": array, "i2t": array}."""
    img, txt = unit_rows(feats["images"]).numpy(), unit_rows(feats["texts"]).numpy()
    if len(img) == 0 or len(txt) == 0:
        raise ValueError(f"retrieval_figures: nothing to show ({len(img)} images, {len(txt)} texts encoded)")
    img_labels, txt_labels = np.asarray(feats["image_labels"]), np.asarray(feats["text_labels"])
    image_rows, caption_rows = np.asarray(feats["image_rows"]), np.asarray(feats["caption_rows"])
    raw = data.captions["raw"].to_numpy()
    rng = np.random.default_rng(seed)
    tq = rng.choice(len(txt), size=min(n_queries, len(txt)), replace=False)
    iq = rng.choice(len(img), size=min(n_queries, len(img)), replace=False)

    sim = txt[tq] @ img.T  # (q, N)
    kt = min(k, len(img))
    order = [top_indices(row, kt) for row in sim]
    t2i = text_to_image_grid(
        [str(raw[caption_rows[q]]) for q in tq],
        [[data.image_path(int(image_rows[j])) for j in row] for row in order],
        [[bool(img_labels[j] == txt_labels[q]) for j in row] for q, row in zip(tq, order)],
        [[float(sim[i, j]) for j in row] for i, row in enumerate(order)], thumb=thumb)

    sim = img[iq] @ txt.T  # (q, M)
    ki = min(k, len(txt))
    order = [top_indices(row, ki) for row in sim]
    i2t = image_to_text_grid(
        [data.image_path(int(image_rows[q])) for q in iq],
        [[str(raw[caption_rows[j]]) for j in row] for row in order],
        [[bool(txt_labels[j] == img_labels[q]) for j in row] for q, row in zip(iq, order)],
        [[float(sim[i, j]) for j in row] for i, row in enumerate(order)], thumb=thumb)
    return {"t2i": t2i, "i2t": i2t}


def save_png(arr: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 array as PNG via a temporary file in the same folder renamed into place."""
    path = Path(path)
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"save_png: expected an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    with atomic_write(path) as f:
        Image.fromarray(arr).save(f, format="PNG")
    return path
