"""Tests for models.losses: instance loss, ranking loss, hardest negatives, the total J (spec 6.1-6.3, 7.5)."""
from __future__ import annotations

import math

import pytest
import torch

from models import hardest_negatives, instance_loss, l2_normalize, ranking_loss, total_loss


def ce_by_hand(logits: torch.Tensor, label: int) -> float:
    row = [float(v) for v in logits]
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row)) - row[label]


def cos(a: list[float], b: list[float]) -> float:
    na = math.sqrt(1e-8 + sum(x * x for x in a))
    nb = math.sqrt(1e-8 + sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


# ------------------------------------------------------------------------------------------ instance loss, 6.1

def test_instance_loss_is_cross_entropy_ignoring_minus_one() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g) * 3
    labels = torch.tensor([3, -1, 0, 6, -1])
    got = instance_loss(logits, labels)
    valid = [i for i in range(5) if labels[i] >= 0]
    ref = sum(ce_by_hand(logits[i], int(labels[i])) for i in valid) / len(valid)
    assert got.item() == pytest.approx(ref, rel=1e-5)
    assert torch.allclose(got, torch.nn.functional.cross_entropy(logits[valid], labels[valid]))
    # the -1 rows really do not matter
    logits2 = logits.clone()
    logits2[1] = 100 * torch.randn(7, generator=g)
    assert torch.allclose(instance_loss(logits2, labels), got)


# -------------------------------------------------------------------------------------------- L2 norm, 6.2

def test_l2_normalize_is_x_over_sqrt_eps_plus_norm2() -> None:
    x = torch.tensor([[3.0, 4.0], [1e-5, 0.0], [0.0, 0.0], [1e-4, 1e-4]])
    got = l2_normalize(x)
    ref = torch.tensor([[0.6, 0.8],
                        [1e-5 / math.sqrt(1e-8 + 1e-10), 0.0],  # = 0.0995..., NOT 1 (plain F.normalize)
                        [0.0, 0.0],
                        [1e-4 / math.sqrt(1e-8 + 2e-8)] * 2])
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert got[1, 0].item() == pytest.approx(0.0995037, rel=1e-5)
    assert torch.isfinite(got).all()


# ---------------------------------------------------------------------------------------- ranking loss, 6.2

def test_ranking_loss_hand_computed_example() -> None:
    # anchor pair 0: Xp = (3,4)/5 = (0.6, 0.8), Yp = (1, 0), Yn = (0, 2)/2 = (0, 1), Xn = (1,1)/sqrt2
    #   <Xp,Yp> = 0.6, <Xp,Yn> = 0.8, <Yp,Xn> = 0.70711
    #   L1 = max(0, 1 - (0.6 - 0.8)) = 1.2 ; L2 = max(0, 1 - (0.6 - 0.70711)) = 1.10711
    # anchor pair 1: Xp = (0, 5) -> (0, 1), Yp = (0, 1), Yn = (1, 0), Xn = (2, 0) -> (1, 0)
    #   L1 = max(0, 1 - (1 - 0)) = 0 ; L2 = 0
    xp = torch.tensor([[3.0, 4.0], [0.0, 5.0]])
    yp = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    xn = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    yn = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    got = ranking_loss(xp, yp, xn, yn)  # margin 1
    assert got.item() == pytest.approx(1.2 + (1 + 1 / math.sqrt(2) - 0.6), abs=1e-5)
    assert got.item() == pytest.approx(2.30711, abs=1e-5)
    # margin 0.5: L1 = 0.5 + 0.2 = 0.7 ; L2 = 0.5 + 0.10711 = 0.60711 ; pair 1 still 0
    assert ranking_loss(xp, yp, xn, yn, margin=0.5).item() == pytest.approx(1.30711, abs=1e-5)


def test_ranking_loss_uses_the_eps_normalisation() -> None:
    # Xp = (1e-5, 0) normalises to s = 1e-5 / sqrt(1e-8 + 1e-10) = 0.0995 (not 1); Yp = (1,0); Yn = Xn = (0,1)
    s = 1e-5 / math.sqrt(1e-8 + 1e-10)
    got = ranking_loss(torch.tensor([[1e-5, 0.0]]), torch.tensor([[1.0, 0.0]]),
                       torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]))
    assert got.item() == pytest.approx(2 * (1 - s), abs=1e-5)


def test_ranking_loss_is_exactly_zero_when_all_margins_are_met() -> None:
    xp = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    yp = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    xn = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    yn = torch.tensor([[0.0, 5.0], [1.0, 0.0]])
    got = ranking_loss(xp, yp, xn, yn, margin=0.9)  # 0.9 - (1 - 0) < 0 for both directions, both anchors
    assert got.item() == 0.0
    assert ranking_loss(xp, yp, xn, yn, margin=1.1).item() == pytest.approx(4 * 0.1, abs=1e-6)


def test_ranking_loss_random_matches_loop() -> None:
    g = torch.Generator().manual_seed(1)
    xp, yp, xn, yn = (torch.rand(6, 5, generator=g) for _ in range(4))
    ref = 0.0
    for i in range(6):
        a, b, c, d = (t[i].tolist() for t in (xp, yp, xn, yn))
        ref += max(0.0, 1 - (cos(a, b) - cos(a, d)))  # image anchor, negative text
        ref += max(0.0, 1 - (cos(b, a) - cos(b, c)))  # text anchor, negative image
    assert ranking_loss(xp, yp, xn, yn).item() == pytest.approx(ref, abs=1e-5)


# ------------------------------------------------------------------------------------ hardest negatives, 7.5

def test_hardest_negatives_is_argmax_cosine() -> None:
    g = torch.Generator().manual_seed(2)
    anchors = torch.rand(5, 8, generator=g)
    pool = torch.rand(40, 8, generator=g) * torch.rand(40, 1, generator=g) * 10  # varied norms: cosine != dot
    got = hardest_negatives(anchors, pool)
    for i in range(5):
        sims = [cos(anchors[i].tolist(), pool[j].tolist()) for j in range(40)]
        assert int(got[i]) == max(range(40), key=lambda j: sims[j])
    dots = anchors @ pool.T
    assert not torch.equal(got, dots.argmax(1))  # the example does distinguish cosine from dot product


# ------------------------------------------------------------------------------------------- total J, 6.3

def _out_dict(b: int, n: int, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"img_logits": torch.randn(b, n, generator=g), "txt_logits": torch.randn(b, n, generator=g),
            "img_rank": torch.rand(b, 6, generator=g), "txt_rank": torch.rand(b, 6, generator=g)}


@pytest.mark.parametrize("lambdas", [(2.0, 1.0, 0.1), (0.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_total_loss_matches_explicit_formula(lambdas: tuple[float, float, float]) -> None:
    lr_, li, lt = lambdas
    b, n = 6, 5
    out = _out_dict(b, n)
    labels_img = torch.tensor([0, 1, 2, 3, 4, 0])
    labels_txt = torch.tensor([0, 1, 2, 4, 3, 1])
    j, terms = total_loss(out, labels_img, labels_txt, lambda_rank=lr_, lambda_img=li, lambda_txt=lt)
    h = b // 2
    rank_sum = 0.0
    for i in range(h):  # rows 0..h-1 positives, rows h..b-1 the negatives paired by position
        xp, yp = out["img_rank"][i].tolist(), out["txt_rank"][i].tolist()
        xn, yn = out["img_rank"][h + i].tolist(), out["txt_rank"][h + i].tolist()
        rank_sum += max(0.0, 1 - (cos(xp, yp) - cos(xp, yn))) + max(0.0, 1 - (cos(yp, xp) - cos(yp, xn)))
    ce_img = sum(ce_by_hand(out["img_logits"][k], int(labels_img[k])) for k in range(b))
    ce_txt = sum(ce_by_hand(out["txt_logits"][k], int(labels_txt[k])) for k in range(b))
    ref = (lr_ * rank_sum + li * ce_img + lt * ce_txt) / b
    assert j.item() == pytest.approx(ref, rel=1e-5)
    assert terms["total"].item() == pytest.approx(ref, rel=1e-5)
    assert terms["instance_img"].item() == pytest.approx(ce_img / b, rel=1e-5)
    assert terms["instance_txt"].item() == pytest.approx(ce_txt / b, rel=1e-5)
    if lr_:
        assert rank_sum > 0
        assert terms["rank"].item() == pytest.approx(rank_sum / h, rel=1e-5)  # mean over anchors of L1+L2


def test_total_loss_margin_is_passed_through() -> None:
    out = _out_dict(4, 3)
    lab = torch.tensor([0, 1, 2, 0])
    j1, _ = total_loss(out, lab, lab, lambda_rank=2, lambda_img=0, lambda_txt=0, margin=1.0)
    j2, _ = total_loss(out, lab, lab, lambda_rank=2, lambda_img=0, lambda_txt=0, margin=0.5)
    ref2 = 2 * ranking_loss(out["img_rank"][:2], out["txt_rank"][:2], out["img_rank"][2:], out["txt_rank"][2:],
                            margin=0.5) / 4
    assert j2.item() == pytest.approx(ref2.item(), rel=1e-6)
    assert j1.item() > j2.item()


def test_total_loss_odd_batch_with_ranking_raises() -> None:
    out = _out_dict(5, 3)
    lab = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError):
        total_loss(out, lab, lab, lambda_rank=2.0, lambda_img=1.0, lambda_txt=0.1)
    j, _ = total_loss(out, lab, lab, lambda_rank=0.0, lambda_img=1.0, lambda_txt=1.0)  # Stage I: any size
    assert torch.isfinite(j)
