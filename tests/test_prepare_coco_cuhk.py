"""prepare.coco and prepare.cuhk_pedes on generated raw files in the real formats."""
import numpy as np
import pytest
from PIL import Image

from prepare import coco, cuhk_pedes
from tests.fixtures import COCO_IMAGES, CUHK_ENTRIES, assert_contract, make_coco, make_cuhk


def common(files, out):
    return ["--word2vec", str(files.w2v.binary), "--out", str(out), "--workers", "1", "--image-size", "16"]


@pytest.fixture(scope="module")
def coco14(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco14"), "2014", extra_train=6)


@pytest.fixture(scope="module")
def coco17(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco17"), "2017")


def test_coco_karpathy_restval_all_captions_rgb(coco14, tmp_path):
    out = tmp_path / "prep"
    assert coco.main(["--images", str(coco14.root), "--split-json", str(coco14.karpathy), *common(coco14, out)]) == 0
    p = assert_contract(out)
    m, im, cap = p.manifest, p.images, p.captions
    assert {s: d["images"] for s, d in m["splits"].items()} == {"train": 4, "val": 1, "test": 1}
    assert m["num_classes"] == 4 and m["dataset"] == "coco" and m["max_len"] == 32
    assert im["source"].tolist()[:2] == ["train2014/COCO_train2014_000000000009.jpg",
                                         "train2014/COCO_train2014_000000000025.jpg"]
    assert im["coco_id"].tolist() == [9, 25, 30, 34, 36, 42]
    assert cap.loc[cap["image"] == 0, "k"].tolist() == list(range(7))  # all 7 captions kept
    assert m["splits"]["train"]["captions"] == 7 + 5 + 5 + 5
    # '?' is a delimiter for COCO: "Is this a dog?" and "dog?grass" give "dog" and "grass"
    assert "dog" in p.dictionary and "grass" in p.dictionary and "dog?" not in p.dictionary
    assert p.dictionary.index("dog") < p.dictionary.index("Is")  # word2vec file order
    assert "elephant" not in p.dictionary and "Brown" not in p.dictionary  # val/test only
    for f in im["file"]:  # grayscale ('L') and CMYK originals come out RGB
        with Image.open(out / "images" / f) as img:
            assert img.mode == "RGB" and min(img.size) == 16
    assert Image.open(out / "images" / im["file"][3]).size == (21, 16)  # 400x300 original, draft mode


def test_coco_2017_folders_found_by_cocoid(coco17, tmp_path):
    out = tmp_path / "prep"
    assert coco.main(["--images", str(coco17.root), "--split-json", str(coco17.karpathy), *common(coco17, out)]) == 0
    p = assert_contract(out)
    assert p.images["source"].tolist()[0] == "train2017/000000000009.jpg"
    assert p.images["source"].tolist()[-1] == "val2017/000000000042.jpg"


def _random(coco14, out, seed, nval=3, ntest=2):
    args = ["--images", str(coco14.root), "--captions-json", *map(str, coco14.captions),
            "--random-split", str(nval), str(ntest), "--seed", str(seed), *common(coco14, out)]
    assert coco.main(args) == 0
    return assert_contract(out)


def test_coco_random_split_reproducible(coco14, tmp_path):
    a, b, c = (_random(coco14, tmp_path / n, s) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    n = len(COCO_IMAGES) + 6
    assert {s: d["images"] for s, d in a.manifest["splits"].items()} == {"train": n - 5, "val": 3, "test": 2}
    assert a.manifest["num_classes"] == n - 5
    assert a.images["source"].tolist() == b.images["source"].tolist()
    assert a.images["split"].tolist() == b.images["split"].tolist()
    assert np.array_equal(a.tokens, b.tokens) and a.dictionary == b.dictionary
    key = lambda p: {s: set(p.images.loc[p.images["split"] == s, "source"]) for s in ("val", "test")}
    assert key(a) != key(c)
    assert a.manifest["warnings"]["image_no_captions"]["count"] == 1  # image 999 has no annotation
    assert a.manifest["split_mode"] == "random(seed=1)"
    assert {"captions_json_0", "captions_json_1"} <= set(a.manifest["inputs"])
    # merged in file order: the train file's images come before the val file's within a split
    train = a.images.loc[a.images["split"] == "train", "source"].tolist()
    assert train == sorted(train, key=lambda s: (not s.startswith("train2014"), s))


def test_coco_random_split_too_large_is_error(coco14, tmp_path, capsys):
    args = ["--images", str(coco14.root), "--captions-json", *map(str, coco14.captions),
            "--random-split", "10", "10", *common(coco14, tmp_path / "x")]
    assert coco.main(args) == 2
    assert "--random-split 10 10: needs 0 <= NVAL + NTEST < 12" in capsys.readouterr().err


def test_cuhk_classes_are_identities(tmp_path):
    files = make_cuhk(tmp_path / "cuhk")
    out = tmp_path / "prep"
    assert cuhk_pedes.main(["--root", str(files.root), *common(files, out)]) == 0
    p = assert_contract(out)
    m, im, cap = p.manifest, p.images, p.captions
    assert m["match"] == "person" and m["max_len"] == 56 and m["image_resize"] == {"mode": "square", "size": 16}
    assert m["num_classes"] == 3 and m["identities"] == {"train": 3, "val": 1, "test": 2}
    assert im["person"].tolist() == [e[1] for e in CUHK_ENTRIES]  # raw ids, file order
    assert im["label"].tolist() == [0, 1, 0, 2, 1, -1, -1, -1, -1]  # ids 5, 9, 7 in order of first appearance
    assert im["file"].tolist()[0] == "CUHK01/0005001.jpg" and im["source"].tolist()[0] == "CUHK01/0005001.png"
    assert len(cap) == sum(len(e[3]) for e in CUHK_ENTRIES) and cap["person"].tolist()[:2] == [5, 5]
    for f in im["file"]:
        assert Image.open(out / "images" / f).size == (16, 16)
    assert "zebra" not in p.dictionary and "woman" in p.dictionary and "red" in p.dictionary
