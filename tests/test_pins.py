"""Pins of decisions no other test fixed (issue 12): the Stage I crop distribution (spec 2.5), the position-shift
offsets (spec 2.1.5), the hard-negative pool without the batch's images and the CUHK-PEDES random negatives
(spec 7.5), the input normalisation of torchvision weights (decision 17), and COCO's all-captions evaluation next
to --first-k 5 (decision 7). The distribution tests draw from fixed seeds, so they are deterministic; their bounds
are chi-square critical values at p = 0.001."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

import engine.data as data_mod
from engine.data import TrainBatches, TrainSpec, original_crop_box
from models import ImageCNN


def chi_square_uniform(values: np.ndarray, lo: float, hi: float, bins: int = 10) -> float:
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
    expected = len(values) / bins
    return float(((counts - expected) ** 2 / expected).sum())


def critical(df: int) -> float:
    return float(stats.chi2.ppf(0.999, df))


# ------------------------------------------------------------------------------------------- Stage I crop (2.5)
N_CROPS = 20_000
W, H = 340, 256  # a prepared image: shorter side 256


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    rng = np.random.default_rng(12)
    return np.array([original_crop_box(W, H, rng) for _ in range(N_CROPS)])  # (N, 4) x0, y0, x1, y1


def test_crop_aspect_is_log_uniform_in_3_4_to_4_3(crops):
    cw, ch = crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]
    log_a = np.log(cw / ch)
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    assert log_a.min() >= lo - 1e-9 and log_a.max() <= hi + 1e-9
    assert chi_square_uniform(log_a, lo, hi) < critical(9)
    # a uniform (not log-uniform) aspect would fail the same check: the test can see the difference
    wrong = np.log(np.random.default_rng(0).uniform(3 / 4, 4 / 3, N_CROPS))
    assert chi_square_uniform(wrong, lo, hi) > critical(9)


def test_crop_area_is_64_to_100_percent_of_the_maximal_crop(crops):
    cw, ch = crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]
    a = cw / ch
    s_max = np.minimum(W / np.sqrt(a), H * np.sqrt(a))  # largest scale of the (sqrt A : 1/sqrt A) shape that fits
    frac = cw * ch / s_max ** 2  # area over the maximal area of that aspect
    assert frac.min() >= 0.64 - 1e-9 and frac.max() <= 1 + 1e-9
    assert chi_square_uniform(frac, 0.64, 1.0) < critical(9)  # s^2 ~ U[0.64, 1]
    side = np.sqrt(frac)  # the scale s itself is NOT uniform on [0.8, 1]
    assert chi_square_uniform(side, 0.8, 1.0) > critical(9)


def test_crop_position_is_uniform(crops):
    cw, ch = crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]
    for start, room in ((crops[:, 0], W - cw), (crops[:, 1], H - ch)):
        keep = room > 1.0
        u = start[keep] / room[keep]
        assert u.min() >= 0 and u.max() <= 1
        assert chi_square_uniform(u, 0.0, 1.0) < critical(9)
    assert (crops[:, 2] <= W + 1e-9).all() and (crops[:, 3] <= H + 1e-9).all()


# ------------------------------------------------------------------------------------------- position shift (2.1.5)
def batches_stub(max_len: int, lengths: list[int], shift: bool = True) -> TrainBatches:
    tb = TrainBatches.__new__(TrainBatches)  # only what _tokens reads
    tokens = np.zeros((len(lengths), max_len), dtype=np.int32)
    for r, n in enumerate(lengths):
        tokens[r, :n] = np.arange(1, n + 1)
    tb.data = SimpleNamespace(max_len=max_len, tokens=tokens)
    tb.lengths = np.array(lengths)
    tb.spec = TrainSpec(stage=1, batch_size=2, crop=8, seed=0, position_shift=shift)
    return tb


@pytest.mark.parametrize("length", [1, 7, 31, 32])
def test_position_shift_offsets_are_uniform_on_0_to_lmax_minus_len(length):
    L, n = 32, 12_000
    tb = batches_stub(L, [length])
    rng = np.random.default_rng(length)
    offsets = []
    for _ in range(n):
        tok = tb._tokens(0, rng)
        off = int(np.flatnonzero(tok)[0])
        assert tok[off:off + length].tolist() == list(range(1, length + 1)) and np.count_nonzero(tok) == length
        offsets.append(off)
    k = L - length + 1  # offsets 0 .. L - len
    counts = np.bincount(offsets, minlength=k)
    assert len(counts) == k and counts.sum() == n
    if k > 1:
        chi2 = float(((counts - n / k) ** 2 / (n / k)).sum())
        assert chi2 < critical(k - 1) and (counts > 0).all()


def test_left_alignment_when_position_shift_is_off():
    tb = batches_stub(32, [5], shift=False)
    rng = np.random.default_rng(0)
    assert all(tb._tokens(0, rng)[:5].tolist() == [1, 2, 3, 4, 5] for _ in range(50))


# ------------------------------------------------------------------------------------------- Stage II negatives (7.5)
def negatives_stub(image_class: np.ndarray, negatives: str, candidates: int = 256, batch: int = 32,
                   caption_class: np.ndarray | None = None, coco: bool = False) -> TrainBatches:
    """Stage II negatives over fake data: image i has class image_class[i]; caption j has class caption_class[j]
    (default: one caption per image); a caption's tokens carry its row (hard: its class)."""
    tb = TrainBatches.__new__(TrainBatches)
    tb.spec = TrainSpec(stage=2, batch_size=batch, crop=8, seed=5, negatives=negatives, num_candidates=candidates)
    tb.epoch = 0
    tb.train_rows = np.arange(len(image_class))
    tb.image_class = image_class
    cap_class = image_class if caption_class is None else caption_class
    tb.class_caps, tb.cap_class = np.argsort(cap_class, kind="stable"), np.sort(cap_class, kind="stable")
    tb.pool_excludes_anchors_only = coco
    tb.data = SimpleNamespace(num_classes=int(image_class.max()) + 1, max_len=4, image_path=lambda row: row)
    tb._caption = lambda cls, rng: int(cls)  # hard negatives: a "caption" of class c is c
    tb._tokens = lambda cap, rng: np.full(4, cap, dtype=np.int64)
    return tb


def positions_of(b: int, batch: int = 32) -> list[int]:
    return list(range(b * batch, (b + 1) * batch))  # one rank: anchors, then their negatives


@pytest.mark.parametrize("coco", [False, True])
def test_hard_negative_pool_excludes_the_batch_or_for_coco_its_anchors(coco):
    n = 100  # spec 7.5: Flickr30k's pool is every training image outside the batch, MSCOCO's outside the 16 anchors
    tb = negatives_stub(np.arange(n), "hard", coco=coco)  # every image its own class
    seen, xn_picked = set(), 0
    for b in range(40):
        rows = np.random.default_rng(b).permutation(n)[:32]  # the global batch: 16 anchors + 16 Xn
        out = tb._negatives(b, rows, positions_of(b))
        picked = out["cand_labels"].numpy()
        assert len(picked) == 256 and not set(picked) & set(rows[:16].tolist())
        assert (out["cand_tokens"][:, 0].numpy() == picked).all()
        xn_picked += len(set(picked) & set(rows[16:].tolist()))
        seen |= set(picked.tolist()) | set(rows.tolist())
    assert seen == set(range(n))  # the pool is every other training image, not a subset
    assert (xn_picked > 0) == coco


def test_cuhk_random_negatives_are_always_another_identity(monkeypatch):
    monkeypatch.setattr(data_mod, "train_image", lambda row, rng, crop: torch.full((3, 2, 2), float(row)))
    image_class = np.repeat(np.arange(3), 20)  # 3 identities x 20 images: same-identity collisions are frequent
    tb = negatives_stub(image_class, "random")
    replaced_total = 0
    for b in range(60):
        rows = np.random.default_rng(100 + b).choice(len(image_class), 32, replace=False)
        labels = torch.from_numpy(image_class[rows])
        out = tb._negatives(b, rows, positions_of(b))
        anchors, xn = labels[:16], labels[16:]
        assert (out["neg_labels"] != anchors).all()  # Yn: another identity
        assert (torch.from_numpy(image_class[out["neg_tokens"][:, 0].numpy()]) == out["neg_labels"]).all()
        clash = torch.nonzero(xn == anchors).flatten() + 16  # Xn_i of the anchor's identity must be replaced ...
        at = out.get("replace_at", torch.empty(0, dtype=torch.long))
        assert at.tolist() == clash.tolist()
        if len(at):  # ... by an image of another identity, whose label comes with it
            new = out["replace_labels"]
            assert (new != anchors[at - 16]).all()
            rows_used = out["replace_images"][:, 0, 0, 0].long().numpy()
            assert (image_class[rows_used] == new.numpy()).all()
            replaced_total += len(at)
    assert replaced_total > 50  # the collisions really happened


def test_cuhk_random_negatives_are_the_same_for_any_rank_count(monkeypatch):
    """Yn and the replaced Xn (its image and crop) of every anchor are drawn for the whole global batch: two ranks
    get the two halves of what one rank gets."""
    monkeypatch.setattr(data_mod, "train_image", lambda row, rng, crop: torch.full((3, 2, 2), row + rng.random()))
    image_class = np.repeat(np.arange(3), 20)
    one = negatives_stub(image_class, "random", batch=8)
    ranks = [negatives_stub(image_class, "random", batch=8) for _ in range(2)]
    for r, tb in enumerate(ranks):
        tb.spec = TrainSpec(**{**tb.spec.__dict__, "world_size": 2, "rank": r})
    replaced = 0
    for b in range(30):
        rows = np.random.default_rng(b).choice(len(image_class), 8, replace=False)
        pos = positions_of(b, 8)  # global: anchors 0-3, negatives 4-7; rank r has anchors 2r, 2r+1
        whole = one._negatives(b, rows, pos)
        for r, tb in enumerate(ranks):
            mine = [2 * r, 2 * r + 1]
            part = tb._negatives(b, rows, [pos[i] for i in mine] + [pos[4 + i] for i in mine])
            assert torch.equal(part["neg_tokens"], whole["neg_tokens"][mine])
            assert torch.equal(part["neg_labels"], whole["neg_labels"][mine])
            at = whole.get("replace_at", torch.empty(0, dtype=torch.long)).tolist()
            want = [(k, 4 + i) for k, i in enumerate(mine) if 4 + i in at]  # (local place, global place)
            assert part.get("replace_at", torch.empty(0)).tolist() == [2 + k for k, _ in want]
            for j, (_, g) in enumerate(want):
                assert torch.equal(part["replace_images"][j], whole["replace_images"][at.index(g)])
            replaced += len(want)
    assert replaced > 10


def test_cuhk_random_negative_is_a_uniform_caption_not_a_uniform_image(monkeypatch):
    """rand_diff_class2.m draws a caption index: an identity is chosen in proportion to its captions. Identity 1
    has 1 image with 30 captions, identity 2 has 30 images with one caption each (anchors: identity 0)."""
    image_class = np.array([0] * 40 + [1] + [2] * 30)
    caption_class = np.array([0] * 40 + [1] * 30 + [2] * 30)
    monkeypatch.setattr(data_mod, "train_image", lambda row, rng, crop: torch.zeros(3, 2, 2))  # Xn replaced
    tb = negatives_stub(image_class, "random", caption_class=caption_class, batch=4)
    drawn = []
    for b in range(1500):
        out = tb._negatives(b, np.array([0, 1, 2, 3]), positions_of(b, 4))  # anchors and Xn of identity 0
        drawn += out["neg_labels"].tolist()
    ones = drawn.count(1) / len(drawn)  # uniform over images would give 1/31
    assert set(drawn) == {1, 2} and abs(ones - 0.5) < 0.04, ones


# ------------------------------------------------------------------------------------------- normalisation (17)
PIXELS = torch.tensor([[[[0, 255]], [[128, 64]], [[255, 1]]]], dtype=torch.uint8)  # (1, 3, 1, 2)


def test_torchvision_style_normalisation_by_hand():
    got = ImageCNN("resnet18", "none").normalize(PIXELS)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet weights, on [0, 1]
    want = [[(0 / 255 - mean[0]) / std[0], (255 / 255 - mean[0]) / std[0]],
            [(128 / 255 - mean[1]) / std[1], (64 / 255 - mean[1]) / std[1]],
            [(255 / 255 - mean[2]) / std[2], (1 / 255 - mean[2]) / std[2]]]
    assert got.dtype == torch.float32 and torch.allclose(got[0, :, 0], torch.tensor(want), atol=1e-5)


def test_caffe_style_normalisation_by_hand():
    from tests.test_caffe_style import WIDTH
    got = ImageCNN("resnet50", "none", style="caffe", backbone_width=WIDTH, pixel_mean=(119.8557, 113.9346, 103.9336)
                   ).normalize(PIXELS)  # MSCOCO's hard-coded imdb.rgbMean (spec 2.3): 0-255 minus the mean, no std
    want = [[0 - 119.8557, 255 - 119.8557], [128 - 113.9346, 64 - 113.9346], [255 - 103.9336, 1 - 103.9336]]
    assert torch.allclose(got[0, :, 0], torch.tensor(want), atol=1e-4)


# ------------------------------------------------------------------------------------------- COCO captions (7)
def test_coco_protocol_names_keep_all_captions_and_first_5_apart():
    from engine.paper import compare_with_paper
    from evaluate import protocol_name
    assert protocol_name("coco", "test", 5000, None, None) == "coco-5k"  # all captions = the paper's
    assert protocol_name("coco", "test", 5000, None, 5) == "coco-5k-first5caps"
    assert protocol_name("coco", "test", 5000, 5, 5) == "coco-1k-first5caps"
    md = compare_with_paper({"i2t": {"R@1": 40.0}, "split": "test", "protocol": "coco-5k-first5caps"},
                            "coco/resnet50/stage2/5k")
    assert "WARNING: our protocol is 'coco-5k-first5caps'" in md


def test_coco_first_k_keeps_the_first_captions_and_default_keeps_all(tmp_path):
    from prepare import coco
    from tests.fixtures import COCO_IMAGES, make_coco, read_prepared
    files = make_coco(tmp_path / "raw")
    out = tmp_path / "prep"
    assert coco.main(["--images", str(files.root), "--split-json", str(files.karpathy), "--word2vec",
                      str(files.w2v.text), "--out", str(out), "--workers", "1", "--image-size", "16"]) == 0
    p = data_mod.Prepared(out)
    n_caps = {cid: len(caps) for cid, _, split, caps, *_ in COCO_IMAGES if split in ("train", "restval")}
    assert max(n_caps.values()) == 7  # an image with 7 captions
    all_rows, first5 = p.split_captions("train"), p.split_captions("train", first_k=5)
    assert len(all_rows) == sum(n_caps.values()) and len(first5) == sum(min(n, 5) for n in n_caps.values())
    assert set(p.captions["k"].to_numpy()[first5]) == set(range(5))
    assert set(first5) <= set(all_rows)
    assert read_prepared(out).manifest["dataset"] == "coco"
