"""Tests for prepare.synthetic_backbone: the demo's stand-in for ImageNet pretraining."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models import ImageCNN
from prepare import synthetic as syn
from prepare import synthetic_backbone as sb
from tests.test_image_cnn import _assert_backbone_equals


def test_attribute_labels_by_hand() -> None:
    # colours: red 0, green 1, blue 2, ...; shapes: circle 0, square 1, triangle 2, star 3, ...; gray background = 1
    y = sb.attribute_labels("gray", [("star", "blue", "small", 0, 0), ("circle", "red", "large", 1, 1),
                                     ("star", "red", "small", 2, 2)])
    assert y.shape == (65,)
    assert set(np.flatnonzero(y)) == {2 * 6 + 3, 0 * 6 + 0, 0 * 6 + 3, 48 + 2, 48 + 0, 56 + 3, 56 + 0, 62 + 1}


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


def test_pretrain_writes_a_loadable_deterministic_backbone_and_learns(tmp_path: Path) -> None:
    kw = dict(arch="resnet18", size=32, images=64, holdout=16, steps=25, batch=16, lr=2e-3, seed=1, log_every=0)
    r = sb.pretrain(tmp_path / "a.pth", **kw)
    assert r["loss_first_last"][1] < 0.8 * r["loss_first_last"][0]  # BCE falls from ~0.69 within 25 steps
    assert json.loads((tmp_path / "a.pth.json").read_text())["heldout"] == r["heldout"]
    assert set(r["heldout"]) == {"pair", "colour", "shape", "background"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "a.pth.json"]  # no temporary files left
    state = torch.load(tmp_path / "a.pth", weights_only=True)
    assert state["fc.weight"].shape == (65, 512)
    _assert_backbone_equals(ImageCNN(arch="resnet18", pretrained=str(tmp_path / "a.pth")), state)
    sb.pretrain(tmp_path / "b.pth", **kw)
    again = torch.load(tmp_path / "b.pth", weights_only=True)
    assert all(torch.equal(state[k], again[k]) for k in state)  # same seed -> same weights


def test_cli_errors_and_help(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert sb.main(["--out", str(tmp_path / "x.pth"), "--exclude", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err and not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        sb.main(["--out", str(tmp_path / "x.pth"), "--arch", "vgg19"])
    assert e.value.code == 2 and "resnet18" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sb.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--out", "--exclude", "--arch", "--size", "--images", "--steps", "--seed"):
        assert flag in out
