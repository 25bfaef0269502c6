"""Instance loss, ranking loss, hard-negative selection and the Stage II total (spec 6.1-6.3, 7.5).

Normalisation (spec 6.3): every MatConvNet loss layer returns a sum over the batch and the summed gradient is
divided by the batch size B, so one iteration optimises

    J = [ lambda_rank * sum_i (L1_i + L2_i)  +  lambda_img * sum_j CE_img_j  +  lambda_txt * sum_j CE_txt_j ] / B

with i over the B/2 anchors and j over all B images / texts: the instance terms are batch means, the ranking
term is a sum divided by B.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.vectors import l2_normalize  # x / sqrt(1e-8 + ||x||^2): the original's LRN, window 4096

IGNORE = -1  # label of val/test items: never a class
RANKING_LOSSES = ("paper", "max_violation", "sum_hinge")


def instance_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy through the shared W, averaged over the batch; label -1 (val/test) ignored."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)


def ranking_loss(img_pos: torch.Tensor, txt_pos: torch.Tensor, img_neg: torch.Tensor, txt_neg: torch.Tensor,
                 margin: float = 1.0) -> torch.Tensor:
    """Bidirectional hinge on cosine similarity (spec 6.2), one negative per anchor, SUMMED over anchors.

    All inputs (K, D) post-ReLU features; row i of the negatives is the negative of anchor pair i.
        L1_i = max(0, margin - (<Xp_i, Yp_i> - <Xp_i, Yn_i>))   image anchor, negative text
        L2_i = max(0, margin - (<Yp_i, Xp_i> - <Yp_i, Xn_i>))   text anchor, negative image
    """
    xp, yp, xn, yn = (l2_normalize(t.float()) for t in (img_pos, txt_pos, img_neg, txt_neg))
    pos = (xp * yp).sum(1)  # (K,)
    l1 = F.relu(margin - pos + (xp * yn).sum(1))  # (K,)
    l2 = F.relu(margin - pos + (yp * xn).sum(1))  # (K,)
    return (l1 + l2).sum()


def in_batch_ranking_loss(img_rank: torch.Tensor, txt_rank: torch.Tensor, img_labels: torch.Tensor,
                          txt_labels: torch.Tensor, anchors: int, margin: float = 1.0, reduce: str = "max"
                          ) -> torch.Tensor:
    """Ablation ranking losses over in-batch negatives (not the paper's), SUMMED over the ``anchors`` pairs.

    Rows 0..anchors-1 of ``img_rank`` / ``txt_rank`` (B, D) are the matching pairs (Xp_i, Yp_i). Every other item
    of the batch whose label differs from the anchor's is a negative: for image anchor i all B texts t with
    txt_labels[t] != img_labels[i] (the other Yp_j and every Yn), for text anchor i all B images u with
    img_labels[u] != txt_labels[i] (the other Xp_j and every Xn). With h_it = max(0, margin - <x_i, y_i> + <x_i, y_t>):
        reduce="max" (VSE++ "max violation"): L1_i = max_t h_it,  L2_i likewise over images
        reduce="sum" (VSE0 "sum of hinges"):  L1_i = sum_t h_it,  L2_i likewise
    An anchor without any negative contributes 0."""
    if reduce not in ("max", "sum"):
        raise ValueError(f"reduce must be one of ['max', 'sum'], got {reduce!r}")
    x, y = l2_normalize(img_rank.float()), l2_normalize(txt_rank.float())  # (B, D)
    pos = (x[:anchors] * y[:anchors]).sum(1, keepdim=True)  # (K, 1)
    neg_txt = txt_labels[None, :] != img_labels[:anchors, None]  # (K, B) valid negative texts of image anchors
    neg_img = img_labels[None, :] != txt_labels[:anchors, None]  # (K, B) valid negative images of text anchors
    h1 = F.relu(margin - pos + x[:anchors] @ y.T) * neg_txt  # (K, B)
    h2 = F.relu(margin - pos + y[:anchors] @ x.T) * neg_img  # (K, B)
    if reduce == "max":
        return (h1.amax(1) + h2.amax(1)).sum()
    return (h1.sum(1) + h2.sum(1)).sum()


def hardest_negatives(anchor_img: torch.Tensor, candidate_txt: torch.Tensor) -> torch.Tensor:
    """Spec 7.5 step 4: for each anchor image the candidate caption of highest cosine similarity. (K,) indices."""
    sim = l2_normalize(anchor_img.float()) @ l2_normalize(candidate_txt.float()).T  # (K, P)
    return sim.argmax(dim=1)


def total_loss(out: dict[str, torch.Tensor], labels_img: torch.Tensor, labels_txt: torch.Tensor, *,
               lambda_rank: float, lambda_img: float, lambda_txt: float, margin: float = 1.0,
               ranking: str = "paper") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """J of spec 6.3 for a batch laid out as [B/2 positives; B/2 negatives] (Stage II) or any batch with
    lambda_rank = 0 (Stage I). ``ranking``: "paper" (each anchor against its own negative, ``ranking_loss``),
    or the ablations "max_violation" / "sum_hinge" (``in_batch_ranking_loss`` over all B items, anchors = the
    first B/2 pairs); all three are sums over anchors divided by B in J. Returns (J, per-term values)."""
    if ranking not in RANKING_LOSSES:
        raise ValueError(f"ranking must be one of {list(RANKING_LOSSES)}, got {ranking!r}")
    b = labels_img.shape[0]
    terms = {"instance_img": instance_loss(out["img_logits"], labels_img),
             "instance_txt": instance_loss(out["txt_logits"], labels_txt)}
    j = lambda_img * terms["instance_img"] + lambda_txt * terms["instance_txt"]
    if lambda_rank:
        if b % 2:
            raise ValueError(f"the ranking loss needs an even batch (B/2 anchors + B/2 negatives), got {b}")
        h = b // 2
        if ranking == "paper":
            rank_sum = ranking_loss(out["img_rank"][:h], out["txt_rank"][:h], out["img_rank"][h:],
                                    out["txt_rank"][h:], margin)
        else:
            rank_sum = in_batch_ranking_loss(out["img_rank"], out["txt_rank"], labels_img, labels_txt, h, margin,
                                             reduce="max" if ranking == "max_violation" else "sum")
        terms["rank"] = rank_sum / h  # mean over anchors of (L1 + L2), for logging
        j = j + lambda_rank * rank_sum / b
    terms["total"] = j
    return j, {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-branch top-1 accuracy of the instance classifier (for TensorBoard); label -1 ignored. Masked, not indexed:
    no host sync (a boolean index would read the count), so it runs inside a captured step."""
    keep = labels != IGNORE
    hits = (logits.argmax(1) == labels) & keep
    return hits.sum().float() / keep.sum().float()
