"""Flickr8k: ``python -m prepare.flickr8k --images Flicker8k_Dataset --captions Flickr8k.token.txt ...``.

Same raw formats and pipeline as Flickr30k (this module only reuses ``prepare.flickr30k``), dataset name
"flickr8k", and a third split mode ``--split-lists DIR`` reading Flickr_8k.{train,dev,test}Images.txt
(file names overridable with --train-list/--val-list/--test-list; equal to Karpathy's 6,000/1,000/1,000).
The real token file names a few captions ``2258277193_586949ec62.jpg.1#k`` (no such image): they are skipped
and counted as the warning caption_odd_image_name, never an error.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from prepare import flickr30k


def build_parser() -> argparse.ArgumentParser:
    """prepare.flickr30k's command line with the extra ``--split-lists`` mode."""
    return flickr30k.build_parser("flickr8k", split_lists=True, description=__doc__)


def prepare(args: argparse.Namespace) -> dict:
    """Run the whole preparation for parsed arguments; returns the manifest."""
    return flickr30k.prepare(args, "flickr8k")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 bad input)."""
    return flickr30k.main(argv, dataset="flickr8k", split_lists=True, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
