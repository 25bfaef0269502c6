"""Generate tiny raw datasets in every real format (for tests/test_prepare*.py), inside a given directory.

* Flickr30k / Flickr8k: images folder, ``name.jpg#k<TAB>caption`` token file (with the real Flickr8k quirk
  ``...jpg.1#k``, an image without a file and a file without captions), Karpathy split JSON (with restval),
  and Flickr_8k.{train,dev,test}Images.txt lists (Flickr8k-style names; matched to Flickr30k names by photo id).
* MSCOCO: train2014/ val2014/ (or train2017/ val2017/) folders, official captions_*.json, Karpathy dataset_coco.json
  (with filepath, cocoid, restval); includes grayscale, CMYK and a large JPEG and an image with 7 captions.
* CUHK-PEDES: reid_raw.json + imgs/ (PNG and JPEG person crops, several images per identity).
* word2vec: binary, text, and .gz files written with gensim ``KeyedVectors.save_word2vec_format``.

The caption set is hand-made so that tests can assert the exact dictionary (see ``FLICKR_DICTIONARY``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DIM = 300

# word2vec file order. Absent on purpose: "to", "xyzzy", "qwerty", "a" (lower-case article).
W2V_WORDS = ["the", "zebra", "dog", "Dog", "A", "elephant", "runs", "fast", "brown", "jumps", "high", "Two",
             "men", "walking", "work", "cat", "sleeps", "grazes", "An", "Brown", "DOG", "Is", "this", "on",
             "grass", "person", "red", "shirt", "blue", "bag", "woman", "unused"]

# Flickr captions per photo id, per split. 1005 is "restval" in the Karpathy JSON.
FLICKR_CAPTIONS = {
    "1001": ("train", ["A Dog runs-fast .", "the dog (brown) jumps,high", "A dog .", "Dog dog DOG", "the  Dog"]),
    "1002": ("train", ["Two men.walking to work", "xyzzy qwerty", "Two men", "men walking", "the men"]),
    "1003": ("train", ["cat cat cat cat cat cat cat cat cat cat", "A cat", "the cat", "cat", "A cat sleeps"]),
    "1004": ("train", ["A cat\tsleeps", "cat sleeps", "the cat sleeps", "A dog sleeps", "Dog sleeps"]),
    "1005": ("restval", ["A dog", "the dog", "Two dog", "dog runs", "dog"]),
    "2001": ("val", ["A zebra grazes", "zebra", "the zebra", "A zebra", "zebra grazes"]),
    "3001": ("test", ["An elephant", "elephant", "the elephant", "An elephant walking", "elephant"]),
}
# Expected dictionary: W2V_WORDS order, training captions only ("zebra", "grazes", "elephant", "An" are val/test
# only; "Brown" never occurs; "to"/"xyzzy"/"qwerty" are not word2vec keys; "on", "grass", "red", "shirt" only occur
# in captions of images that are not prepared: 4001 has no file, '1001.jpg.1' is the real Flickr8k quirk).
FLICKR_DICTIONARY = ["the", "dog", "Dog", "A", "runs", "fast", "brown", "jumps", "high", "Two", "men", "walking",
                     "work", "cat", "sleeps", "DOG"]


def write_image(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB", seed: int = 0,
                fmt: str | None = None) -> Path:
    """A small noisy image (JPEG unless the suffix says otherwise)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.suffix == ".png"
    img.save(path, fmt or ("PNG" if png else "JPEG"), **({} if png else {"quality": 90}))
    return path


def write_word2vec(path: Path, words: list[str] = W2V_WORDS, *, binary: bool, dim: int = DIM,
                   seed: int = 0) -> np.ndarray:
    """A word2vec file (gensim writer; .gz compressed when the name ends in .gz). Returns the vectors."""
    from gensim.models import KeyedVectors

    vecs = np.random.default_rng(seed).standard_normal((len(words), dim)).astype(np.float32)
    kv = KeyedVectors(dim)
    kv.add_vectors(words, vecs)
    path.parent.mkdir(parents=True, exist_ok=True)
    kv.save_word2vec_format(str(path), binary=binary)
    return vecs


@dataclass
class Word2VecFiles:
    binary: Path
    text: Path
    binary_gz: Path
    text_gz: Path
    vectors: np.ndarray  # rows in W2V_WORDS order


def make_word2vec(root: Path) -> Word2VecFiles:
    vecs = write_word2vec(root / "w2v.bin", binary=True)
    write_word2vec(root / "w2v.txt", binary=False)
    write_word2vec(root / "w2v.bin.gz", binary=True)
    write_word2vec(root / "w2v.txt.gz", binary=False)
    return Word2VecFiles(root / "w2v.bin", root / "w2v.txt", root / "w2v.bin.gz", root / "w2v.txt.gz", vecs)


@dataclass
class FlickrFiles:
    images: Path
    token: Path
    split_json: Path
    lists: Path  # Flickr_8k.{train,dev,test}Images.txt
    w2v: Word2VecFiles


def flickr_name(pid: str, style: str) -> str:
    """Flickr30k names are '<id>.jpg', Flickr8k names '<id>_<secret>.jpg'."""
    return f"{pid}.jpg" if style == "30k" else f"{pid}_{int(pid) * 7919 % 65536:04x}ab.jpg"


def make_flickr(root: Path, style: str = "30k") -> FlickrFiles:
    """Flickr raw files: 7 captioned images on disk + 1 captioned image missing (4001) + the '.jpg.1' quirk
    + 1 image file without captions (9999)."""
    images = root / "images"
    lines = []
    for n, (pid, (_, caps)) in enumerate(FLICKR_CAPTIONS.items()):
        name = flickr_name(pid, style)
        big = pid == "1003"
        write_image(images / name, size=(300, 200) if big else (40 + n, 30), seed=n)
        lines += [f"{name}#{k}\t{c}" for k, c in enumerate(caps)]
    lines += [f"{flickr_name('4001', style)}#{k}\tA dog on grass without a file" for k in range(5)]
    lines += [f"{flickr_name('1001', style)}.1#{k}\tA red shirt" for k in range(2)]
    write_image(images / flickr_name("9999", style), seed=99)
    token = root / "captions.token"
    token.write_text("\n".join(lines) + "\n", encoding="utf-8")
    karpathy = {"dataset": "flickr30k", "images": [
        {"filename": flickr_name(pid, style), "imgid": i, "split": split, "sentids": [],
         "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": i, "sentid": 0} for c in caps]}
        for i, (pid, (split, caps)) in enumerate(FLICKR_CAPTIONS.items())]}
    split_json = root / "dataset_flickr.json"
    split_json.write_text(json.dumps(karpathy), encoding="utf-8")
    lists = root / "lists"
    lists.mkdir()
    for fname, splits in (("Flickr_8k.trainImages.txt", ("train", "restval")), ("Flickr_8k.devImages.txt", ("val",)),
                          ("Flickr_8k.testImages.txt", ("test",))):
        names = [flickr_name(pid, "8k") for pid, (s, _) in FLICKR_CAPTIONS.items() if s in splits]
        (lists / fname).write_text("\n".join(names) + "\n", encoding="utf-8")
    return FlickrFiles(images, token, split_json, lists, make_word2vec(root / "w2v"))


# ----------------------------------------------------------------------------------------------- MSCOCO
COCO_IMAGES = [  # (cocoid, 2014 folder, karpathy split, captions, image mode, size)
    (9, "train2014", "train", ["Is this a dog?", "A dog on grass", "dog?grass", "the dog", "A dog runs",
                               "A Dog", "the grass"], "RGB", (64, 48)),
    (25, "train2014", "train", ["A cat on grass", "the cat", "cat sleeps", "A cat", "cat?"], "L", (50, 40)),
    (30, "train2014", "restval", ["Two men walking", "the men", "men on grass", "Two men", "men"], "CMYK", (48, 60)),
    (34, "val2014", "restval", ["A zebra on grass", "the zebra", "zebra", "A zebra", "zebra grazes"], "RGB",
     (400, 300)),
    (36, "val2014", "val", ["An elephant", "elephant", "the elephant", "An elephant walking", "elephant"], "RGB",
     (40, 40)),
    (42, "val2014", "test", ["A brown dog", "dog", "the brown dog", "brown", "Brown dog"], "RGB", (40, 30)),
]


@dataclass
class CocoFiles:
    root: Path  # holds the image folders
    captions: list[Path]  # captions_train*.json, captions_val*.json
    karpathy: Path
    w2v: Word2VecFiles


def coco_file(cocoid: int, folder: str, year: str) -> tuple[str, str]:
    """(folder, file name) of an image in the 2014 or the 2017 naming."""
    if year == "2014":
        return folder, f"COCO_{folder}_{cocoid:012d}.jpg"
    return folder.replace("2014", "2017"), f"{cocoid:012d}.jpg"


def make_coco(root: Path, year: str = "2014", extra_train: int = 0) -> CocoFiles:
    """COCO raw files. ``extra_train`` adds that many plain train images (for the random split tests).
    One train image without any annotation is listed in the captions JSON (warning image_no_captions)."""
    rows = list(COCO_IMAGES) + [(100 + i, "train2014", "train", [f"A dog number {i}", "the dog"], "RGB", (32, 32))
                                for i in range(extra_train)]
    files = {"train2014": {"images": [], "annotations": []}, "val2014": {"images": [], "annotations": []}}
    ann_id = 1
    for n, (cid, folder, _, caps, mode, size) in enumerate(rows):
        sub, name = coco_file(cid, folder, year)
        write_image(root / sub / name, size=size, mode=mode, seed=n)
        files[folder]["images"].append({"id": cid, "file_name": name, "height": size[1], "width": size[0]})
        for c in caps:
            files[folder]["annotations"].append({"image_id": cid, "id": ann_id, "caption": c})
            ann_id += 1
    sub, name = coco_file(999, "train2014", year)
    write_image(root / sub / name, seed=999)
    files["train2014"]["images"].append({"id": 999, "file_name": name, "height": 30, "width": 40})
    captions = []
    for folder, content in files.items():
        path = root / "annotations" / f"captions_{folder.replace('2014', year)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": {}, "licenses": [], **content}), encoding="utf-8")
        captions.append(path)
    karpathy = {"dataset": "coco", "images": [
        {"filepath": folder, "filename": coco_file(cid, folder, "2014")[1], "cocoid": cid, "imgid": i,
         "split": split, "sentids": [], "sentences": [{"raw": c, "tokens": [], "imgid": i, "sentid": 0} for c in caps]}
        for i, (cid, folder, split, caps, _, _) in enumerate(COCO_IMAGES)]}
    kpath = root / "dataset_coco.json"
    kpath.write_text(json.dumps(karpathy), encoding="utf-8")
    return CocoFiles(root, captions, kpath, make_word2vec(root / "w2v"))


# ----------------------------------------------------------------------------------------------- CUHK-PEDES
CUHK_ENTRIES = [  # (split, id, file_path, captions)
    ("train", 5, "CUHK01/0005001.png", ["A woman in a red shirt .", "the woman carries a blue bag"]),
    ("train", 9, "CUHK03/9_1.jpg", ["A person in blue", "the person walks"]),
    ("train", 5, "CUHK01/0005002.png", ["A woman with a bag", "red shirt, blue bag"]),
    ("train", 7, "test_query/p7.jpg", ["A Dog", "the dog"]),
    ("train", 9, "CUHK03/9_2.jpg", ["person in a blue shirt", "A person"]),
    ("val", 11, "Market/11_a.jpg", ["A woman", "the woman in red"]),
    ("val", 11, "Market/11_b.jpg", ["woman in red", "A woman walking"]),
    ("test", 12, "train_query/12.jpg", ["A zebra", "person"]),
    ("test", 13, "train_query/13.jpg", ["A man", "the person on grass", "third caption"]),
]


@dataclass
class CuhkFiles:
    root: Path
    w2v: Word2VecFiles


def make_cuhk(root: Path) -> CuhkFiles:
    entries = []
    for n, (split, pid, rel, caps) in enumerate(CUHK_ENTRIES):
        write_image(root / "imgs" / rel, size=(30 + n, 80), seed=n)
        entries.append({"split": split, "captions": caps, "file_path": rel, "id": pid,
                        "processed_tokens": [c.lower().split() for c in caps]})
    (root / "reid_raw.json").write_text(json.dumps(entries), encoding="utf-8")
    return CuhkFiles(root, make_word2vec(root / "w2v"))


# ----------------------------------------------------------------------------------------------- reading back
@dataclass
class Prepared:
    manifest: dict
    images: "object"  # pandas DataFrame
    captions: "object"
    tokens: np.ndarray
    word2vec: np.ndarray
    dictionary: list[str]
    root: Path


def read_prepared(out: Path) -> Prepared:
    import pandas as pd

    return Prepared(json.loads((out / "manifest.json").read_text(encoding="utf-8")),
                    pd.read_parquet(out / "images.parquet"), pd.read_parquet(out / "captions.parquet"),
                    np.load(out / "tokens.npy"), np.load(out / "word2vec.npy"),
                    (out / "dictionary.txt").read_text(encoding="utf-8").splitlines(), out)


def assert_contract(out: Path) -> Prepared:
    """Check a prepared directory against the format in prepare/__init__.py; returns its content."""
    p = read_prepared(out)
    m = p.manifest
    for key in ("format_version", "dataset", "num_classes", "vocab_size", "max_len", "embedding_dim", "match",
                "image_resize", "splits", "warnings", "args", "inputs", "created"):
        assert key in m, key
    assert m["format_version"] == 1 and m["match"] in ("image", "person")
    assert set(m["image_resize"]) >= {"mode", "size"} and m["image_resize"]["mode"] in ("short_side", "square")
    assert list(m["splits"]) == ["train", "val", "test"]
    for rec in m["inputs"].values():
        assert set(rec) >= {"path", "sha256", "bytes"} and len(rec["sha256"]) == 64
    for name, w in m["warnings"].items():
        assert w["count"] >= len(w["examples"]) and len(w["examples"]) <= 5, name
    im, cap = p.images, p.captions
    assert list(im.columns[:5]) == ["file", "source", "split", "label", "person"]
    assert list(cap.columns[:7]) == ["image", "k", "split", "label", "person", "raw", "length"]
    for df, cols in ((im, ("label", "person")), (cap, ("image", "k", "label", "person", "length"))):
        for c in cols:
            assert str(df[c].dtype) == "int64", c
    order = {"train": 0, "val": 1, "test": 2}
    assert (np.diff(im["split"].map(order).to_numpy()) >= 0).all()
    for s in order:
        assert (im["split"] == s).sum() == m["splits"][s]["images"]
        assert (cap["split"] == s).sum() == m["splits"][s]["captions"]
    train = im["split"] == "train"
    if m["match"] == "image":
        assert im.loc[train, "label"].tolist() == list(range(int(train.sum())))
        assert im["person"].tolist() == list(range(len(im)))
    assert (im.loc[~train, "label"] == -1).all()
    assert im.loc[train, "label"].nunique() == m["num_classes"]
    assert (np.diff(cap["image"].to_numpy()) >= 0).all()
    for c in ("split", "label", "person"):
        assert (cap[c].to_numpy() == im[c].to_numpy()[cap["image"].to_numpy()]).all(), c
    V, L = m["vocab_size"], m["max_len"]
    assert p.tokens.dtype == np.int32 and p.tokens.shape == (len(cap), L)
    assert p.word2vec.dtype == np.float32 and p.word2vec.shape == (V, m["embedding_dim"])
    assert len(p.dictionary) == V and len(set(p.dictionary)) == V
    nonzero = p.tokens != 0
    assert (nonzero.sum(1) == cap["length"].to_numpy()).all()
    assert (nonzero[:, :-1] | ~nonzero[:, 1:]).all()  # left-aligned: no word after a pad
    assert p.tokens.min() >= 0 and p.tokens.max() <= V
    for f in im["file"]:
        assert (out / "images" / f).is_file(), f
    return p
