"""The chance level of the retrieval metrics (engine.metrics): what a model that ranks at random scores. Torch-free,
so ``evaluate.py --table`` prints it without importing torch."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DIRECTIONS = ("i2t", "t2i")


def chance_level(num_images: int, captions_per_image: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """What a model that ranks at random scores on a split of ``num_images`` images with ``captions_per_image``
    captions each, in the metrics of engine.metrics: {"i2t": {"R@K": %, "medr"}, "t2i": {...}, "rsum"}.

    text→image: the one correct image's rank is uniform on 1..N, so R@K = K / N. image→text: the rank is the best
    of the image's c caption positions among M = c·N, drawn without replacement, so P(rank > K) = C(M-c, K) /
    C(M, K). R@K is the expected hit rate (exact); medr is where the rank distribution crosses one half, with
    ``engine.metrics.recall_metrics``' convention (the smallest K whose hit rate exceeds 0.5), which a random model's Med r
    approaches on many queries."""
    n, c = int(num_images), int(captions_per_image)
    if n < 1 or c < 1:
        raise ValueError(f"need at least one image and one caption per image, got {num_images}, {captions_per_image}")
    m = n * c

    def hit_t2i(k: int) -> float:
        return min(k, n) / n

    def hit_i2t(k: int) -> float:
        return 1.0 - (math.comb(m - c, k) / math.comb(m, k) if k <= m - c else 0.0)

    out: dict[str, Any] = {}
    for d, hit, size in (("i2t", hit_i2t, m), ("t2i", hit_t2i, n)):
        out[d] = {f"R@{k}": 100.0 * hit(k) for k in ks}
        out[d]["medr"] = float(next(k for k in range(1, size + 1) if hit(k) > 0.5))
    out["rsum"] = sum(v for d in DIRECTIONS for k, v in out[d].items() if k.startswith("R@"))
    return out
