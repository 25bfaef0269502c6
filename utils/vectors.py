"""Feature vectors: the one L2 normalisation and the one top-k of the project (torch and numpy).

``l2_normalize`` is the original's: its ranking loss normalises with ``dagnn.LRN([4096, 1e-8, 1, 0.5])``, which on
2048 channels is exactly x / sqrt(1e-8 + ||x||^2). The losses, the evaluation's cosine similarity, search, the
browser and the pictures all use it, so a score is the same number wherever it is shown. ``top_indices`` orders
scores best first with ties broken by the lower index, exactly (also at the k-th place).
"""
from __future__ import annotations

import numpy as np
import torch

EPS = 1e-8  # the LRN's kappa


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows (dim 1) divided by sqrt(1e-8 + ||row||^2), computed in float32 and returned in ``x``'s dtype."""
    return x * torch.rsqrt(EPS + x.float().pow(2).sum(dim=1, keepdim=True)).to(x.dtype)


def unit_rows(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``l2_normalize`` of the rows of a (N, D) numpy array or tensor, as a float32 tensor (on x's device)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return l2_normalize(t.float())


def top_indices(scores: np.ndarray | torch.Tensor, k: int) -> np.ndarray:
    """Indices of the ``k`` highest of the (N,) ``scores``, best first, ties by lower index."""
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    k = max(0, min(k, len(s)))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    if k < len(s):
        kth = np.partition(s, len(s) - k)[len(s) - k]  # the k-th largest value
        cand = np.flatnonzero(s >= kth)
    else:
        cand = np.arange(len(s))
    return cand[np.lexsort((cand, -s[cand]))][:k]
