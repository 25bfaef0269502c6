"""Check: does the browser find a test image when its exact caption is typed? (docs/demo.md, issue 19)

Loads the browser's index for a checkpoint and a prepared split (``retrieval.browse.load_index``, as
``python -m retrieval.browse`` does), then types every caption of the split, verbatim, into the page's search
(``GET /api/search?q=TEXT&k=K`` through Flask's test client: the browser's own tokenising, encoding and ranking) and
counts the captions whose image comes back in the top K. Prints that share, the split's text->image R@K from the
same index (they must agree: the typed text and the prepared caption are the same sentence), and the worst few.

    .venv/bin/python bench/browser_top5.py --checkpoint runs/demo/stage2/checkpoint_last.pt --data runs/demo/prepared
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
    args = ap.parse_args(argv)

    from retrieval import browse
    from retrieval.browse_app import create_app

    index = browse.load_index(argparse.Namespace(
        checkpoint=args.checkpoint, data=args.data, split=args.split, images=None, top_k=args.k, no_cache=True,
        device="cpu", precision="auto", batch_size=64))
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
    print(f"{args.checkpoint}: {hits} of {len(ranks)} exact {args.split} captions typed into the browser find their "
          f"image in the top {args.k} ({100 * hits / len(ranks):.1f} %); the split's t2i R@{args.k}: {recall:.1f}")
    for r, text in sorted(ranks, reverse=True)[:args.show]:
        print(f"  rank {r}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
