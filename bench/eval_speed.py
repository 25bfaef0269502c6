"""Benchmark: COCO-5K-sized retrieval evaluation (5,000 images x 25,000 captions, d = 2048, float32).

Times (a) the bare similarity matmul images @ texts.T (one direction), (b) engine.metrics.evaluate_retrieval (both
directions, L2-normalisation included), (c) a typical per-query-argsort evaluator written in numpy (as vsepp/SCAN/
VSE-infinity do, with the tie rule made explicit), checks that (b) and (c) give IDENTICAL metrics, prints a markdown
table and appends it to BENCHMARKS.md.

Features are exact-arithmetic on purpose: every vector has 1024 entries +-1/32 (norm exactly 1), so every score is
a multiple of 1/1024 and every summation order gives the same float. With Gaussian features two evaluators that
compute the same score differently (a GEMM vs a dot product) can round a near-tie (1 ulp) in opposite directions,
and "identical" would hold only by luck. Ties are frequent here, so the reference sorts correct items first among
equal scores (the convention of engine.metrics).

    .venv/bin/python bench/eval_speed.py                 # 5 captions per image
    .venv/bin/python bench/eval_speed.py --captions 5-7  # COCO-like 5-7 captions per image (all kept)
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import append_to_benchmarks, cpu_model  # noqa: E402  (bench/common.py)
from utils.cli import ArgumentParser  # noqa: E402

if TYPE_CHECKING:
    import torch

HEADING = "## 4. Evaluation: COCO 5K ranking"


def make_data(n_images: int, captions: str, dim: int, flip: float, seed: int):
    """Image = 1024-sparse +-1/32 vector (norm 1); caption = its image with each sign flipped with prob. ``flip``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lo, hi = (int(x) for x in captions.split("-")) if "-" in captions else (int(captions),) * 2
    counts = torch.randint(lo, hi + 1, (n_images,), generator=g)
    text_labels = torch.repeat_interleave(torch.arange(n_images), counts)  # (M,) image index of each caption
    support = torch.rand(n_images, dim, generator=g).argsort(1)[:, : dim // 2]  # (N, D/2)
    signs = torch.randint(0, 2, support.shape, generator=g).float() * 2 - 1
    images = torch.zeros(n_images, dim).scatter_(1, support, signs / math.sqrt(dim // 2))  # (N, D) exact +-1/32
    flips = torch.rand(len(text_labels), dim, generator=g) < flip
    texts = images[text_labels] * (1 - 2 * flips.float())  # (M, D)
    return images, texts, torch.arange(n_images), text_labels


def argsort_evaluator(images: torch.Tensor, texts: torch.Tensor, text_labels: torch.Tensor) -> dict[str, Any]:
    """The usual evaluator: full score matrix, then for every query a full argsort of its scores and the position of
    its first correct item (Python loop over queries)."""
    import torch
    import torch.nn.functional as F

    from engine.metrics import recall_metrics
    im, tx = F.normalize(images, dim=1), F.normalize(texts, dim=1)
    sims = torch.mm(im, tx.T).numpy()  # (N, M)
    labels = text_labels.numpy()
    caps_of = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels))[:-1])
    i2t = np.zeros(len(sims), dtype=np.int64)
    for i in range(len(sims)):  # image queries
        correct = np.zeros(sims.shape[1], dtype=bool)
        correct[caps_of[i]] = True
        inds = np.lexsort((~correct, -sims[i]))  # descending score, correct first among equal scores
        i2t[i] = min(np.where(inds == c)[0][0] for c in caps_of[i]) + 1
    sims_t = np.ascontiguousarray(sims.T)  # (M, N)
    t2i = np.zeros(len(sims_t), dtype=np.int64)
    image_ids = np.arange(sims_t.shape[1])
    for j in range(len(sims_t)):  # text queries
        inds = np.lexsort((image_ids != labels[j], -sims_t[j]))
        t2i[j] = np.where(inds == labels[j])[0][0] + 1
    out: dict[str, Any] = {"i2t": recall_metrics(torch.from_numpy(i2t)), "t2i": recall_metrics(torch.from_numpy(t2i))}
    out["rsum"] = sum(v for d in ("i2t", "t2i") for k, v in out[d].items() if k.startswith("R@"))
    return out


def timed(fn: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    """((wall seconds, process CPU seconds over all threads), result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - t0, time.process_time() - c0), result


def main() -> None:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--captions", default="5", help="captions per image: N or LO-HI (random per image)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--flip", type=float, default=0.47, help="probability of flipping each sign of a caption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="best-of-R for (a) and (b), interleaved")
    ap.add_argument("--ref-repeats", type=int, default=1, help="best-of-R for the (slow) argsort evaluator")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown file to append to")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    import torch  # after parsing: --help answers at once (docs/cli.md)

    from engine.metrics import evaluate_retrieval

    images, texts, image_labels, text_labels = make_data(args.images, args.captions, args.dim, args.flip, args.seed)
    print(f"{len(images)} images x {len(texts)} captions, d={args.dim}; torch threads {torch.get_num_threads()}")
    t_mm, t_fast, fast = [], [], None
    for _ in range(args.repeats):  # interleaved so that load changes hit both alike
        t_mm.append(timed(lambda: images @ texts.T)[0])
        dt, fast = timed(lambda: evaluate_retrieval(images, texts, image_labels, text_labels))
        t_fast.append(dt)
        print(f"  matmul {t_mm[-1][0]:.2f} s   evaluate_retrieval {t_fast[-1][0]:.2f} s (wall)")
    t_ref, ref = [], None
    for _ in range(args.ref_repeats):
        dt, ref = timed(lambda: argsort_evaluator(images, texts, text_labels))
        t_ref.append(dt)
        print(f"  per-query argsort {dt[0]:.1f} s (wall)")
    identical = ref == fast
    if not identical:
        print(f"MISMATCH\n fast: {fast}\n ref:  {ref}", file=sys.stderr)

    def best(ts: list[tuple[float, float]]) -> tuple[float, float]:
        return min(t[0] for t in ts), min(t[1] for t in ts)
    base = best(t_mm)
    rows = [("(a) similarity matmul `images @ texts.T` (one direction)", best(t_mm)),
            ("(b) `engine.metrics.evaluate_retrieval` (both directions, incl. L2-normalisation)", best(t_fast)),
            ("(c) per-query argsort evaluator (numpy loop, both directions)", best(t_ref))]
    table = ["| method | wall s | x matmul (wall) | CPU s | x matmul (CPU) |", "|---|---:|---:|---:|---:|"]
    table += [f"| {name} | {w:.2f} | {w / base[0]:.2f} | {c:.2f} | {c / base[1]:.2f} |" for name, (w, c) in rows]
    m = fast
    metric_line = (f"Metrics (b) {'==' if identical else '!='} (c): i2t R@1/5/10 {m['i2t']['R@1']:.2f}/"
                   f"{m['i2t']['R@5']:.2f}/{m['i2t']['R@10']:.2f} medr {m['i2t']['medr']:.0f}; t2i R@1/5/10 "
                   f"{m['t2i']['R@1']:.2f}/{m['t2i']['R@5']:.2f}/{m['t2i']['R@10']:.2f} medr {m['t2i']['medr']:.0f}"
                   f" -> {'IDENTICAL' if identical else 'MISMATCH'}.")
    command = "cd " + str(ROOT) + " && .venv/bin/python bench/eval_speed.py " + shlex.join(sys.argv[1:])
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    block = "\n".join([
        f"### {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} — {len(images)} images x {len(texts)} captions "
        f"(captions per image {args.captions}), d = {args.dim}, float32",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; load average at the end {load}. Timings: best of {args.repeats} (a, b, interleaved) and best of "
        f"{args.ref_repeats} (c); wall clock and process CPU time (all threads; less sensitive to other "
        f"processes on the machine).",
        f"Command: `{command.strip()}`",
        "", *table, "", metric_line, ""])
    print("\n" + block)
    if not args.no_write:
        append_to_benchmarks(block, args.output, HEADING)
        print(f"appended to {args.output}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
