"""Write a small synthetic *raw* dataset in the exact Flickr30k raw formats.

``python -m prepare.synthetic --out DIR [--images 600 --seed 0 --val N --test N --overwrite]`` writes::

    DIR/images/<id>.jpg            RGB JPEGs, 10-digit Flickr-like numeric names; sorted order = generation order
    DIR/results_20130124.token     "<id>.jpg#<k>\\t<caption>", k = 0..4, grouped by image (Flickr30k token file)
    DIR/dataset_flickr30k.json     Karpathy schema (dataset, images[filename, imgid, split, sentids, sentences])
    DIR/word2vec.bin               binary word2vec, 300-d, trained with gensim on the TRAINING captions only
    DIR/scenes.json                ground truth per image (scene key, background, shapes); not a Flickr file
    DIR/README.txt                 how the data was generated, with the seed

so that ``python -m prepare.flickr30k`` runs on it unchanged (point it at these files).

Design (instance-level retrieval that a small CNN can learn on a CPU in minutes):

* Every image is a UNIQUE scene of 1-3 coloured shapes (6 shapes x 8 colours x 2 sizes) placed in distinct cells of
  a 3x3 grid (top/middle/bottom x left/center/right) on a white, gray or black background, with mild pixel noise.
  Uniqueness is enforced on the *multiset of (shape, colour, size)*, which ignores position and background, so
  identity survives horizontal flips (which swap left/right) and random crops; every shape is left-right symmetric
  and kept away from the border, so it stays recognisable under 64-100 % area crops.
* Each image gets 5 DIFFERENT captions of the same scene: synonyms (circle/disc/ball, big/large/huge, grey/gray ...),
  shuffled shape order, partial descriptions (a subset of the shapes, size/position/background omitted; with
  ``--full-captions`` every caption names every shape with its size), ten
  sentence templates, Flickr-style space-tokenised punctuation (" , ", " . ", "( ... )", " : ") and hyphenated
  words ("top-left", "five-pointed") so that the downstream delimiter split matters, sentence-start capitals and
  occasional capitalised colour words ("Red").
* word2vec.bin keeps case (both "A" and "a" get vectors; min_count=1) but deliberately OMITS the words in
  ``DROPPED_WORDS`` ("to", "of", which GoogleNews also lacks) and pure punctuation tokens, so the downstream
  out-of-vocabulary path is exercised. The word ``HELDOUT_WORD`` ("snapshot") is used only in val/test captions
  (forced in the first val and first test image), so it is never in word2vec.bin either.
* Deterministic for a seed: numpy ``default_rng(seed)`` + ``random.Random(seed)``, no global RNG; Word2Vec with
  workers=1, a fixed seed and an MD5-based ``hashfxn`` (independent of PYTHONHASHSEED): same seed -> byte-identical
  files. Output is written to a temporary directory and renamed into place.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from utils.cli import ArgumentParser, InvalidValue, run_guarded
from utils.files import atomic_dir

TOKEN_FILE = "results_20130124.token"
SPLIT_FILE = "dataset_flickr30k.json"
W2V_FILE = "word2vec.bin"
W2V_DIM = 300
DROPPED_WORDS = ("to", "of")
HELDOUT_WORD = "snapshot"
FIRST_ID = 1000000000

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 165, 50), "blue": (30, 70, 225), "yellow": (240, 215, 20),
    "orange": (245, 135, 15), "purple": (135, 45, 180), "pink": (250, 120, 190), "brown": (135, 80, 30)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "gray": (150, 150, 150),
                                                 "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES = {"small": 0.08, "large": 0.13}  # radius as a fraction of the short side
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
GRID = (0.22, 0.5, 0.78)  # cell centres as fractions of height / width

SYN_SHAPE = {"circle": ["circle", "circle", "disc", "ball", "round shape"],
             "square": ["square", "square", "box", "block"],
             "triangle": ["triangle", "triangle", "triangular shape"], "star": ["star", "star", "five-pointed star"],
             "cross": ["cross", "cross", "plus sign"], "diamond": ["diamond", "diamond", "rhombus"]}
SYN_SIZE = {"small": ["small", "small", "little", "tiny"], "large": ["large", "big", "big", "huge"]}
SYN_COLOUR = {"red": ["red", "red", "red", "crimson"], "purple": ["purple", "purple", "violet"],
              "gray": ["gray", "grey"], "black": ["black", "black", "dark"]}
COUNT = {1: "One", 2: "Two", 3: "Three"}

Shape = tuple[str, str, str, int, int]  # (shape, colour, size, row, col)


def _stable_hash(text: str) -> int:
    """PYTHONHASHSEED-independent hash for gensim's per-word vector initialisation."""
    return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest()[:4], "little")


def default_holdout(images: int) -> int:
    """Default val (and test) size: 10 % of the images, at least 1."""
    return max(1, round(0.1 * images))


# ----------------------------------------------------------------------------------------------- scenes and images
def make_scenes(n: int, rng: np.random.Generator, colours: int = len(COLOURS), shapes: int = len(SHAPES)
                ) -> list[tuple[str, list[Shape]]]:
    """n (background, shapes) scenes with pairwise different multisets of (shape, colour, size), drawn from the
    first ``colours`` colours and first ``shapes`` shapes (a smaller palette makes every part frequent)."""
    if not (1 <= colours <= len(COLOURS) and 1 <= shapes <= len(SHAPES)):
        raise InvalidValue(f"colours must be in 1..{len(COLOURS)} and shapes in 1..{len(SHAPES)}, "
                         f"got {colours} and {shapes}")
    seen: set[tuple] = set()
    scenes: list[tuple[str, list[Shape]]] = []
    palette, kinds, bgs, sizes = list(COLOURS)[:colours], SHAPES[:shapes], list(BACKGROUNDS), list(SIZES)
    tries = 0
    while len(scenes) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise InvalidValue(f"cannot draw {n} unique scenes from {colours} colours x {shapes} shapes; "
                             f"use fewer images or a larger palette")
        count = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
        cells = rng.choice(9, size=count, replace=False)
        parts = [(kinds[int(rng.integers(len(kinds)))], palette[int(rng.integers(len(palette)))],
                 sizes[int(rng.integers(2))], int(c) // 3, int(c) % 3) for c in cells]
        ident = scene_identity(parts)
        if ident in seen:
            continue
        seen.add(ident)
        scenes.append((bgs[int(rng.integers(len(bgs)))], sorted(parts, key=lambda s: (s[3], s[4]))))
    return scenes


def scene_identity(parts: Sequence) -> tuple:
    """What makes a scene unique: the multiset of (shape, colour, size), ignoring position and background."""
    return tuple(sorted(tuple(s[:3]) for s in parts))


def scene_key(background: str, shapes: Sequence[Shape]) -> str:
    """Canonical scene description, e.g. 'white|large-red-circle@top-left|small-blue-star@bottom-right'."""
    return "|".join([background] + [f"{sz}-{co}-{sh}@{ROWS[r]}-{COLS[c]}" for sh, co, sz, r, c in sorted(shapes)])


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(radii: Sequence[float], start: float) -> list[tuple[float, float]]:
        k = len(radii)
        return [(cx + rad * np.cos(start + 2 * np.pi * i / k), cy + rad * np.sin(start + 2 * np.pi * i / k))
                for i, rad in enumerate(radii)]
    if shape == "triangle":
        return ring([r] * 3, -np.pi / 2)
    if shape == "star":
        return ring([r, 0.45 * r] * 5, -np.pi / 2)
    if shape == "diamond":
        return ring([r] * 4, -np.pi / 2)
    if shape == "square":
        return ring([r * 0.85 * np.sqrt(2)] * 4, np.pi / 4)
    a = 0.33 * r  # cross: plus sign with arm half-width a
    pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r), (-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
    return [(cx + x, cy + y) for x, y in pts]


def render(background: str, shapes: Sequence[Shape], rng: np.random.Generator) -> Image.Image:
    """Draw one scene at a random Flickr-like size (short side 128-160, landscape/portrait/square)."""
    short = int(rng.integers(128, 161))
    long_ = int(round(short * float(rng.choice([1.0, 4 / 3, 1.5]))))
    w, h = (long_, short) if rng.random() < 0.65 else (short, long_)
    img = Image.new("RGB", (w, h), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for sh, co, sz, row, col in shapes:
        cx = (GRID[col] + rng.uniform(-0.01, 0.01)) * w
        cy = (GRID[row] + rng.uniform(-0.01, 0.01)) * h
        r = SIZES[sz] * short
        if sh == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[co])
        else:
            draw.polygon(_polygon(sh, cx, cy, r), fill=COLOURS[co])
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 6.0, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------------- captions
def _pos_phrase(row: int, col: int, rnd: random.Random) -> str:
    r, c = ROWS[row], COLS[col]
    up = {"top": "upper", "bottom": "lower"}
    if row == 1 and col == 1:
        return rnd.choice(["in the center", "in the middle", "at the centre", "in the middle of the picture"])
    if col == 1:
        return rnd.choice([f"at the {r}", f"at the {r} center", f"near the {r}", f"at the {r} of the image"])
    if row == 1:
        return rnd.choice([f"on the {c}", f"on the {c} side", f"at the middle {c}", f"to the {c}"])
    return rnd.choice([f"in the {r}-{c} corner", f"at the {r} {c}", f"in the {up[r]} {c}", f"( {r}-{c} )",
                       f"in the {r} {c} corner"])


def _noun_phrase(s: Shape, use_size: bool, use_pos: bool, rnd: random.Random) -> str:
    sh, co, sz, row, col = s
    shape, colour, size = rnd.choice(SYN_SHAPE[sh]), rnd.choice(SYN_COLOUR.get(co, [co])), rnd.choice(SYN_SIZE[sz])
    form = rnd.randrange(3)
    if form == 0 or not use_size and form == 2:
        body = f"{size} {colour} {shape}" if use_size else f"{colour} {shape}"
    elif form == 1:
        body = f"{size + ' ' if use_size else ''}{shape} in {colour}"
    else:
        body = f"{size} {shape} colored {colour}"
    art = "an" if body[0] in "aeiou" else "a"
    return f"{art} {body}" + (f" {_pos_phrase(row, col, rnd)}" if use_pos else "")


def _join(nps: list[str], rnd: random.Random) -> str:
    if len(nps) == 1:
        return nps[0]
    if len(nps) == 2:
        return rnd.choice([f"{nps[0]} and {nps[1]}", f"{nps[0]} next to {nps[1]}", f"{nps[0]} , {nps[1]}",
                           f"{nps[0]} and {nps[1]}"])
    return rnd.choice([f"{nps[0]} , {nps[1]} and {nps[2]}", f"{nps[0]} , {nps[1]} , and {nps[2]}"])


def make_caption(background: str, shapes: Sequence[Shape], rnd: random.Random, full: bool, heldout: bool) -> str:
    """One space-tokenised Flickr-style caption for a scene."""
    chosen = list(shapes)
    if not full and len(chosen) > 1 and rnd.random() < 0.35:
        chosen = rnd.sample(chosen, rnd.randint(1, len(chosen) - 1))
    rnd.shuffle(chosen)
    use_size = full or rnd.random() < 0.6
    use_pos = rnd.random() < (0.5 if len(chosen) < 3 else 0.3)  # keep most captions <= 32 words
    nps = [_noun_phrase(s, use_size, use_pos, rnd) for s in chosen]
    text = _join(nps, rnd)
    bgw = rnd.choice(SYN_COLOUR.get(background, [background]))
    bg = rnd.choice([f"on a {bgw} background", f"against a {bgw} backdrop", f"over a plain {bgw} background"]) \
        if rnd.random() < 0.3 and not (use_pos and len(chosen) == 3) else ""
    n, all_in = len(chosen), len(chosen) == len(shapes)
    if heldout:
        cap = f"A {HELDOUT_WORD} of {text} {bg} ."
    else:
        templates = [f"{text} {bg} .", f"There is {text} {bg} .",
                     f"Picture showing {text} {bg} .", f"An image of {text} {bg} .", f"We can see {text} {bg} .",
                     f"Abstract art with {text} {bg} .", f"Simple drawing ( {text} ) {bg} ."]
        if all_in:
            plural = "shape" if n == 1 else "shapes"
            templates.append(f"{COUNT[n]} {plural} {bg} : {text} .")
        else:
            templates.append(f"Several shapes , including {text} {bg} .")
        if bg:
            templates.append(f"{text} ( {bgw} background ) .")
        cap = rnd.choice(templates)
    words = cap.split()
    for i, wd in enumerate(words):  # occasional capitalised colour word, as in real captions
        if wd in COLOURS and rnd.random() < 0.05:
            words[i] = wd.capitalize()
    if rnd.random() < 0.95:
        words[0] = words[0][0].upper() + words[0][1:]
    return " ".join(words)


def make_captions(background: str, shapes: Sequence[Shape], rnd: random.Random, heldout: bool,
                  full: bool = False) -> list[str]:
    """Five pairwise different captions; caption 0 (every caption when ``full``) mentions every shape with its
    size."""
    caps: list[str] = []
    while len(caps) < 5:
        k = len(caps)
        cap = make_caption(background, shapes, rnd, full=full or k == 0, heldout=heldout and k == 4)
        if cap not in caps:
            caps.append(cap)
    return caps


# ------------------------------------------------------------------------------------------------------ writing
def train_word2vec(sentences: list[list[str]], path: Path, seed: int) -> int:
    """Train gensim Word2Vec (skip-gram, case kept, min_count=1) and save it in binary format minus dropped words.

    On a corpus this small and repetitive every vector shares one dominant direction (mean pairwise cosine 0.96
    with CBOW/10 epochs: "red" and "green" at 0.997), which would leave the text CNN unable to tell words apart
    through its nearly frozen embedding (LR multiplier 1e-3). Skip-gram with 30 epochs and the removal of the
    common mean vector give distinct vectors (mean cosine ~0.1; colours still similar to each other, as in real
    word2vec)."""
    from gensim.models import KeyedVectors, Word2Vec

    model = Word2Vec(sentences=sentences, vector_size=W2V_DIM, window=5, min_count=1, workers=1, seed=seed,
                     hashfxn=_stable_hash, epochs=30, sg=1)
    keys = [w for w in model.wv.index_to_key if w not in DROPPED_WORDS and any(ch.isalnum() for ch in w)]
    vectors = np.stack([model.wv[w] for w in model.wv.index_to_key])
    common = vectors.mean(axis=0)  # (300,) the shared direction
    kv = KeyedVectors(vector_size=W2V_DIM)
    kv.add_vectors(keys, np.stack([model.wv[w] - common for w in keys]).astype(np.float32))
    kv.save_word2vec_format(str(path), binary=True)
    return len(keys)


def _readme(images: int, seed: int, counts: dict[str, int], vocab: int, colours: int, shapes: int,
            full_captions: bool) -> str:
    return (
        "Synthetic dataset in the Flickr30k raw formats, written by `python -m prepare.synthetic`.\n\n"
        f"Command: python -m prepare.synthetic --out DIR --images {images} --seed {seed} "
        f"--val {counts['val']} --test {counts['test']} --colours {colours} --shapes {shapes}"
        f"{' --full-captions' if full_captions else ''}\n"
        f"Images: {images} (train {counts['train']} / val {counts['val']} / test {counts['test']}), 5 captions each.\n"
        f"Each image is a unique scene of 1-3 coloured shapes ({', '.join(SHAPES[:shapes])};\n"
        f"colours {', '.join(list(COLOURS)[:colours])}; small/large) in distinct cells of a 3x3 grid on a\n"
        "white/gray/black background.\n"
        "Uniqueness holds for the multiset of (shape, colour, size), so identity survives horizontal flips and\n"
        "crops. The 5 captions of an image describe the same scene with synonyms, different templates/orders\n"
        + ("and every shape with its size in every caption (--full-captions).\n\n" if full_captions
           else "and partial descriptions.\n\n") +
        "Files: images/<id>.jpg, results_20130124.token, dataset_flickr30k.json (Karpathy schema),\n"
        "scenes.json (ground truth, not part of Flickr30k), word2vec.bin (binary word2vec, 300-d).\n"
        f"word2vec.bin: gensim Word2Vec (skip-gram, 30 epochs, mean vector removed, seed {seed}, workers=1,\n"
        "min_count=1, case kept) on the TRAINING\n"
        f"captions split on spaces; {vocab} words. Deliberately absent: {', '.join(DROPPED_WORDS)} (like GoogleNews),\n"
        f"pure punctuation tokens, and '{HELDOUT_WORD}' (used only in val/test captions).\n"
        "Same seed and arguments -> byte-identical files.\n")


def make_synthetic(out_dir: str | Path, images: int = 600, seed: int = 0, val: int | None = None,
                   test: int | None = None, overwrite: bool = False, colours: int = len(COLOURS),
                   shapes: int = len(SHAPES), full_captions: bool = False) -> dict[str, Any]:
    """Write the synthetic raw dataset into out_dir (atomically) and return its paths and counts."""
    out = Path(out_dir)
    val = default_holdout(images) if val is None else val
    test = default_holdout(images) if test is None else test
    if images < 3 or val < 0 or test < 0 or val + test >= images:
        raise InvalidValue(f"need images >= 3 and 0 <= val + test < images (got images={images}, val={val}, "
                           f"test={test})")
    if images > 50000:
        raise InvalidValue("at most 50000 images (unique scenes become scarce)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite)")
    rng, rnd = np.random.default_rng(seed), random.Random(seed)
    scenes = make_scenes(images, rng, colours, shapes)
    order = rng.permutation(images)
    split = ["train"] * images
    for i in order[:val]:
        split[int(i)] = "val"
    for i in order[val:val + test]:
        split[int(i)] = "test"
    heldout_at = {min(i for i in range(images) if split[i] == s) for s in ("val", "test") if s in split}
    ids = FIRST_ID + np.cumsum(rng.integers(1, 1000, size=images))

    with atomic_dir(out) as tmp:  # replaces OUT (checked above) only when complete
        (tmp / "images").mkdir(parents=True)
        token_lines, json_images, scene_rows, train_sents = [], [], [], []
        for i, (bg, parts) in enumerate(scenes):
            fname = f"{ids[i]}.jpg"
            render(bg, parts, rng).save(tmp / "images" / fname, quality=90)
            caps = make_captions(bg, parts, rnd, heldout=i in heldout_at, full=full_captions)
            sents = []
            for k, cap in enumerate(caps):
                token_lines.append(f"{fname}#{k}\t{cap}\n")
                toks = [t.lower() for t in cap.split() if any(ch.isalnum() for ch in t)]
                sents.append({"tokens": toks, "raw": cap, "imgid": i, "sentid": 5 * i + k})
                if split[i] == "train":
                    train_sents.append(cap.split())
            json_images.append({"filename": fname, "imgid": i, "split": split[i],
                                "sentids": [5 * i + k for k in range(5)], "sentences": sents})
            scene_rows.append({"filename": fname, "split": split[i], "key": scene_key(bg, parts), "background": bg,
                               "shapes": [dict(zip(("shape", "colour", "size", "row", "col"),
                                                   (sh, co, sz, ROWS[r], COLS[c]))) for sh, co, sz, r, c in parts]})
        (tmp / TOKEN_FILE).write_text("".join(token_lines), encoding="utf-8")
        (tmp / SPLIT_FILE).write_text(json.dumps({"dataset": "flickr30k", "images": json_images}), encoding="utf-8")
        (tmp / "scenes.json").write_text(json.dumps(scene_rows, indent=1), encoding="utf-8")
        vocab = train_word2vec(train_sents, tmp / W2V_FILE, seed)
        counts = {"images": images, "train": split.count("train"), "val": val, "test": test,
                  "captions": 5 * images, "vocab": vocab}
        (tmp / "README.txt").write_text(_readme(images, seed, counts, vocab, colours, shapes, full_captions),
                                        encoding="utf-8")
    return {"out": str(out), "images_dir": str(out / "images"), "captions": str(out / TOKEN_FILE),
            "split_json": str(out / SPLIT_FILE), "word2vec": str(out / W2V_FILE), "scenes": str(out / "scenes.json"),
            "readme": str(out / "README.txt"), "counts": counts, "dropped_words": list(DROPPED_WORDS),
            "heldout_words": [HELDOUT_WORD], "seed": seed}


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m prepare.synthetic", description=__doc__.split("\n\n")[0],
                       epilog="Writes images/, results_20130124.token, dataset_flickr30k.json, word2vec.bin, "
                       "scenes.json and README.txt; feed them to python -m prepare.flickr30k.")
    p.add_argument("--out", required=True, help="output directory (created; must be absent or empty)")
    p.add_argument("--images", type=int, default=600, help="number of images (= scenes), each with 5 captions "
                   "(default: 600)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed and flags -> "
                   "byte-identical files (default: 0)")
    p.add_argument("--val", type=int, default=None, help="validation images (default: 10%% of --images, >= 1)")
    p.add_argument("--test", type=int, default=None, help="test images (default: 10%% of --images, >= 1)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not "
                   "empty (default: refuse)")
    p.add_argument("--colours", type=int, default=len(COLOURS), help=f"use the first N of the {len(COLOURS)} "
                   f"colours ({', '.join(COLOURS)}); fewer = every part of a test scene is frequent in training "
                   f"(default: {len(COLOURS)})")
    p.add_argument("--shapes", type=int, default=len(SHAPES), help=f"use the first N of the {len(SHAPES)} shapes "
                   f"({', '.join(SHAPES)}) (default: {len(SHAPES)})")
    p.add_argument("--full-captions", action="store_true", help="every caption names every shape with its size "
                   "(default: only the first; the others may describe a subset of the shapes, which makes some "
                   "captions fit several scenes)")
    a = p.parse_args(argv)
    t0 = time.time()

    def body() -> None:
        info = make_synthetic(a.out, images=a.images, seed=a.seed, val=a.val, test=a.test, overwrite=a.overwrite,
                              colours=a.colours, shapes=a.shapes, full_captions=a.full_captions)
        c = info["counts"]
        print(f"wrote {info['out']}: {c['images']} images (train {c['train']} / val {c['val']} / test {c['test']}), "
              f"{c['captions']} captions, word2vec {c['vocab']} words, {time.time() - t0:.1f} s")

    return run_guarded(body, interrupted=f"interrupted: nothing was written to {a.out}")


if __name__ == "__main__":
    sys.exit(main())
