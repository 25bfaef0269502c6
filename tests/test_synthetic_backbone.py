"""Tests for prepare.synthetic_backbone: the demo's stand-in for ImageNet pretraining."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prepare.images import original_crop_box
from models import ImageCNN
from prepare import synthetic as syn
from prepare import synthetic_backbone as sb
from tests.test_image_cnn import _assert_backbone_equals


def test_attribute_labels_by_hand() -> None:
    # colours: red 0, green 1, blue 2, ...; shapes: circle 0, square 1, triangle 2, star 3, ...; small 0, large 1;
    # gray background = 1
    y = sb.attribute_labels("gray", [("star", "blue", "small", 0, 0), ("circle", "red", "large", 1, 1),
                                     ("star", "red", "small", 2, 2)])
    assert y.shape == (sb.NUM_LABELS,) == (175,)
    triples = {(2 * 6 + 3) * 2 + 0, (0 * 6 + 0) * 2 + 1, (0 * 6 + 3) * 2 + 0}
    pairs = {96 + 2 * 6 + 3, 96 + 0, 96 + 0 * 6 + 3}
    assert set(np.flatnonzero(y)) == triples | pairs | {144 + 2, 144 + 0, 152 + 3, 152 + 0, 158 + 0, 158 + 1,
                                                        160 + 2, 163 + 0, 163 + 4, 163 + 8, 172 + 1}
    assert {g: int(y[s].sum()) for g, s in sb.GROUPS.items()} == {
        "triple": 3, "pair": 3, "colour": 2, "shape": 2, "size": 2, "count": 1, "cell": 3, "background": 1}


def _scene() -> tuple[np.ndarray, str, list]:
    """A 90x72 black scene with a red square at the left (x 20) and a blue circle at the right (x 70)."""
    arr = np.zeros((72, 90, 3), np.uint8)
    arr[26:46, 10:30] = (220, 30, 30)
    arr[26:46, 60:80] = (30, 70, 225)
    return arr, "black", [("square", "red", "large", 20.0, 36.0), ("circle", "blue", "small", 70.0, 36.0)]


def test_scene_crop_labels_follow_the_crop_and_its_flip() -> None:
    rng = np.random.default_rng(0)
    img, y = sb.scene_crop(_scene(), 32, rng, box=(10, 0, 55, 72), flip=False)  # the left half: only the square
    assert img.shape == (32, 32, 3) and img[16, 7].tolist()[0] > 150  # red at the left
    assert set(np.flatnonzero(y)) == {(0 * 6 + 1) * 2 + 1, 96 + 1, 144 + 0, 152 + 1, 158 + 1, 160 + 0, 163 + 3,
                                      172 + 2}  # large red square, one object, middle-left cell, black
    flipped, yf = sb.scene_crop(_scene(), 32, rng, box=(10, 0, 55, 72), flip=True)
    assert np.array_equal(flipped, img[:, ::-1]) and yf[163 + 5] == 1 and yf[163 + 3] == 0  # now middle-right
    _, whole = sb.scene_crop(_scene(), 32, rng, box=(0, 0, 90, 72), flip=False)
    assert whole[160 + 1] == 1 and whole[163 + 3] == whole[163 + 5] == 1  # two objects, left and right


def test_scene_crop_draws_stage_ones_crop_then_the_flip() -> None:
    """A random scene crop is Stage I's crop (spec 2.5, prepare.images.original_crop_box) then a fair flip, drawn
    in that order from the generator: the same draws made by hand give the same pixels and labels."""
    for seed in range(6):
        drawn, y = sb.scene_crop(_scene(), 32, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        box = original_crop_box(90, 72, rng)
        by_hand, y2 = sb.scene_crop(_scene(), 32, rng, box=box, flip=bool(rng.random() < 0.5))
        assert np.array_equal(drawn, by_hand) and np.array_equal(y, y2)


def test_object_crop_centres_the_object() -> None:
    rng = np.random.default_rng(1)
    for _ in range(10):
        img, (shape, colour, size) = sb.object_crop(_scene(), 16, rng)
        assert img.shape == (16, 16, 3)
        centre = img[6:10, 6:10].reshape(-1, 3).mean(0)  # at most 2 px off centre: inside the 20-px object
        if shape == syn.SHAPES.index("square"):
            assert (colour, size) == (0, 1) and centre[0] > 150
        else:
            assert (shape, colour, size) == (0, 2, 0) and centre[2] > 150


def test_make_pool_resizes_as_the_preparer_and_places_objects() -> None:
    pool = sb.make_pool(6, 72, seed=3)
    for arr, bg, objects in pool:
        assert min(arr.shape[:2]) == 72 and bg in syn.BACKGROUNDS and 1 <= len(objects) <= 3
        for _sh, co, _sz, x, y in objects:  # the object's colour is at its centre (noise sd 6)
            assert np.abs(arr[int(y), int(x)].astype(int) - syn.COLOURS[co]).max() < 40


def test_pool_skips_excluded_scenes_and_keeps_its_stream() -> None:
    a = sb.pool_scenes(40, np.random.default_rng(3))
    excluded = {syn.scene_identity(parts) for _, parts in a[:10]}
    b = sb.pool_scenes(40, np.random.default_rng(3), excluded)
    assert len(b) == 40 and not {syn.scene_identity(parts) for _, parts in b} & excluded
    assert b[:30] == a[10:40]  # the same stream, minus the excluded scenes


def test_excluded_identities_read_a_synthetic_dataset(tmp_path: Path) -> None:
    info = syn.make_synthetic(tmp_path / "raw", images=12, seed=2, val=2, test=2)
    rows = json.loads(Path(info["scenes"]).read_text())
    ids = sb.excluded_identities(info["scenes"])
    assert len(ids) == 12
    assert syn.scene_identity([(x["shape"], x["colour"], x["size"]) for x in rows[0]["shapes"]]) in ids
    bad = tmp_path / "bad.json"
    bad.write_text('[{"shape": "circle"}]')
    with pytest.raises(ValueError, match="bad.json: expected the scenes.json"):
        sb.excluded_identities(bad)


def test_recalibrated_bn_statistics_are_those_of_scene_crops() -> None:
    """After recalibrate_bn a BatchNorm's running mean is the mean of its inputs' batch means over the scene
    crops it was shown (brute force: the same crops drawn again from the same seed)."""
    pool = sb.make_pool(8, 36, seed=4)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    net = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4))
    net[1].running_mean.fill_(5.0)  # stale statistics (say, of object crops)
    sb.recalibrate_bn(net, pool, 32, 3, np.random.default_rng(7), torch.device("cpu"), batches=4)
    rng = np.random.default_rng(7)
    means = []
    with torch.no_grad():
        for _ in range(4):
            crops = [sb.scene_crop(pool[int(i)], 32, rng)[0] for i in rng.integers(len(pool), size=3)]
            means.append(conv(sb._batch(crops, torch.device("cpu"))).mean((0, 2, 3)))
    assert torch.allclose(net[1].running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert net[1].momentum == 0.1  # back to the default for whoever trains it next


def test_pretrain_writes_a_loadable_deterministic_backbone_and_learns(tmp_path: Path) -> None:
    kw = dict(arch="resnet18", size=32, images=48, holdout=16, steps=30, batch=8, lr=2e-3, seed=1, log_every=0,
              device="cpu")
    r = sb.pretrain(tmp_path / "a.pth", **kw)
    assert r["loss_first_last"][1] < 0.8 * r["loss_first_last"][0]  # falls within 30 steps
    assert json.loads((tmp_path / "a.pth.json").read_text())["heldout"] == r["heldout"]
    assert set(r["heldout"]) == set(sb.GROUPS) | set(sb.OBJECT_HEADS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "a.pth.json"]  # no temporary files left
    state = torch.load(tmp_path / "a.pth", weights_only=True)
    assert state["fc.weight"].shape == (sb.NUM_OUTPUTS, 512) == (175 + 16, 512)
    _assert_backbone_equals(ImageCNN(arch="resnet18", pretrained=str(tmp_path / "a.pth")), state)
    sb.pretrain(tmp_path / "b.pth", **kw)
    again = torch.load(tmp_path / "b.pth", weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)  # same seed -> same weights


def test_cli_errors_and_help(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert sb.main(["--out", str(tmp_path / "x.pth"), "--exclude", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err and not list(tmp_path.iterdir())
    assert sb.main(["--out", str(tmp_path / "x.pth"), "--device", "gpu0"]) == 2
    assert "--device gpu0" in capsys.readouterr().err and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        sb.main(["--out", str(tmp_path / "x.pth"), "--arch", "vgg19"])
    assert e.value.code == 2 and "resnet18" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sb.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--out", "--exclude", "--arch", "--size", "--images", "--steps", "--seed", "--device"):
        assert flag in out
