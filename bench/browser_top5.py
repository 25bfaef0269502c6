"""Check: does the browser find a test image when its exact caption is typed? (docs/demo.md, issue 19)

Loads the browser's index for a checkpoint and a prepared split (``retrieval.browse.load_index``, as
``python -m retrieval.browse`` does), then types every caption of the split, verbatim, into the page's search
(``GET /api/search?q=TEXT&k=K`` through Flask's test client: the browser's own tokenising, encoding and ranking) and
counts the captions whose image comes back in the top K. Prints that share, the split's text->image R@K from the
same index (they must agree: the typed text and the prepared caption are the same sentence), and the worst few.
With --folds K it does this for each of the K folds the browser shows with ``--fold I/K`` (the demo: 5 folds of 50
test images, as evaluate.py scores them), then the share over all folds.

    .venv/bin/python bench/browser_top5.py --checkpoint runs/demo/stage2/checkpoint_last.pt --data runs/demo/prepared \
        --folds 5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import quote

import common  # noqa: F401  (puts the repository root on sys.path)

from utils.cli import ArgumentParser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="the prepared directory the model was trained on")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--k", type=int, default=5, help="top K (default %(default)s)")
    ap.add_argument("--show", type=int, default=3, help="worst captions to print (default %(default)s)")
    ap.add_argument("--folds", type=int, default=None, metavar="K",
                    help="each of the K folds in turn (python -m retrieval.browse --fold I/K); default: the whole "
                         "split")
    args = ap.parse_args(argv)
    if args.folds is not None and args.folds < 2:
        ap.error(f"--folds {args.folds}: expected 2 or more")
    hits = total = 0
    for fold in [None] if args.folds is None else [(i, args.folds) for i in range(args.folds)]:
        h, n = typed_captions(args, fold)
        hits, total = hits + h, total + n
    if args.folds:
        print(f"all {args.folds} folds: {hits} of {total} in the top {args.k} ({100 * hits / total:.1f} %)")
    return 0


def typed_captions(args: argparse.Namespace, fold: tuple[int, int] | None) -> tuple[int, int]:
    """(captions found in the top K, captions) in one gallery: the whole split or one fold (0-based, of K)."""
    from retrieval import browse
    from retrieval.browse_app import create_app

    index = browse.load_index(argparse.Namespace(  # the split's features are cached next to the checkpoint
        checkpoint=args.checkpoint, data=args.data, split=args.split, images=None, top_k=args.k, no_cache=False,
        device="cpu", precision="auto", batch_size=64, fold=fold))
    client = create_app(index).test_client()
    texts = sorted(set(t.strip() for t in index.caption_texts))
    ranks = []
    for text in texts:
        resp = client.get(f"/api/search?q={quote(text)}&k={args.k}")
        if resp.status_code != 200:
            raise SystemExit(f"/api/search answered {resp.status_code} for {text!r}: {resp.get_json()}")
        truth = resp.get_json()["truth"]
        if not truth:
            raise SystemExit(f"/api/search found no ground truth for the split's own caption {text!r}")
        ranks.append((min(t["rank"] for t in truth), text))
    hits = sum(r <= args.k for r, _ in ranks)
    recall = index.evaluation["t2i"][f"R@{args.k}"] if index.evaluation else float("nan")
    where = f"{args.checkpoint}" + (f" fold {fold[0] + 1}/{fold[1]}" if fold else "")
    print(f"{where}: {hits} of {len(ranks)} exact {args.split} captions typed into the browser find their image in "
          f"the top {args.k} ({100 * hits / len(ranks):.1f} %); the gallery's t2i R@{args.k}: {recall:.1f}")
    for r, text in sorted(ranks, reverse=True)[:args.show]:
        print(f"  rank {r}: {text}")
    return hits, len(ranks)


if __name__ == "__main__":
    sys.exit(main())
