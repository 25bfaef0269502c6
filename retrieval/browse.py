"""A local web page to search and inspect a trained model on a prepared split (or on a folder of your own images).

    python -m retrieval.browse --checkpoint runs/f30k/stage2/checkpoint_best.pt --data data/flickr30k --split test
    python -m retrieval.browse --checkpoint CKPT --data data/flickr30k --images ~/photos      # your own images
    then open http://127.0.0.1:8765

Views: a query box (sentence -> top-K images), an image view (top-K captions, ground-truth captions and their ranks),
an evaluation view (R@1/5/10, Med r, worst-ranked queries, paged); every view has a permalink and an "export PNG".
Features are encoded once at start-up; docs/browser.md describes the page. Arguments are parsed before torch is
imported, so --help is instant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from utils.cli import ArgumentParser, UserError, check_model_inputs, fail, resolve_device

from .search import add_encoding_args


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m retrieval.browse", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a local retrieval browser for a trained dual-path model: a query box, an image view, "
                    "an evaluation view (the numbers evaluate.py prints), permalinks and PNG export.",
        epilog="examples:\n"
               "  python -m retrieval.browse --checkpoint runs/f30k/stage2/checkpoint_best.pt --data data/flickr30k\n"
               "  python -m retrieval.browse --checkpoint CKPT --data data/flickr30k --images ~/photos --port 8800\n"
               "exit status: 0 stopped with Ctrl-C, 2 bad arguments or input (the message says what was expected).")
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                   help="a training checkpoint (checkpoint_best.pt / checkpoint_last.pt of a Stage I or II run)")
    p.add_argument("--data", required=True, type=Path, metavar="PREPARED_DIR",
                   help="the prepared directory the model was trained on (dictionary, images, captions)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="prepared split whose images and captions are browsed (default: %(default)s)")
    p.add_argument("--fold", metavar="I/K", type=parse_fold,
                   help="browse only fold I of K (1-based) of the split: its images cut into K equal folds of "
                        "consecutive images, each with its own captions, as evaluate.py --folds K scores them (the "
                        "demo: --fold 1/5, 50 of its 250 test images); the evaluation view shows that fold's numbers")
    p.add_argument("--images", type=Path, metavar="FOLDER",
                   help="browse this folder of .jpg/.jpeg/.png images (recursive) instead of the split's images; "
                        "the image view then ranks the split's captions; features are cached as in retrieval.search")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 exposes the page "
                        "and the images to the network)")
    p.add_argument("--port", type=int, default=8765, help="port (default: %(default)s; 0 = any free port)")
    p.add_argument("--top-k", type=int, default=10, metavar="K", help="results per view (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the feature caches (default: the split's features are cached next "
                        "to the checkpoint, .dualpath_browse_<split>_<hash>.npz, a folder's in the folder, so a "
                        "second start-up skips the encoding)")
    add_encoding_args(p, batch_size=64)
    return p


class BrowseStartError(UserError):
    """A user error found before serving (exit code 2)."""


def parse_fold(text: str) -> tuple[int, int]:
    """'I/K' -> (I - 1, K): fold I (1-based) of K >= 2."""
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/K, fold I of K folds (e.g. 1/5)") from None
    if k < 2 or not 1 <= i <= k:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K >= 2 folds and I from 1 to K")
    return i - 1, k


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no torch: files exist, numbers are in range."""
    from .browse_limits import MAX_K

    if not 1 <= args.top_k <= MAX_K:
        raise BrowseStartError(f"--top-k {args.top_k}: expected 1 to {MAX_K}")
    if not 0 <= args.port <= 65535:
        raise BrowseStartError(f"--port {args.port}: expected 0 (any free port) to 65535")
    if args.batch_size < 1:
        raise BrowseStartError(f"--batch-size {args.batch_size}: expected a positive number")
    try:
        check_model_inputs(args.checkpoint, args.data)
    except UserError as e:
        raise BrowseStartError(str(e)) from None
    if args.fold is not None and args.images is not None:
        raise BrowseStartError("--fold selects images of the split; it cannot be combined with --images FOLDER")
    if args.images is not None and not args.images.is_dir():
        raise BrowseStartError(f"--images {args.images}: no such folder (expected a folder of .jpg/.jpeg/.png "
                               f"images)")


def load_index(args: argparse.Namespace):
    """Load the model and encode the gallery once (progress on stderr) -> BrowseIndex."""
    from engine.data import Prepared
    from engine.model_io import load_model

    from .browse_index import default_split_cache, from_folder, from_split
    from .cache import checkpoint_key, default_caption_cache, default_image_cache

    data = Prepared(args.data)
    device = resolve_device(args.device)
    try:
        model, _ = load_model(args.checkpoint, data, device)
    except RuntimeError as e:  # unreadable file, or weights that do not fit the rebuilt network
        raise BrowseStartError(f"--checkpoint {args.checkpoint}: {e}") from None
    if args.images is None:
        n = len(data.split_images(args.split))
        if n == 0:
            raise BrowseStartError(f"--split {args.split}: {args.data} has no {args.split} images")
        if args.fold is not None and n % args.fold[1]:  # before the encoding, naming the flag
            raise BrowseStartError(f"--fold {args.fold[0] + 1}/{args.fold[1]}: the {args.split} split of {args.data} "
                                   f"has {n} images, which do not cut into {args.fold[1]} equal folds")
        return from_split(model, data, args.split, device, top_k=args.top_k, precision=args.precision,
                          batch_size=args.batch_size, source=str(args.checkpoint), fold=args.fold,
                          cache_key=checkpoint_key(args.checkpoint),
                          cache=None if args.no_cache else default_split_cache(args.checkpoint, data, args.split))
    return from_folder(model, data, args.split, args.images, device, top_k=args.top_k, precision=args.precision,
                       batch_size=args.batch_size, cache_key=checkpoint_key(args.checkpoint),
                       source=str(args.checkpoint),
                       image_cache=None if args.no_cache else default_image_cache(args.images, args.checkpoint),
                       caption_cache=None if args.no_cache else default_caption_cache(args.checkpoint, data,
                                                                                       args.split))


def make_server(index, host: str = "127.0.0.1", port: int = 0):
    """A threaded werkzeug server for the app (``.serve_forever()``, ``.shutdown()``; ``.port`` is the bound
    port, useful with port 0)."""
    from werkzeug.serving import make_server as _make

    from .browse_app import JSONErrorRequestHandler, create_app

    return _make(host, port, create_app(index), threaded=True, request_handler=JSONErrorRequestHandler)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        from engine.data import PreparedDataError
        from .index import SearchError
        try:
            index = load_index(args)
            server = make_server(index, args.host, args.port)
        except (SearchError, PreparedDataError, FileNotFoundError, ValueError) as e:
            raise BrowseStartError(str(e)) from None
        except OSError as e:  # the port is taken, or the address cannot be bound
            raise BrowseStartError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    except BrowseStartError as e:
        return fail(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    where = "this machine only" if args.host in ("127.0.0.1", "localhost", "::1") else "REACHABLE FROM THE NETWORK"
    host = f"[{args.host}]" if ":" in args.host else args.host
    fold = f" (fold {args.fold[0] + 1}/{args.fold[1]})" if args.fold else ""
    print(f"{index.mode} gallery{fold}: {len(index.image_paths)} images, {len(index.caption_rows)} {args.split} "
          f"captions"
          + (f"; rsum {index.evaluation['rsum']:.1f}" if index.evaluation else ""), flush=True)
    print(f"listening on http://{host}:{server.port}/  ({where}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
