"""Tests for the ablation ranking losses (config ``ranking_loss``): VSE++'s in-batch hardest negative
("max_violation") and the sum of hinges over all in-batch negatives ("sum_hinge"), against a hand-computed batch."""
from __future__ import annotations

import random

import pytest
import torch

from models import in_batch_ranking_loss, ranking_loss, total_loss

# Stage II layout, B = 4: rows 0-1 are the anchor pairs (Xp_i, Yp_i), rows 2-3 the paper's negatives (Xn_i, Yn_i).
IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])  # x0, x1 (Xp); x2, x3 (Xn)
TXT = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]])  # y0, y1 (Yp); y2, y3 (Yn)
IMG_LABELS = torch.tensor([0, 1, 2, 1])  # x3 shares anchor 1's class: never a negative of text anchor 1
TXT_LABELS = torch.tensor([0, 1, 2, 0])  # y3 shares anchor 0's class: never a negative of image anchor 0
MARGIN = 0.3
# All vectors have norm 1, so cosines are dot products; positives <x0,y0> = <x1,y1> = 0.8; h = max(0, 0.3 - 0.8 + s).
#   image anchor 0, texts: y1 s=0.6 -> 0.1 ; y2 s=0 -> 0 ; y3 excluded (same class; it would give 0.5)
#   image anchor 1, texts: y0 s=0.6 -> 0.1 ; y2 s=1 -> 0.5 ; y3 s=0 -> 0
#   text anchor 0, images: x1 s=0.6 -> 0.1 ; x2 s=0.96 -> 0.46 ; x3 s=1 -> 0.5
#   text anchor 1, images: x0 s=0.6 -> 0.1 ; x2 s=1 -> 0.5 ; x3 excluded (same class; it would give 0.46)
MAX_VIOLATION = 0.1 + 0.5 + 0.5 + 0.5
SUM_HINGE = 0.1 + (0.1 + 0.5) + (0.1 + 0.46 + 0.5) + (0.1 + 0.5)
PAPER = 0.0 + 0.46 + 0.0 + 0.46  # L1_0 (y2), L2_0 (x2), L1_1 (y3), L2_1 (x3)


def test_max_violation_hand_computed() -> None:
    got = in_batch_ranking_loss(IMG, TXT, IMG_LABELS, TXT_LABELS, anchors=2, margin=MARGIN, reduce="max")
    assert got.item() == pytest.approx(MAX_VIOLATION, abs=1e-5)


def test_sum_hinge_hand_computed() -> None:
    got = in_batch_ranking_loss(IMG, TXT, IMG_LABELS, TXT_LABELS, anchors=2, margin=MARGIN, reduce="sum")
    assert got.item() == pytest.approx(SUM_HINGE, abs=1e-5)


def test_paper_loss_on_the_same_batch_differs() -> None:
    got = ranking_loss(IMG[:2], TXT[:2], IMG[2:], TXT[2:], margin=MARGIN)
    assert got.item() == pytest.approx(PAPER, abs=1e-5)


def test_features_are_l2_normalised_first() -> None:
    scale = torch.tensor([[3.0], [0.5], [7.0], [2.0]])
    for reduce in ("max", "sum"):
        a = in_batch_ranking_loss(IMG * scale, TXT * scale.flip(0), IMG_LABELS, TXT_LABELS, 2, MARGIN, reduce)
        b = in_batch_ranking_loss(IMG, TXT, IMG_LABELS, TXT_LABELS, 2, MARGIN, reduce)
        assert a.item() == pytest.approx(b.item(), abs=1e-5)


def brute_force(img: torch.Tensor, txt: torch.Tensor, li: list[int], lt: list[int], k: int, margin: float,
                reduce: str) -> float:
    def norm(v: list[float]) -> list[float]:
        n = (1e-8 + sum(a * a for a in v)) ** 0.5
        return [a / n for a in v]

    x = [norm(r) for r in img.tolist()]
    y = [norm(r) for r in txt.tolist()]
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))  # noqa: E731
    agg = max if reduce == "max" else sum
    total = 0.0
    for i in range(k):
        pos = dot(x[i], y[i])
        h1 = [max(0.0, margin - pos + dot(x[i], y[t])) for t in range(len(y)) if lt[t] != li[i]]
        h2 = [max(0.0, margin - pos + dot(y[i], x[u])) for u in range(len(x)) if li[u] != lt[i]]
        total += (agg(h1) if h1 else 0.0) + (agg(h2) if h2 else 0.0)
    return total


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_random_batches_match_a_python_loop(reduce: str) -> None:
    rnd = random.Random(3)
    for trial in range(5):
        g = torch.Generator().manual_seed(trial)
        img, txt = torch.rand(8, 5, generator=g), torch.rand(8, 5, generator=g)  # post-ReLU-like features
        li = [rnd.randrange(4) for _ in range(8)]
        lt = li[:4] + [rnd.randrange(4) for _ in range(4)]  # anchors' texts carry their image's class
        got = in_batch_ranking_loss(img, txt, torch.tensor(li), torch.tensor(lt), 4, 0.7, reduce).item()
        assert got == pytest.approx(brute_force(img, txt, li, lt, 4, 0.7, reduce), abs=1e-5)


def test_anchor_without_negatives_contributes_zero() -> None:
    same = torch.zeros(4, dtype=torch.long)
    for reduce in ("max", "sum"):
        assert in_batch_ranking_loss(IMG, TXT, same, same, 2, MARGIN, reduce).item() == 0.0


@pytest.mark.parametrize("option, expected", [("paper", PAPER), ("max_violation", MAX_VIOLATION),
                                              ("sum_hinge", SUM_HINGE)])
def test_total_loss_selects_the_option_and_divides_by_b(option: str, expected: float) -> None:
    n_classes = 3
    out = {"img_rank": IMG, "txt_rank": TXT, "img_logits": torch.zeros(4, n_classes),
           "txt_logits": torch.zeros(4, n_classes)}
    j, terms = total_loss(out, IMG_LABELS, TXT_LABELS, lambda_rank=2.0, lambda_img=0.0, lambda_txt=0.0,
                          margin=MARGIN, ranking=option)
    assert j.item() == pytest.approx(2.0 * expected / 4, abs=1e-5)
    assert terms["rank"].item() == pytest.approx(expected / 2, abs=1e-5)  # mean over the 2 anchors


def test_unknown_option_lists_the_choices() -> None:
    out = {"img_rank": IMG, "txt_rank": TXT, "img_logits": torch.zeros(4, 3), "txt_logits": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match="paper.*max_violation.*sum_hinge"):
        total_loss(out, IMG_LABELS, TXT_LABELS, lambda_rank=1.0, lambda_img=1.0, lambda_txt=1.0, ranking="vsepp")


def test_config_key_selects_the_option_and_rejects_others() -> None:
    from pathlib import Path

    from engine.config import ConfigError, load_config
    cfg2 = Path(__file__).resolve().parents[1] / "configs" / "flickr30k_stage2.yaml"
    assert load_config(cfg2, stage=2).ranking_loss == "paper"  # the paper's loss is the default
    assert load_config(cfg2, {"ranking_loss": "max_violation"}, stage=2).ranking_loss == "max_violation"
    with pytest.raises(ConfigError, match="ranking_loss.*paper.*max_violation.*sum_hinge"):
        load_config(cfg2, {"ranking_loss": "vsepp"}, stage=2)
