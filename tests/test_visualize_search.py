"""Retrieval grids (engine.visualize) and search with your own query (retrieval.search, engine.model_io).

A tiny prepared directory is written by hand here (format version 1, no preparer involved): 6 solid-colour
80x64 images (train 2, val 1, test 3), 2 captions each, an 11-word dictionary; plus a tiny ResNet-18 model
(pretrained none, image pool 1) saved as a training-style checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from engine import visualize
from retrieval import search
from engine.config import Config
from engine.data import Prepared
from models import build_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["a", "red", "green", "blue", "yellow", "cyan", "magenta", "square", "circle", "big", "small"]
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20),
           "cyan": (20, 220, 220), "magenta": (220, 20, 220)}
SPLITS = ["train", "train", "val", "test", "test", "test"]
MAX_LEN = 8


def _solid(path: Path, rgb, size=(80, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, rgb)
    if path.suffix == ".png":
        img.save(path)
    else:
        img.save(path, format="JPEG", quality=95)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_prepared")
    names = list(COLOURS)
    labels, n_train = [], 0
    for s in SPLITS:
        labels.append(n_train if s == "train" else -1)
        n_train += s == "train"
    images = pd.DataFrame({"file": [f"{n}.jpg" for n in names], "source": [f"{n}.jpg" for n in names],
                           "split": SPLITS, "label": np.array(labels, dtype=np.int64),
                           "person": np.arange(6, dtype=np.int64)})
    for n in names:
        _solid(root / "images" / f"{n}.jpg", COLOURS[n])
    raws, rows = [], []
    for i, n in enumerate(names):
        for k, raw in enumerate([f"a {n} square", f"big {n} circle"]):
            raws.append(raw)
            rows.append((i, k))
    index = {w: v + 1 for v, w in enumerate(WORDS)}
    tokens = np.zeros((len(raws), MAX_LEN), dtype=np.int32)
    lengths = []
    for r, raw in enumerate(raws):
        ids = [index[w] for w in raw.split()]
        tokens[r, :len(ids)] = ids
        lengths.append(len(ids))
    img_of = np.array([i for i, _ in rows], dtype=np.int64)
    captions = pd.DataFrame({"image": img_of, "k": np.array([k for _, k in rows], dtype=np.int64),
                             "split": [SPLITS[i] for i in img_of], "label": np.array(labels)[img_of],
                             "person": img_of.copy(), "raw": raws, "length": np.array(lengths, dtype=np.int64)})
    images.to_parquet(root / "images.parquet", index=False)
    captions.to_parquet(root / "captions.parquet", index=False)
    np.save(root / "tokens.npy", tokens)
    np.save(root / "word2vec.npy", np.random.default_rng(0).standard_normal((len(WORDS), 300)).astype(np.float32))
    (root / "dictionary.txt").write_text("".join(w + "\n" for w in WORDS), encoding="utf-8")
    splits = {s: {"images": SPLITS.count(s), "captions": 2 * SPLITS.count(s)} for s in ("train", "val", "test")}
    manifest = {"format_version": 1, "dataset": "tiny", "num_classes": n_train, "vocab_size": len(WORDS),
                "max_len": MAX_LEN, "embedding_dim": 300, "match": "image",
                "image_resize": {"mode": "short_side", "size": 64}, "splits": splits, "warnings": {},
                "text": {"delimiters": "-.,() (and whitespace)"}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def data(prepared) -> Prepared:
    return Prepared(prepared)


@pytest.fixture(scope="module")
def model(data):
    torch.manual_seed(0)
    m = build_model(num_classes=data.num_classes, vocab_size=data.vocab_size, max_len=data.max_len,
                    word2vec=data.word2vec(), arch="resnet18", pretrained="none", dropout=0.5, image_pool=1)
    return m.eval()


@pytest.fixture(scope="module")
def checkpoint(model, data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "checkpoint_best.pt"
    cfg = Config(dataset="tiny", arch="resnet18", pretrained="none", train_crop=32, dropout=0.5)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "pretrained_source": "none", "stage": 1,
                "data": {k: data.manifest[k] for k in ("dataset", "num_classes", "vocab_size", "max_len")}}, path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "photos"
    _solid(d / "red.jpg", COLOURS["red"], (100, 80))  # resized to 80x64 like the prepared images
    _solid(d / "blue.png", COLOURS["blue"], (64, 96))  # portrait: another batch shape
    _solid(d / "sub" / "green.JPEG", COLOURS["green"], (80, 64))
    _solid(d / "sub" / "deeper" / "cyan.jpg", COLOURS["cyan"], (80, 64))
    _solid(d / "yellow.jpg", COLOURS["yellow"], (160, 128))
    (d / "notes.txt").write_text("not an image")
    return d


class Counter:
    """Wraps a test_feature method and counts the rows it encodes."""

    def __init__(self, monkeypatch, module) -> None:
        self.rows = 0
        original = module.test_feature

        def counted(x, *rest, **kw):
            self.rows += x.shape[0]
            return original(x, *rest, **kw)

        monkeypatch.setattr(module, "test_feature", counted)


def _is_green(px) -> bool:
    return tuple(int(v) for v in px) == visualize.GREEN


# ------------------------------------------------------------------------------------------------ grids
def test_text_to_image_grid_size_and_frames(tmp_path):
    paths = [_solid(tmp_path / f"g{i}.jpg", (128, 128, 128)) for i in range(3)]
    thumb, F, P = 48, visualize.FRAME, visualize.PAD
    arr = visualize.text_to_image_grid(["a grey square on a white background, described at some length"] * 2,
                                       [paths, paths[::-1]], [[False, True, False], [True, False, False]],
                                       [[0.9, 0.8, 0.7], [0.5, 0.4, 0.3]], thumb=thumb)
    cell = thumb + 2 * F
    row_h = cell + visualize.label_height()
    assert arr.dtype == np.uint8 and arr.shape == (P + 2 * (row_h + P), P + 2 * thumb + P + 3 * (cell + P), 3)
    assert arr.shape[:2] == visualize.grid_size_t2i(2, 3, thumb)

    def cell_x(j):
        return P + 2 * thumb + P + j * (cell + P)
    # row 0: result 1 (j=1) is the correct one -> its whole frame band is green, on all four sides
    x, y = cell_x(1), P
    for px in (arr[y, x + cell // 2], arr[y + cell - 1, x + cell // 2], arr[y + cell // 2, x],
               arr[y + cell // 2, x + cell - 1], arr[y + F - 1, x + F - 1]):
        assert _is_green(px)
    assert abs(int(arr[y + cell // 2, x + cell // 2, 1]) - 128) < 8  # the grey thumbnail inside
    # wrong ones: no green; the outer band stays background, the inner 2 px are red
    x = cell_x(0)
    assert tuple(arr[y, x + cell // 2]) == visualize.BACKGROUND
    assert tuple(arr[y + F - 1, x + cell // 2]) == visualize.WRONG
    assert not any(_is_green(arr[y + d, cell_x(2) + cell // 2]) for d in range(F))
    # row 1: the first result is the correct one
    y = P + row_h + P
    assert _is_green(arr[y + 1, cell_x(0) + 1]) and not _is_green(arr[y + 1, cell_x(1) + 1])
    # the query text is drawn on the left
    assert (arr[P:P + row_h, P:P + 2 * thumb] < 100).any()


def test_image_to_text_grid_colours(tmp_path):
    img = _solid(tmp_path / "q.jpg", (30, 30, 200))
    thumb, P, lh = 40, visualize.PAD, visualize.line_height()
    caps = [["a blue square", "a red circle", "big blue square"]]
    arr = visualize.image_to_text_grid([img], caps, [[True, False, True]], [[0.9, 0.5, 0.4]], thumb=thumb)
    assert arr.shape[:2] == visualize.grid_size_i2t(1, 3, thumb)
    assert arr.shape[1] == P + thumb + 2 * visualize.FRAME + P + 6 * thumb + P
    x0 = P + thumb + 2 * visualize.FRAME + P

    def line(j):
        region = arr[P + j * lh:P + (j + 1) * lh, x0:].astype(int)
        green = (region[..., 1] > 120) & (region[..., 0] < 90) & (region[..., 2] < 90)
        dark = region.max(axis=2) < 90
        return green.sum(), dark.sum()
    g0, d0 = line(0)
    g1, d1 = line(1)
    assert g0 > 20 and d0 == 0  # correct: green text
    assert g1 == 0 and d1 > 20  # wrong: black text
    assert line(2)[0] > 20
    assert abs(int(arr[P + visualize.FRAME + thumb // 2, P + visualize.FRAME + thumb // 2, 2]) - 200) < 10


def test_grid_rejects_ragged_input(tmp_path):
    p = _solid(tmp_path / "x.jpg", (0, 0, 0))
    with pytest.raises(ValueError, match="same number K"):
        visualize.text_to_image_grid(["a", "b"], [[p, p], [p]], [[True, False], [True]], None)


def test_retrieval_figures_planted(data, tmp_path):
    img_rows, cap_rows = data.split_images("test"), data.split_captions("test")
    n, m = len(img_rows), len(cap_rows)
    owner = data.captions["image"].to_numpy()[cap_rows]
    feats = {"images": np.eye(n, 16, dtype=np.float32),
             "texts": np.stack([np.eye(n, 16, dtype=np.float32)[list(img_rows).index(o)] for o in owner]),
             "image_labels": data.images["person"].to_numpy()[img_rows],
             "text_labels": data.captions["person"].to_numpy()[cap_rows], "image_rows": img_rows,
             "caption_rows": cap_rows}
    figs = visualize.retrieval_figures(feats, data, k=2, n_queries=2, seed=0, thumb=40)
    assert set(figs) == {"t2i", "i2t"}
    assert figs["t2i"].shape[:2] == visualize.grid_size_t2i(2, 2, 40)
    assert figs["i2t"].shape[:2] == visualize.grid_size_i2t(2, 2, 40)
    P, cell = visualize.PAD, 40 + 2 * visualize.FRAME
    for r in range(2):  # the planted match is ranked first: green frame on the first thumbnail of every row
        y = P + r * (cell + visualize.label_height() + P)
        x = P + 2 * 40 + P
        assert _is_green(figs["t2i"][y + 1, x + 1]) and not _is_green(figs["t2i"][y + 1, x + cell + P + 1])
    again = visualize.retrieval_figures(feats, data, k=2, n_queries=2, seed=0, thumb=40)
    assert np.array_equal(again["t2i"], figs["t2i"]) and np.array_equal(again["i2t"], figs["i2t"])
    out = visualize.save_png(figs["t2i"], tmp_path / "figs" / "t2i.png")
    assert np.array_equal(np.asarray(Image.open(out)), figs["t2i"])
    assert [p.name for p in out.parent.iterdir()] == ["t2i.png"]  # no temporary file left behind


def test_retrieval_figures_from_encode_split(model, data):
    from engine.encode import encode_split

    feats = encode_split(model, data, "test", torch.device("cpu"))
    figs = visualize.retrieval_figures(feats, data, k=5, n_queries=4)
    # 3 test images and 6 captions: 3 image queries, 4 text queries; K capped at the gallery size
    assert figs["t2i"].shape[:2] == visualize.grid_size_t2i(4, 3)
    assert figs["i2t"].shape[:2] == visualize.grid_size_i2t(3, 5)


# ------------------------------------------------------------------------------------------------ search API
def test_tokenize_query_reports_ignored_words(data):
    q = search.tokenize_query(data, "a Red, zebra-like (square) xyzzy")
    assert q.words == ["a", "square"] and q.ignored == ["Red", "zebra", "like", "xyzzy"] and q.length == 2
    assert list(q.tokens[:3]) == [1, 8, 0]
    msg = q.ignored_message(search.vocabulary(data))
    assert msg.startswith("ignored words not in the dictionary: Red (did you mean red?), zebra")
    long = search.tokenize_query(data, " ".join(["red"] * 11))
    assert long.length == MAX_LEN and long.truncated == 3
    with pytest.raises(search.QueryError, match="none of its words is in the dictionary.*zebra, Square"):
        search.tokenize_query(data, "zebra Square")
    with pytest.raises(search.QueryError, match="no words"):
        search.tokenize_query(data, " .,- ")


def test_encode_folder_cache_and_search_text(model, data, folder, tmp_path, monkeypatch):
    counter = Counter(monkeypatch, model.image)
    cache = tmp_path / "cache.npz"
    paths, feats = search.encode_folder(model, folder, 64, "short_side", "cpu", cache, cache_key="ck")
    names = [p.relative_to(folder).as_posix() for p in paths]
    assert names == ["blue.png", "red.jpg", "sub/deeper/cyan.jpg", "sub/green.JPEG", "yellow.jpg"]
    assert counter.rows == 5 and cache.is_file() and feats.shape == (5, 2048)

    hits = search.search_text(model, data, "a red square", paths, feats, k=3)
    assert len(hits) == 3 and all(p in paths for p, _ in hits)
    scores = [s for _, s in hits]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)

    counter.rows = 0  # second run: everything from the cache
    paths2, feats2 = search.encode_folder(model, folder, 64, "short_side", "cpu", cache, cache_key="ck")
    assert counter.rows == 0 and paths2 == paths and np.array_equal(feats2, feats)

    red = folder / "red.jpg"  # a touched file is re-encoded, and only it
    st = red.stat()
    os.utime(red, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    paths3, feats3 = search.encode_folder(model, folder, 64, "short_side", "cpu", cache, cache_key="ck")
    assert counter.rows == 1 and np.allclose(feats3, feats, atol=1e-4)

    counter.rows = 0  # an added image: only it; a removed one: dropped from the results and the cache
    _solid(folder / "sub" / "magenta.jpg", COLOURS["magenta"])
    (folder / "blue.png").unlink()
    paths4, _ = search.encode_folder(model, folder, 64, "short_side", "cpu", cache, cache_key="ck")
    assert counter.rows == 1 and len(paths4) == 5 and folder / "blue.png" not in paths4
    with np.load(cache) as z:
        assert len(z["paths"]) == 5

    counter.rows = 0  # another model key: the cache is not trusted
    search.encode_folder(model, folder, 64, "short_side", "cpu", cache, cache_key="other", progress=None)
    assert counter.rows == 5


def test_encode_folder_errors(model, tmp_path):
    with pytest.raises(search.SearchError, match="no such folder"):
        search.encode_folder(model, tmp_path / "nope", 64, "short_side", "cpu")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(search.SearchError, match=r"no \.jpg/\.jpeg/\.png file found"):
        search.encode_folder(model, tmp_path / "empty", 64, "short_side", "cpu")


def test_search_image_and_caption_cache(model, data, folder, tmp_path, monkeypatch):
    counter = Counter(monkeypatch, model.text)
    cache = tmp_path / "captions.npz"
    hits = search.search_image(model, data, folder / "red.jpg", k=4, split="test", cache=cache, cache_key="ck")
    test_caps = set(data.captions["raw"].to_numpy()[data.split_captions("test")])
    assert len(hits) == 4 and all(c in test_caps for c, _ in hits)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    assert counter.rows > 0 and cache.is_file()
    counter.rows = 0
    again = search.search_image(model, data, folder / "red.jpg", k=4, split="test", cache=cache, cache_key="ck")
    assert counter.rows == 0 and again == hits
    with pytest.raises(search.SearchError, match="no such file"):
        search.search_image(model, data, folder / "missing.jpg", cache=cache, cache_key="ck")


# ------------------------------------------------------------------------------------------------ CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "retrieval.search", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_query_and_image(checkpoint, prepared, folder, tmp_path):
    out = tmp_path / "res.json"
    r = _cli("--checkpoint", checkpoint, "--data", prepared, "--images", folder, "--query", "a red square",
             "--query", "big zebra circle", "--image", folder / "yellow.jpg", "--top-k", "3", "--json", out)
    assert r.returncode == 0, r.stderr
    assert "ignored words not in the dictionary: zebra" in r.stdout
    res = json.loads(out.read_text())
    assert [q["query"] for q in res["text_queries"]] == ["a red square", "big zebra circle"]
    for q in res["text_queries"]:
        assert len(q["results"]) == 3
        for hit in q["results"]:
            assert Path(hit["path"]).is_file() and hit["path"] in r.stdout
    assert res["text_queries"][1]["ignored"] == ["zebra"]
    caps = res["image_queries"][0]["results"]
    assert len(caps) == 3 and [c["rank"] for c in caps] == [1, 2, 3]
    for c in caps:
        assert c["image_file"] in {"yellow.jpg", "cyan.jpg", "magenta.jpg"}  # the test split
        assert f"{c['caption']}  [{c['image_file']}]" in r.stdout
    caches = list(folder.glob(".dualpath_cache_*.npz"))
    assert len(caches) == 1  # the default cache, inside the folder
    assert list(checkpoint.parent.glob(".dualpath_captions_test_*.npz"))


def test_cli_all_unknown_query_exits_2(checkpoint, prepared, folder):
    r = _cli("--checkpoint", checkpoint, "--data", prepared, "--images", folder, "--query", "zebra Giraffe")
    assert r.returncode == 2
    assert "none of its words is in the dictionary" in r.stderr and "zebra, Giraffe" in r.stderr
    assert r.stdout == ""


def test_cli_refuses_a_bad_image_before_encoding_anything(checkpoint, prepared, folder, monkeypatch, capsys):
    """Issue 19: --image with a file that is no image is refused before the model is loaded and the split's
    captions are encoded (a second, not minutes, on a real split); the Python API refuses it before encoding too."""
    from engine import model_io
    from retrieval import index as search_index
    from retrieval.index import SearchError

    def never(*a, **k):
        raise AssertionError("encoded or loaded before the bad image was refused")
    monkeypatch.setattr(search_index, "encode_captions", never)
    monkeypatch.setattr(model_io, "load_model", never)
    bad = folder / "notes.txt"
    assert search.main(["--checkpoint", str(checkpoint), "--data", str(prepared), "--image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1, err
    with pytest.raises(SearchError, match="notes.txt"):
        search_index.rank_captions(None, Prepared(prepared), bad, device="cpu")


def test_cli_errors_name_what_was_expected(checkpoint, prepared, folder, tmp_path, capsys):
    cases = [
        (["--checkpoint", tmp_path / "none.pt", "--data", prepared, "--images", folder, "--query", "red"],
         "checkpoint not found"),
        (["--checkpoint", checkpoint, "--data", tmp_path, "--images", folder, "--query", "red"],
         "not a prepared directory"),
        (["--checkpoint", checkpoint, "--data", prepared, "--images", tmp_path / "nope", "--query", "red"],
         "no such folder"),
        (["--checkpoint", checkpoint, "--data", prepared, "--query", "red"], "--query needs --images"),
        (["--checkpoint", checkpoint, "--data", prepared], "nothing to search"),
    ]
    other = tmp_path / "other_prepared"  # prepared data the checkpoint was not trained on
    shutil.copytree(prepared, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["num_classes"] = 3
    (other / "manifest.json").write_text(json.dumps(manifest))
    cases.append((["--checkpoint", checkpoint, "--data", other, "--images", folder, "--query", "red"],
                  "num_classes 2 vs 3 (checkpoint vs prepared); pass the prepared directory the model was trained on"))
    for argv, expected in cases:
        assert search.main([str(a) for a in argv]) == 2
        assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        search.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--data", "--images", "--query", "--image", "--split", "--top-k", "--cache",
                 "--caption-cache", "--no-cache", "--json", "--device", "--precision", "--batch-size"):
        assert flag in text
