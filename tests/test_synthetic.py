"""Tests for prepare.synthetic (the synthetic raw dataset in Flickr30k formats)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from prepare import synthetic as syn

ROOT = Path(__file__).resolve().parents[1]
N, VAL, TEST, SEED = 40, 5, 6, 3
LINE = re.compile(r"^(\d+\.jpg)#([0-4])\t(\S.*\S)$")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("syn") / "a"
    return syn.make_synthetic(out, images=N, seed=SEED, val=VAL, test=TEST)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _token_lines(info: dict) -> list[tuple[str, int, str]]:
    rows = []
    for line in Path(info["captions"]).read_text(encoding="utf-8").splitlines():
        m = LINE.match(line)
        assert m, line
        rows.append((m.group(1), int(m.group(2)), m.group(3)))
    return rows


def test_layout_and_counts(data: dict) -> None:
    out = Path(data["out"])
    for name in ("images", syn.TOKEN_FILE, syn.SPLIT_FILE, syn.W2V_FILE, "README.txt", "scenes.json"):
        assert (out / name).exists(), name
    assert f"--seed {SEED}" in (out / "README.txt").read_text()
    assert data["counts"] == {"images": N, "train": N - VAL - TEST, "val": VAL, "test": TEST,
                              "captions": 5 * N, "vocab": data["counts"]["vocab"]}
    assert not list(out.parent.glob(".a.tmp-*"))  # temporary directory renamed away


def test_determinism_across_hash_seeds(data: dict, tmp_path: Path) -> None:
    other = tmp_path / "b"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    r = subprocess.run([sys.executable, "-m", "prepare.synthetic", "--out", str(other), "--images", str(N),
                        "--seed", str(SEED), "--val", str(VAL), "--test", str(TEST)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = _files(Path(data["out"])), _files(other)
    assert a.keys() == b.keys()
    for name in a:  # token file, JSON, word2vec.bin and every JPEG byte-identical
        assert a[name] == b[name], name


def test_different_seed_differs(data: dict, tmp_path: Path) -> None:
    info = syn.make_synthetic(tmp_path / "c", images=N, seed=SEED + 1, val=VAL, test=TEST)
    for key in ("captions", "split_json", "word2vec"):
        assert Path(info[key]).read_bytes() != Path(data[key]).read_bytes(), key


def test_token_file_and_images(data: dict) -> None:
    rows = _token_lines(data)
    assert len(rows) == 5 * N
    names = [r[0] for r in rows[::5]]
    assert names == sorted(names) and len(set(names)) == N  # grouped by image, sorted = generation order
    for i, (name, k, cap) in enumerate(rows):
        assert name == names[i // 5] and k == i % 5
        assert "  " not in cap and cap.endswith(" .")
    assert sorted(os.listdir(data["images_dir"])) == names
    for name in names:
        with Image.open(Path(data["images_dir"]) / name) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) >= 128
    # captions of one image all differ; Flickr-like punctuation and case occur somewhere
    for i in range(N):
        caps = [r[2] for r in rows[5 * i:5 * i + 5]]
        assert len(set(caps)) == 5
    text = " ".join(r[2] for r in rows)
    for tok in (" , ", "-", " . "):
        assert tok in text + " "
    assert any(c[0].isupper() for _, _, c in rows)


def test_scene_keys_unique(data: dict) -> None:
    scenes = json.loads(Path(data["scenes"]).read_text())
    assert len(scenes) == N
    assert len({s["key"] for s in scenes}) == N
    idents = {tuple(sorted((x["shape"], x["colour"], x["size"]) for x in s["shapes"])) for s in scenes}
    assert len(idents) == N  # unique even ignoring position and background (flip/crop robust)
    assert all(1 <= len(s["shapes"]) <= 3 for s in scenes)


def test_split_json(data: dict) -> None:
    d = json.loads(Path(data["split_json"]).read_text())
    assert d["dataset"] == "flickr30k" and len(d["images"]) == N
    splits = [im["split"] for im in d["images"]]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (N - VAL - TEST, VAL, TEST)
    rows = _token_lines(data)
    for i, im in enumerate(d["images"]):
        assert set(im) >= {"filename", "imgid", "split", "sentids", "sentences"} and im["imgid"] == i
        assert len(im["sentences"]) == 5 and im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            name, _, raw = rows[s["sentid"]]
            assert name == im["filename"] and s["raw"] == raw and s["imgid"] == i
            assert s["tokens"] and all(t == t.lower() for t in s["tokens"])


def test_default_split_sizes() -> None:
    assert syn.default_holdout(600) >= 50 and syn.default_holdout(40) == 4


def test_word2vec(data: dict) -> None:
    from gensim.models import KeyedVectors

    kv = KeyedVectors.load_word2vec_format(data["word2vec"], binary=True)
    assert kv.vector_size == 300
    d = json.loads(Path(data["split_json"]).read_text())
    train_words, other_words = set(), set()
    for im in d["images"]:
        for s in im["sentences"]:
            (train_words if im["split"] == "train" else other_words).update(s["raw"].split())
    vocab = set(kv.index_to_key)
    assert vocab <= train_words
    only_heldout = other_words - train_words
    assert syn.HELDOUT_WORD in only_heldout and not only_heldout & vocab
    for w in syn.DROPPED_WORDS:
        assert w in train_words and w not in vocab  # occurs in captions, deliberately left out
    assert {"A", "a"} <= vocab  # case kept
    assert train_words - vocab - set(syn.DROPPED_WORDS) <= {w for w in train_words if not any(c.isalnum() for c in w)}


def test_cli_refuses_nonempty_and_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    (out / "x").write_text("keep")
    cmd = [sys.executable, "-m", "prepare.synthetic", "--out", str(out), "--images", "5", "--val", "1", "--test", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--overwrite" in r.stderr and (out / "x").exists()
    r = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (out / "x").exists() and len(os.listdir(out / "images")) == 5
    with pytest.raises(ValueError):
        syn.make_synthetic(tmp_path / "e", images=10, val=5, test=5)


def test_help() -> None:
    r = subprocess.run([sys.executable, "-m", "prepare.synthetic", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--out", "--images", "--seed", "--val", "--test", "--overwrite"):
        assert flag in r.stdout


def test_reduced_palette(tmp_path: Path) -> None:
    """--colours/--shapes keep only the first K colours and shapes, scenes stay unique, README records them."""
    info = syn.make_synthetic(tmp_path / "small", images=30, seed=1, val=3, test=3, colours=2, shapes=2)
    scenes = json.loads(Path(info["scenes"]).read_text())
    used = {(x["colour"], x["shape"]) for s in scenes for x in s["shapes"]}
    assert {c for c, _ in used} == {"red", "green"} and {s for _, s in used} == {"circle", "square"}
    idents = {tuple(sorted((x["shape"], x["colour"], x["size"]) for x in s["shapes"])) for s in scenes}
    assert len(idents) == 30
    assert "--colours 2 --shapes 2" in Path(info["readme"]).read_text()
    with pytest.raises(ValueError, match="colours must be in 1..8"):
        syn.make_synthetic(tmp_path / "bad", images=10, colours=9)
    # 1 colour x 1 shape x 2 sizes: only 9 multisets of 1-3 parts exist, 20 unique scenes cannot
    with pytest.raises(ValueError, match="cannot draw 20 unique scenes from 1 colours x 1 shapes"):
        syn.make_synthetic(tmp_path / "bad", images=20, colours=1, shapes=1)
    assert not (tmp_path / "bad").exists()


def _mentions(caption: str) -> tuple[int, int]:
    """(shape nouns, size words) in a caption: one of each per shape named with its size."""
    nouns = {syn_.split()[-1] for syns in syn.SYN_SHAPE.values() for syn_ in syns}
    sizes = {w for syns in syn.SYN_SIZE.values() for w in syns}
    words = caption.lower().split()
    template = sum(a == "one" and b == "shape" for a, b in zip(words, words[1:]))  # "One shape : ..."
    return sum(w in nouns for w in words) - template, sum(w in sizes for w in words)


def test_full_captions_name_every_shape_and_keep_the_images(data: dict, tmp_path: Path) -> None:
    info = syn.make_synthetic(tmp_path / "full", images=N, seed=SEED, val=VAL, test=TEST, full_captions=True)
    assert "--full-captions" in Path(info["readme"]).read_text()
    for which, expect_full in ((info, True), (data, False)):
        scenes = {s["filename"]: len(s["shapes"]) for s in json.loads(Path(which["scenes"]).read_text())}
        counts = [(_mentions(cap), scenes[f]) for f, _, cap in _token_lines(which)]
        full = [nouns == n and sizes == n for (nouns, sizes), n in counts]
        if expect_full:
            assert all(full)
        else:  # the default writes partial captions: the check above can fail
            assert not all(full) and sum(full) >= len(scenes)  # caption 0 is always full
    # the flag only changes the captions (and so word2vec): images and scenes are identical
    assert _files(Path(info["images_dir"])) == _files(Path(data["images_dir"]))
    assert Path(info["scenes"]).read_bytes() == Path(data["scenes"]).read_bytes()
    r = subprocess.run([sys.executable, "-m", "prepare.synthetic", "--help"], capture_output=True, text=True)
    assert "--full-captions" in r.stdout
